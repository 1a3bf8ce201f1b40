"""Round trip (generate -> build -> read) and input-pipeline tests on the tiny synthetic set.

The tiny set is generated and built once per test session (and shared between
pytest-xdist workers through a file lock). Expectations come from the
generator's own files (annotation txt files, crop folders, corruptions.json,
raw mp4s decoded here with PyAV, log-mels computed here with librosa), not
from the preprocessing code.
"""

import glob
import itertools
import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import tensorflow as tf
from conftest import librosa_log_mel
from PIL import Image

from iaca_jax import input_pipeline as ip
from iaca_jax.preprocessing import DataError

DATASET = 'synthetic_av'
VA = '6th_ABAW_Annotations/VA_Estimation_Challenge'


# ----------------------------------------------------------- expectations
def _labels(path):
  with open(path) as f:
    assert f.readline().strip() == 'valence,arousal'
  return np.loadtxt(path, delimiter=',', skiprows=1, dtype=np.float32).reshape(-1, 2)


def _truth(tiny, split, video):
  """Labels (or None), frames with a crop, number of frames, fps of one video."""
  n = tiny.side[video]['num_frames']
  if split == 'test':
    labels = None
  else:
    folder = {'train': 'Train_Set', 'validation': 'Validation_Set'}[split]
    labels = _labels(os.path.join(tiny.raw, VA, folder, video + '.txt'))
    assert len(labels) == n
  crops = {
    int(os.path.basename(p)[:5]) for p in glob.glob(os.path.join(tiny.raw, 'cropped_aligned', video, '*.jpg'))
  }
  return labels, crops, n, tiny.side[video]['fps']


def _expected_windows(tiny, split, video):
  """{window end: fields} from the rules of docs/DESIGN.md §2, written out independently."""
  labels, crops, n, _ = _truth(tiny, split, video)
  valid = lambda f: labels is not None and labels[f - 1, 0] != -5 and labels[f - 1, 1] != -5
  out, end, counter = {}, 481, 0
  while end < n + 481:  # the authors' schedule
    ends = [end - 32 * c for c in range(15, -1, -1)]
    ex = dict(
      end_frame=[], labels=[], mask=[], frame_labels=[], frame_mask=[], corrupt_video=[], corrupt_audio=[]
    )
    for k in ends:
      real = k <= n
      present = [
        f for f in range(max(1, k - 31), k + 1) if real and f in crops and (split != 'train' or valid(f))
      ]
      last = present[-1] if present else None
      ok = last is not None and valid(last)
      ex['end_frame'].append(k if real else 0)
      ex['labels'].append(labels[last - 1] if ok else [0, 0])
      ex['mask'].append(ok)
      ex['frame_labels'].append(labels[k - 1] if real and valid(k) else [0, 0])
      ex['frame_mask'].append(real and valid(k))
      for key, mod in (('corrupt_video', 'face'), ('corrupt_audio', 'audio')):
        bad = {f for iv in tiny.side[video][mod] for f in range(iv['start'], iv['end'] + 1)}
        span = range(max(1, k - 31), k + 1) if real else ()
        ex[key].append(sum(f in bad for f in span) >= 16)
    if split != 'train' or sum(ex['mask']) >= 8:
      out[end] = {k: np.asarray(v) for k, v in ex.items()}
    counter += 1
    end, counter = (end + 481, 0) if counter > 31 else (end + 1, counter)
  return out


def _split_videos(tiny, split):
  return sorted(v for v, d in tiny.side.items() if d['split'] == split)


def _read_split(tiny, split, features=None):
  """Every stored window of a split through the eval pipeline: {(video, end): example}."""
  batches = ip.create_eval_dataset(
    DATASET,
    tiny.data_dir,
    global_batch_size=8,
    split=split,
    features=features,
    process_index=0,
    process_count=1,
  )
  out = {}
  for b in batches:
    for i in np.flatnonzero(b['valid_window']):
      ex = {k: v[i] for k, v in b.items()}
      key = (ex['video_name'].decode(), int(ex['end_frame'][ex['end_frame'] > 0].max()))
      assert key not in out
      out[key] = ex
  return out


NO_VIDEO = [
  'audio',
  'labels',
  'mask',
  'frame_labels',
  'frame_mask',
  'end_frame',
  'video_name',
  'corrupt_video',
  'corrupt_audio',
]


# ------------------------------------------------------------- round trip
@pytest.mark.parametrize('split', ['train', 'validation', 'test'])
def test_round_trip_labels_masks_names_end_frames(tiny, split):
  got = _read_split(tiny, split, features=NO_VIDEO)
  expected = {}
  for video in _split_videos(tiny, split):
    for ex in _expected_windows(tiny, split, video).values():
      last_real = ex['end_frame'][ex['end_frame'] > 0].max()
      expected[(video, int(last_real))] = ex
  assert set(got) == set(expected)
  for key, ex in expected.items():
    for field in ('end_frame', 'mask', 'frame_mask', 'corrupt_video', 'corrupt_audio'):
      np.testing.assert_array_equal(got[key][field], ex[field], err_msg=f'{key} {field}')
    np.testing.assert_array_equal(got[key]['labels'], ex['labels'].astype(np.float32))
    np.testing.assert_array_equal(got[key]['frame_labels'], ex['frame_labels'].astype(np.float32))
  if split == 'test':
    with open(os.path.join(tiny.raw, VA, 'Test_Set.txt')) as f:
      assert sorted({v for v, _ in got}) == sorted(f.read().split())
  else:
    assert any(ex['corrupt_video'].any() for ex in got.values())
    assert any(ex['corrupt_audio'].any() for ex in got.values())
  if split != 'train':
    # Every frame of every video is the end frame of exactly one stored clip.
    for video in _split_videos(tiny, split):
      ends = np.concatenate([ex['end_frame'] for (v, _), ex in got.items() if v == video])
      n = tiny.side[video]['num_frames']
      np.testing.assert_array_equal(np.sort(ends[ends > 0]), np.arange(1, n + 1))


def test_special_videos_are_present(tiny):
  names = set(tiny.side)
  assert {'syn000_left', 'syn000_right'} <= names
  assert tiny.side['syn000_left']['audio_source'] == tiny.side['syn000_right']['audio_source']
  assert any(v.split('-')[1:2] == ['24'] and tiny.side[v]['fps'] == 24.0 for v in names)


def _decode(path, sr=44_100):
  with av.open(path) as c:
    rs = av.AudioResampler(format='flt', layout='mono', rate=sr)
    chunks = [o.to_ndarray().reshape(-1) for f in c.decode(audio=0) for o in rs.resample(f)]
    chunks += [o.to_ndarray().reshape(-1) for o in rs.resample(None)]
  return np.concatenate(chunks)


def test_round_trip_audio_is_the_clip_log_mel(tiny):
  got = _read_split(tiny, 'validation', features=NO_VIDEO)
  got.update(_read_split(tiny, 'train', features=NO_VIDEO))
  checked = 0
  for video in ('syn000_right', _split_videos(tiny, 'validation')[0]):  # 30 fps pair, 24 fps
    track = _decode(os.path.join(tiny.raw, 'raw_videos', tiny.side[video]['audio_source'] + '.mp4'))
    fps = tiny.side[video]['fps']
    for (v, _), ex in sorted(got.items()):
      if v != video:
        continue
      for c in (0, 5, 9):
        k = int(ex['end_frame'][c])
        if k == 0:
          continue
        stop = int(round(k * 44_100 / fps))
        y = np.zeros(45_599, np.float32)
        seg = track[max(0, stop - 45_599) : stop]
        y[45_599 - len(seg) :] = seg
        ref = librosa_log_mel(y, 44_100)
        np.testing.assert_allclose(ex['audio'][c], ref, atol=2e-3, err_msg=f'{video} {k}')
        checked += 1
  assert checked >= 20
  # The `_left`/`_right` pair shares one audio track.
  left = {e: ex for (v, e), ex in got.items() if v == 'syn000_left'}
  right = {e: ex for (v, e), ex in got.items() if v == 'syn000_right'}
  common = sorted(set(left) & set(right))
  assert common
  for e in common:
    np.testing.assert_array_equal(left[e]['audio'], right[e]['audio'])


def test_round_trip_faces(tiny):
  """A clip whose 32 frames all have a crop holds frames k-28, k-24, ..., k, normalised."""
  split = 'validation'
  video = _split_videos(tiny, split)[1]
  _, crops, n, _ = _truth(tiny, split, video)
  got = {e: ex for (v, e), ex in _read_split(tiny, split).items() if v == video}
  checked = 0
  for ex in got.values():
    for c, k in enumerate(ex['end_frame']):
      if k >= 32 and all(f in crops for f in range(k - 31, k + 1)) and checked < 6:
        for s, f in enumerate(range(k - 28, k + 1, 4)):
          img = (
            np.asarray(
              Image.open(os.path.join(tiny.raw, 'cropped_aligned', video, f'{f:05d}.jpg')), np.float32
            )
            / 255
          )
          ref = (img - np.array(ip.KINETICS_MEAN)) / np.array(ip.KINETICS_STD)
          np.testing.assert_allclose(ex['video'][c, s], ref, atol=3 / 255 / 0.216)
        checked += 1
  assert checked == 6
  # A padding clip's frames are zeros before normalisation.
  ex = next(ex for ex in got.values() if (ex['end_frame'] == 0).any())
  c = int(np.flatnonzero(ex['end_frame'] == 0)[0])
  np.testing.assert_allclose(ex['video'][c] * ip.KINETICS_STD + ip.KINETICS_MEAN, 0, atol=1e-5)


# --------------------------------------------------------------- pipeline
def test_batch_format(tiny):
  b = next(
    iter(
      ip.create_train_dataset(
        DATASET, tiny.data_dir, global_batch_size=4, seed=0, process_index=0, process_count=1
      )
    )
  )
  spec = {
    'video': ((4, 16, 8, 112, 112, 3), np.float32),
    'audio': ((4, 16, 64, 104), np.float32),
    'labels': ((4, 16, 2), np.float32),
    'mask': ((4, 16), np.bool_),
    'frame_labels': ((4, 16, 2), np.float32),
    'frame_mask': ((4, 16), np.bool_),
    'end_frame': ((4, 16), np.int32),
    'video_name': ((4,), np.object_),
    'corrupt_video': ((4, 16), np.bool_),
    'corrupt_audio': ((4, 16), np.bool_),
    'valid_window': ((4,), np.bool_),
  }
  assert set(b) == set(spec)
  for k, (shape, dtype) in spec.items():
    assert b[k].shape == shape and b[k].dtype == dtype, k
  assert all(isinstance(n, bytes) for n in b['video_name'])
  assert b['valid_window'].all() and (b['mask'].sum(1) >= 8).all()
  # Jittered faces stay inside the normalised [0, 1] range.
  lo = (0 - np.array(ip.KINETICS_MEAN)) / ip.KINETICS_STD
  hi = (1 - np.array(ip.KINETICS_MEAN)) / ip.KINETICS_STD
  assert (b['video'] >= lo - 1e-5).all() and (b['video'] <= hi + 1e-5).all()


def _keys(batches, n=None):
  return [
    (name, tuple(e)) for b in itertools.islice(batches, n) for name, e in zip(b['video_name'], b['end_frame'])
  ]


def test_train_order_is_a_function_of_seed_and_epoch(tiny):
  mk = lambda **kw: ip.create_train_dataset(
    DATASET,
    tiny.data_dir,
    global_batch_size=4,
    process_index=0,
    process_count=1,
    features=['video_name', 'end_frame'],
    **kw,
  )
  a, b = mk(seed=3, epoch=1), mk(seed=3, epoch=1)
  assert len(a) == len(b) > 3
  assert _keys(a) == _keys(b) == _keys(a)  # also stable across iterations
  assert _keys(mk(seed=3, epoch=2)) != _keys(a)
  assert _keys(mk(seed=4, epoch=1)) != _keys(a)
  # Each epoch: distinct windows of the split (the partial last batch is dropped).
  every = set(
    _keys(
      ip.create_eval_dataset(
        DATASET,
        tiny.data_dir,
        global_batch_size=1,
        split='train',
        process_index=0,
        process_count=1,
        features=['video_name', 'end_frame'],
      )
    )
  )
  for keys in (_keys(a), _keys(mk(seed=3, epoch=2))):
    assert len(keys) == len(set(keys)) == 4 * len(a) and set(keys) <= every
  # Resuming at batch k replays batches k, k+1, ... exactly.
  resumed = mk(seed=3, epoch=1, start_batch=3)
  assert len(resumed) == len(a) - 3
  assert _keys(resumed) == _keys(a)[3 * 4 :]


def test_train_batches_identical_including_jitter(tiny):
  mk = lambda **kw: ip.create_train_dataset(
    DATASET, tiny.data_dir, global_batch_size=2, seed=7, epoch=0, process_index=0, process_count=1, **kw
  )
  first = list(itertools.islice(mk(), 3))
  again = list(itertools.islice(mk(), 3))
  resumed = next(iter(mk(start_batch=2)))
  for x, y in zip(first, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for k in resumed:
    np.testing.assert_array_equal(resumed[k], first[2][k])
  # Another range gives other faces; jitter off: the faces equal the eval decoding of the same windows.
  narrow = next(iter(mk(jitter=(0.95, 1.05))))
  assert not np.array_equal(narrow['video'], first[0]['video'])
  plain = next(iter(mk(jitter=None)))
  assert not np.array_equal(plain['video'], first[0]['video'])
  np.testing.assert_array_equal(plain['audio'], first[0]['audio'])
  ev = _read_split(tiny, 'train')
  for i, name in enumerate(plain['video_name']):
    e = int(plain['end_frame'][i].max())
    np.testing.assert_allclose(plain['video'][i], ev[(name.decode(), e)]['video'], atol=1e-6)


def test_processes_get_their_rows_of_the_one_process_batches(tiny):
  """P processes train on exactly the global batches of one process: process p gets rows
  [p B/P, (p+1) B/P) of each, jitter included, so a P-process run equals a 1-process run."""
  mk = lambda i, count, features: ip.create_train_dataset(
    DATASET,
    tiny.data_dir,
    global_batch_size=4,
    seed=0,
    epoch=1,
    start_batch=1,
    process_index=i,
    process_count=count,
    features=features,
  )
  one = list(mk(0, 1, ['video_name', 'end_frame']))
  per = [list(mk(i, 2, ['video_name', 'end_frame'])) for i in range(2)]
  n = ip.get_builder(DATASET, tiny.data_dir).info.splits['train'].num_examples
  assert len(per[0]) == len(per[1]) == len(one) == n // 4 - 1
  assert ip.num_train_batches(DATASET, tiny.data_dir, global_batch_size=4, process_count=2) == n // 4
  for b, b0, b1 in zip(one, *per):
    assert _keys([b]) == _keys([b0]) + _keys([b1])
  first_one = next(iter(mk(0, 1, None)))
  first_p1 = next(iter(mk(1, 2, None)))
  np.testing.assert_array_equal(first_p1['video'], first_one['video'][2:])  # the same jitter


@pytest.mark.parametrize('process_count, global_batch', [(1, 5), (3, 6)])
def test_eval_visits_every_window_once(tiny, process_count, global_batch):
  split = 'validation'
  n = ip.get_builder(DATASET, tiny.data_dir).info.splits[split].num_examples
  seen, lengths = [], []
  for i in range(process_count):
    batches = ip.create_eval_dataset(
      DATASET,
      tiny.data_dir,
      global_batch_size=global_batch,
      split=split,
      process_index=i,
      process_count=process_count,
      features=NO_VIDEO,
    )
    count = 0
    for b in batches:
      count += 1
      assert b['valid_window'].shape == (global_batch // process_count,)
      pad = ~b['valid_window']
      assert not b['mask'][pad].any() and not b['frame_mask'][pad].any()
      assert (b['end_frame'][pad] == 0).all() and all(x == b'' for x in b['video_name'][pad])
      seen += [
        (name, tuple(e)) for name, e, ok in zip(b['video_name'], b['end_frame'], b['valid_window']) if ok
      ]
    assert count == len(batches)
    lengths.append(count)
  assert len(set(lengths)) == 1  # the same number of batches everywhere
  assert len(seen) == len(set(seen)) == n
  one = ip.create_eval_dataset(
    DATASET,
    tiny.data_dir,
    global_batch_size=4,
    split=split,
    process_index=0,
    process_count=1,
    features=NO_VIDEO,
  )
  in_order = [
    (name, tuple(e))
    for b in one
    for name, e, ok in zip(b['video_name'], b['end_frame'], b['valid_window'])
    if ok
  ]
  assert seen == in_order  # the shares, put together, are the split in one process's order


def test_resumed_run_in_a_new_process_sees_the_same_batches(tiny):
  """A resumed run is a new process: its batches k, k+1, ... equal the uninterrupted run's."""
  code = (
    'import sys, json; from iaca_jax import input_pipeline as ip\n'
    f'b = ip.create_train_dataset({DATASET!r}, {tiny.data_dir!r}, global_batch_size=4, seed=3, '
    "epoch=1, start_batch=2, process_index=0, process_count=1, features=['video_name', "
    "'end_frame'])\n"
    'print(json.dumps([[n.decode(), e.tolist()] for x in b for n, e in '
    "zip(x['video_name'], x['end_frame'])]))\n"
  )
  env = dict(os.environ, PYTHONHASHSEED='random', TF_CPP_MIN_LOG_LEVEL='3')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = (
    subprocess.run(
      [sys.executable, '-c', code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    .stdout.strip()
    .splitlines()[-1]
  )
  resumed = [(n.encode(), tuple(e)) for n, e in json.loads(out)]
  here = ip.create_train_dataset(
    DATASET,
    tiny.data_dir,
    global_batch_size=4,
    seed=3,
    epoch=1,
    process_index=0,
    process_count=1,
    features=['video_name', 'end_frame'],
  )
  assert resumed == [(n, tuple(int(x) for x in e)) for n, e in _keys(here)][2 * 4 :]


def test_damaged_shard_is_named_at_read_time(cached, tmp_path):
  """Bytes flipped inside one shard: reading stops with a DataError naming that file and the split."""
  copy = tmp_path / 'features'
  shutil.copytree(cached.dataset.features_dir, copy)
  shard = sorted(copy.glob('*-train.tfrecord-*'))[0]
  data = bytearray(shard.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
  shard.write_bytes(bytes(data))
  batches = ip.create_train_dataset(str(copy), global_batch_size=4, seed=0, process_index=0, process_count=1)
  with pytest.raises(DataError, match='damaged TFRecord shard in the train split') as e:
    for _ in batches:
      pass
  assert str(shard) in str(e.value)


def test_non_finite_values_are_stopped_when_read(tiny, tmp_path):
  """A NaN in the log-mels of one window: training read without the names and frames still ends with
  a DataError naming the window's video, frames, clip and shard file."""
  source = os.path.join(tiny.data_dir, DATASET, 'sr44100', '1.0.0')
  copy = tmp_path / '1.0.0'
  copy.mkdir()
  for name in os.listdir(source):  # the train shards copied (one is rewritten), the rest linked
    if name.endswith('.json') or '-train.' in name:
      shutil.copy(os.path.join(source, name), copy)
    else:
      os.symlink(os.path.join(source, name), copy / name)
  shard = sorted(copy.glob('*-train.tfrecord-*'))[1]
  records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(shard))]
  window = records[2].features.feature
  window['audio'].float_list.value[3 * 64 * 104 + 5] = np.nan  # clip 3
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for record in records:
      writer.write(record.SerializeToString())
  video = window['video_name'].bytes_list.value[0].decode()
  clip_end = window['end_frame'].int64_list.value[3]
  batches = ip.create_train_dataset(
    str(copy),
    global_batch_size=4,
    seed=0,
    features=('audio', 'labels', 'mask'),
    process_index=0,
    process_count=1,
  )
  with pytest.raises(DataError) as e:
    for _ in batches:
      pass
  message = str(e.value)
  assert message.startswith("train split of synthetic_av: non-finite values in feature 'audio'"), message
  assert f'video {video}, frames ' in message and f'(the clip ending at frame {clip_end})' in message
  assert f'record 2 of shard {shard}' in message and ' in 1 window;' in message
