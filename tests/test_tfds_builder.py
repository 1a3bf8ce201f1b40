"""Bad raw input: what stops a build (DataError naming the file) and what is skipped and counted."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import av
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import example_serializer

from data import build
from data.synthetic_av import generate
from iaca_jax.preprocessing import DataError, annotations, examples, serialization, tfds_builder

VA = '6th_ABAW_Annotations/VA_Estimation_Challenge'
MICRO = generate.Settings(
  num_train_videos=3, num_validation_videos=1, num_test_videos=1, min_frames=70, max_frames=90
)
SILENCE = (-100 + 14.8) / 19.895
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Its module-scoped fixtures are built once: the module runs on one xdist worker (--dist=loadgroup).
pytestmark = pytest.mark.xdist_group('tfds_builder')


@pytest.fixture(scope='module')
def micro(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('micro') / 'raw')
  generate.generate(root, MICRO, seed=1)
  return root


@pytest.fixture
def raw(micro, tmp_path):
  dst = str(tmp_path / 'raw')
  shutil.copytree(micro, dst)
  return dst


def _side(raw):
  with open(os.path.join(raw, 'corruptions.json')) as f:
    return json.load(f)['videos']


def _ann(raw, split, video):
  return os.path.join(raw, VA, {'train': 'Train_Set', 'validation': 'Validation_Set'}[split], video + '.txt')


def _val_video(raw):
  return next(v for v, d in _side(raw).items() if d['split'] == 'validation')


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)


def _nothing_complete(data_dir):
  for dirpath, dirnames, filenames in os.walk(data_dir):
    assert 'dataset_info.json' not in filenames, dirpath
    assert not any('incomplete' in d for d in dirnames), dirpath
    assert '1.0.0' not in dirnames, dirpath


# ------------------------------------------------------- annotation files
@pytest.mark.parametrize(
  'text, fragment',
  [
    ('', 'empty'),
    ('valence;arousal\n0.1,0.2\n', 'header'),
    ('arousal,valence\n0.1,0.2\n', 'header'),
    ('valence,arousal\n', 'no label line'),
    ('valence,arousal\n0.1,0.2\n1.5,0.2\n', 'line 3'),
    ('valence,arousal\n0.1,-1.01\n', 'line 2'),
    ('valence,arousal\nnan,0.2\n', 'line 2'),
    ('valence,arousal\n-4,0.2\n', 'line 2'),
    ('valence,arousal\n0.1\n', 'line 2'),
    ('valence,arousal\n0.1,abc\n', 'line 2'),
    ('valence,arousal\n0.1,0.2\n\n0.3,0.4\n', 'line 3'),
  ],
)
def test_malformed_annotation_files(tmp_path, text, fragment):
  path = str(tmp_path / 'vid.txt')
  _write(path, text)
  with pytest.raises(DataError, match=fragment) as e:
    annotations.read_annotation(path)
  assert path in str(e.value)
  assert isinstance(e.value, ValueError)


def test_non_utf8_annotation_file_and_video_list_are_named(tmp_path):
  for name, read, kind in (
    ('vid.txt', annotations.read_annotation, 'annotation file'),
    ('Test_Set.txt', annotations.read_video_list, 'video list'),
  ):
    path = tmp_path / name
    path.write_bytes(b'valence,arousal\n0.1,0.2\n\xff\xfe0.3,0.4\n')
    with pytest.raises(DataError, match=f'{kind} .*not UTF-8') as e:
      read(str(path))
    assert str(path) in str(e.value)


def test_valid_annotation_values(tmp_path):
  path = str(tmp_path / 'vid.txt')
  _write(path, 'valence,arousal\r\n-5,-5\r\n-1,1\r\n0.25,-5\r\n')
  labels = annotations.read_annotation(path)
  np.testing.assert_array_equal(labels, [[-5, -5], [-1, 1], [0.25, -5]])
  assert annotations.label_valid(labels).tolist() == [False, True, False]


def test_wrong_annotation_length_stops_the_build(raw, tmp_path):
  video = _val_video(raw)
  path = _ann(raw, 'validation', video)
  with open(path) as f:
    lines = f.read().splitlines()
  _write(path, '\n'.join(lines[:-3]) + '\n')  # 3 frames short of the video
  with pytest.raises(DataError, match='label lines') as e:
    tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True)
  assert path in str(e.value)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(DataError):
    build.build('synthetic_av', raw, data_dir)
  _nothing_complete(data_dir)


def test_bad_header_stops_the_build_before_writing(raw, tmp_path):
  path = _ann(raw, 'train', 'syn001')
  with open(path) as f:
    body = f.read().split('\n', 1)[1]
  _write(path, 'Valence,Arousal,Extra\n' + body)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(DataError, match='header') as e:
    build.build('synthetic_av', raw, data_dir)
  assert path in str(e.value)
  _nothing_complete(data_dir)


@pytest.mark.parametrize('beam_options', [None, 'runner=DirectRunner'])
def test_no_training_window_kept_is_a_clear_error(micro, tmp_path, beam_options):
  """The micro videos (70-90 frames) are too short for the default keep rule (8 valid clips); a Beam
  build says the same."""
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(DataError, match=re.escape(f'split train of {micro}: no window kept (')):
    build.build('synthetic_av', micro, data_dir, beam_pipeline_options=beam_options)
  _nothing_complete(data_dir)


# ------------------------------------------------------------ crop folders
def test_missing_crop_folder(raw):
  shutil.rmtree(os.path.join(raw, 'cropped_aligned', 'syn001'))  # a training video
  stats = {}
  plans = tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True, stats)
  assert 'syn001' not in [p.name for p in plans['train']]
  assert stats['train'].counts['videos_without_crop_folder'] == 1
  assert any('cropped_aligned/syn001' in m for m in stats['train'].messages)
  video = _val_video(raw)  # a validation video
  shutil.rmtree(os.path.join(raw, 'cropped_aligned', video))
  with pytest.raises(DataError, match='missing crop folder') as e:
    tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True)
  assert os.path.join(raw, 'cropped_aligned', video) in str(e.value)


def test_empty_crop_folder_is_treated_as_a_missing_one(raw):
  folder = os.path.join(raw, 'cropped_aligned', 'syn001')  # a training video
  shutil.rmtree(folder)
  os.makedirs(folder)
  stats = {}
  plans = tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True, stats)
  assert 'syn001' not in [p.name for p in plans['train']]
  assert stats['train'].counts['videos_without_crops'] == 1
  assert any(folder in m and 'holds no face crop' in m for m in stats['train'].messages)
  video = _val_video(raw)  # a validation video
  folder = os.path.join(raw, 'cropped_aligned', video)
  for name in os.listdir(folder):
    os.remove(os.path.join(folder, name))
  with pytest.raises(DataError, match='holds no') as e:
    tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True)
  assert folder in str(e.value)


def test_a_skipped_training_video_is_reported_once_with_its_reason(raw):
  """A training video skipped for an empty crop folder is not also a folder 'in no split'."""
  folder = os.path.join(raw, 'cropped_aligned', 'syn001')
  shutil.rmtree(folder)
  os.makedirs(folder)
  stats = {}
  tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True, stats)
  named = [m for s in stats.values() for m in s.messages if 'syn001' in m]
  assert len(named) == 1 and 'holds no face crop' in named[0], named
  assert not any(s.counts['crop_folders_in_no_split'] for s in stats.values())


def _pixels(jpeg: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(jpeg)), np.float32)


def test_a_training_video_that_detection_skips_is_reported_once_with_its_reason(raw, tmp_path, caplog):
  """--crops=detect without a raw video: the build says once that it skips the video, and why."""
  shutil.rmtree(os.path.join(raw, 'cropped_aligned', 'syn001'))
  os.remove(os.path.join(raw, 'raw_videos', 'syn001.mp4'))
  with caplog.at_level('INFO'):
    builder = build.build('synthetic_av', raw, str(tmp_path / 'tfds'), min_valid_clips=1, crops='detect')
  named = [m for s in builder.build_stats.values() for m in s.messages if 'syn001' in m]
  assert len(named) == 1 and 'no raw video for syn001' in named[0] and 'skipped' in named[0], named
  warned = [r.getMessage() for r in caplog.records if r.levelno >= 30 and 'syn001' in r.getMessage()]
  assert len(warned) == 1, warned


def _crops(raw, video):
  folder = os.path.join(raw, 'cropped_aligned', video)
  return folder, sorted(os.listdir(folder))


def test_every_file_of_a_crop_folder_is_used_or_reported(raw, tmp_path):
  """A PNG among the JPEGs is a face (converted and counted); files that are not crops are counted,
  named unless they are file-system litter, and change nothing."""
  reference, _ = _pipeline(raw, str(tmp_path / 'tfds_ref'), 'train')
  folder, names = _crops(raw, 'syn001')
  jpeg = os.path.join(folder, names[10])
  original = open(jpeg, 'rb').read()
  Image.open(jpeg).save(jpeg.replace('.jpg', '.png'), format='PNG')
  os.remove(jpeg)
  for name in ('notes.txt', 'frame_00001.jpg', 'Thumbs.db', '.DS_Store'):
    _write(os.path.join(folder, name), 'x')
  builder = build.make_builder('synthetic_av', str(tmp_path / 'tfds'), min_valid_clips=1)
  plans = tfds_builder.plan_splits(raw, builder.builder_config, True, builder.build_stats)
  out = dict(builder._generate_examples(plans['train'], builder.generation_settings('train', raw)))
  counts = builder.build_stats['train'].counts
  assert counts['reencoded_jpegs'] == 1 and counts['unreadable_jpegs'] == 0
  assert out.keys() == reference.keys()
  used = 0
  for key, ex in reference.items():  # the PNG's frame where the JPEG's was, the rest unchanged
    for ref_jpeg, jpeg in zip(ex['video'], out[key]['video']):
      if ref_jpeg != original:
        assert jpeg == ref_jpeg
      else:
        used += 1
        assert np.abs(_pixels(jpeg) - _pixels(original)).mean() < 2
  assert used
  assert counts['crop_folder_other_entries'] == 2 and counts['crop_folder_system_files'] == 2
  messages = builder.build_stats['train'].messages
  named = [m for m in messages if folder in m]
  assert len(named) == 1 and 'notes.txt' in named[0] and 'frame_00001.jpg' in named[0], messages
  assert any('2 file-system files' in m for m in messages)


def test_two_files_for_one_frame_stop_the_build_naming_them(raw):
  folder, names = _crops(raw, 'syn001')
  frame = int(names[3].split('.')[0])
  shutil.copy(os.path.join(folder, names[3]), os.path.join(folder, f'{frame}.jpg'))
  shutil.copy(os.path.join(folder, names[3]), os.path.join(folder, f'{frame:04d}.png'))
  with pytest.raises(DataError) as e:
    tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True)
  message = str(e.value)
  assert folder in message and f'frame {frame}:' in message
  assert all(name in message for name in (names[3], f'{frame}.jpg', f'{frame:04d}.png')), message


def test_video_missing_from_the_sidecar(raw):
  path = os.path.join(raw, 'corruptions.json')
  with open(path) as f:
    side = json.load(f)
  del side['videos']['syn001']
  _write(path, json.dumps(side))
  with pytest.raises(DataError, match='syn001'):
    tfds_builder.plan_splits(raw, tfds_builder.AvConfig(name='t'), True)


# ------------------------------------------------- skipped and counted
def _write_mp4(path, num_frames, fps, audio_seconds=None, sr=44_100):
  """A raw video with `num_frames` frames and, unless None, `audio_seconds` of a tone."""
  with av.open(path, 'w') as c:
    vs = c.add_stream('mpeg4', rate=int(fps))
    vs.width = vs.height = 16
    vs.pix_fmt = 'yuv420p'
    ast = None
    if audio_seconds is not None:
      ast = c.add_stream('aac', rate=sr)
      ast.layout = 'mono'
    for _ in range(num_frames):
      for p in vs.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), 99, np.uint8), format='rgb24')):
        c.mux(p)
    for p in vs.encode():
      c.mux(p)
    if ast is not None:
      y = (0.3 * np.sin(2 * np.pi * 300 * np.arange(int(audio_seconds * sr)) / sr)).astype(np.float32)
      for i in range(0, len(y), 1024):
        fr = av.AudioFrame.from_ndarray(y[None, i : i + 1024], format='fltp', layout='mono')
        fr.sample_rate, fr.pts = sr, i
        for p in ast.encode(fr):
          c.mux(p)
      for p in ast.encode():
        c.mux(p)


def test_skippable_defects_are_counted_and_the_build_completes(raw, tmp_path):
  side = _side(raw)
  val = _val_video(raw)
  test = next(v for v, d in side.items() if d['split'] == 'test')
  vids = os.path.join(raw, 'raw_videos')
  # Train: one video without a crop folder; the `_left`/`_right` pair's video has no audio stream.
  shutil.rmtree(os.path.join(raw, 'cropped_aligned', 'syn001'))
  n = side['syn000_left']['num_frames']
  _write_mp4(os.path.join(vids, 'syn000.mp4'), n, 30)
  # Validation: the audio track stops half-way through the video.
  nv, fps = side[val]['num_frames'], side[val]['fps']
  _write_mp4(os.path.join(vids, val + '.mp4'), nv, fps, audio_seconds=nv / fps / 2)
  # Test: an unreadable JPEG, and a raw video cut off after 2000 bytes.
  crops = os.path.join(raw, 'cropped_aligned', test)
  bad_jpeg = os.path.join(crops, sorted(os.listdir(crops))[5])
  _write(bad_jpeg, 'not a jpeg')
  with open(os.path.join(vids, test + '.mp4'), 'rb') as f:
    head = f.read(2000)
  with open(os.path.join(vids, test + '.mp4'), 'wb') as f:
    f.write(head)

  builder = build.build('synthetic_av', raw, str(tmp_path / 'tfds'), min_valid_clips=1)
  stats = {k: dict(v.counts) for k, v in builder.build_stats.items()}
  assert stats['train']['videos_without_crop_folder'] == 1
  assert stats['train']['audio_no_audio_stream'] == 2  # both people of the pair
  assert stats['validation']['audio_truncated'] == 1
  assert stats['test']['unreadable_jpegs'] == 1
  assert stats['test']['audio_unreadable'] == 1
  assert stats['test']['length_from_crops'] == 1
  assert stats['test']['raw_video_unreadable'] == 1 and 'fps_not_from_container' not in stats['test']
  truncated = os.path.join(vids, test + '.mp4')
  first = next(m for m in builder.build_stats['test'].messages if truncated in m)
  assert first.startswith(f'cannot open raw video {truncated} (') and 'frame count not checked' in first
  messages = [m for v in builder.build_stats.values() for m in v.messages]
  assert any(bad_jpeg in m for m in messages)
  assert any(os.path.join(vids, 'syn000.mp4') in m for m in messages)

  data = {
    split: list(builder.as_dataset(split=split).as_numpy_iterator())
    for split in ('train', 'validation', 'test')
  }
  assert {ex['video_name'] for ex in data['train']} == {b'syn000_left', b'syn000_right'}
  for ex in data['train']:  # no audio: silence
    np.testing.assert_allclose(ex['audio'], SILENCE, atol=1e-5)
  half = nv / 2  # truncated half-way
  silent = sounding = 0
  for ex in data['validation']:
    for c, k in enumerate(ex['end_frame']):
      if k > half + 2 + 35:  # the clip lies entirely after the audio's end
        np.testing.assert_allclose(ex['audio'][c], SILENCE, atol=1e-5)
        silent += 1
      elif 0 < k < half - 2:
        assert ex['audio'][c].max() > SILENCE + 1
        sounding += 1
  assert silent and sounding
  ends = np.concatenate([ex['end_frame'] for ex in data['test']])
  last_crop = max(int(f[:5]) for f in os.listdir(crops))
  np.testing.assert_array_equal(np.sort(ends[ends > 0]), np.arange(1, last_crop + 1))


def test_failure_in_the_middle_of_a_build_leaves_nothing_complete(raw, tmp_path, monkeypatch):
  real = examples.video_examples
  calls = []

  def failing(video, *args, **kwargs):
    calls.append(video.name)
    if len(calls) == 4:  # the first validation video: train is written
      raise DataError(f'simulated failure on {video.name}')
    return real(video, *args, **kwargs)

  monkeypatch.setattr(examples, 'video_examples', failing)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(DataError, match='simulated'):
    build.build('synthetic_av', raw, data_dir, min_valid_clips=1)
  assert len(calls) == 4
  _nothing_complete(data_dir)


# --------------------------------------------------------- aff_wild2 builder
# ------------------------------------------ a data dir that holds the dataset already
def test_building_a_version_that_exists(micro, tmp_path):
  """Complete: nothing to do, said so. Incomplete: a DataError saying why, and --overwrite. Finished
  by another build while this one ran: a DataError saying so, not tfds's FileExistsError."""
  first = build.build('synthetic_av', micro, str(tmp_path / 'a'), min_valid_clips=1)
  again = build.build('synthetic_av', str(tmp_path / 'nowhere'), str(tmp_path / 'a'), min_valid_clips=1)
  assert again.reused and not first.reused
  said = build.reused_message(again)
  assert str(first.data_dir) in said and 'already exists and is complete' in said and '--overwrite' in said

  half = tmp_path / 'b' / 'synthetic_av' / 'sr44100_keep1' / '1.0.0'
  half.mkdir(parents=True)
  with pytest.raises(
    DataError, match=r'holds no complete dataset \(no dataset_info.json\).*--overwrite'
  ) as e:
    build.build('synthetic_av', micro, str(tmp_path / 'b'), min_valid_clips=1)
  assert str(half) in str(e.value)

  real = tfds_builder.AvLayoutBuilder._split_generators

  def other_build_finishes_first(self, dl_manager):
    shutil.copytree(first.data_dir, os.path.join(tmp_path, 'c', 'synthetic_av', 'sr44100_keep1', '1.0.0'))
    return real(self, dl_manager)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds_builder.AvLayoutBuilder, '_split_generators', other_build_finishes_first)
    with pytest.raises(DataError) as e:
      build.build('synthetic_av', micro, str(tmp_path / 'c'), min_valid_clips=1)
  message = str(e.value)
  assert 'another build' in message and '(complete: train ' in message and '--overwrite' in message


def test_data_build_reports_a_user_error_in_one_line(tmp_path):
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'data.build',
      '--dataset=aff_wild2',
      f'--manual_dir={tmp_path / "none"}',
      f'--data_dir={tmp_path / "tfds"}',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert run.returncode == 1 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert (
    run.stderr.strip().splitlines()[-1]
    == f'error: manual directory {tmp_path / "none"} does not exist (docs/DATA.md: the raw layout)'
  )


def test_aff_wild2_builder_reads_the_layout(micro, tmp_path):
  """The Aff-Wild2 builder on an Aff-Wild2-layout folder, at 16 kHz: no corruption flags. What an
  interrupted earlier build left beside it is removed; a build running now in another process is not."""
  config_dir = tmp_path / 'tfds' / 'aff_wild2' / 'sr16000_keep1'
  stale, running = config_dir / 'incomplete.0123abcd_1.0.0', config_dir / 'incomplete.4567ef01_1.0.0'
  for folder in (stale, running):
    folder.mkdir(parents=True)
    (folder / 'aff_wild2-train.tfrecord-00000-of-00001').write_bytes(b'partial')
  os.utime(stale, (1_000_000_000, 1_000_000_000))
  os.utime(running, (4_000_000_000, 4_000_000_000))
  builder = build.build('aff_wild2', micro, str(tmp_path / 'tfds'), sample_rate=16_000, min_valid_clips=1)
  assert not stale.exists() and running.exists()
  assert builder.name == 'aff_wild2' and builder.builder_config.name == 'sr16000_keep1'
  assert builder.info.features['audio'].shape == (16, 64, 104)
  assert set(builder.info.splits) == {'train', 'validation', 'test'}
  names = set()
  for split in ('train', 'validation', 'test'):
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      names.add(ex['video_name'].decode())
      assert not ex['corrupt_video'].any() and not ex['corrupt_audio'].any()
      assert ex['video'].shape == (128, 112, 112, 3)
  assert names == set(_side(micro))


def test_builders_load_like_the_tfds_cli():
  """`tfds build data/<name>` imports `<name>.<name>_dataset_builder` with data/ on sys.path."""
  data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')
  with tfds.core.utils.add_sys_path(data):
    for name in ('synthetic_av', 'aff_wild2'):
      cls = tfds.core.community.builder_cls_from_module(f'{name}.{name}_dataset_builder')
      assert cls.name == name
      assert [c.name for c in cls.BUILDER_CONFIGS] == ['sr44100', 'sr16000']


def test_making_a_builder_leaves_no_temporary_directory(tmp_path, monkeypatch):
  """tfds looks for a dataset not built yet on its bucket through a temporary directory it never
  deletes; our builders skip that lookup (and keep the description from their README.md)."""
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  builder = build.make_builder('synthetic_av', str(tmp_path / 'data'))
  assert list(scratch.iterdir()) == []
  assert builder.info.description.strip()


# ------------------------------------------------------- damage in many ways
def _pipeline(root, data_dir, split):
  """What a build does short of writing: plan every split, then generate the examples of `split`."""
  builder = build.make_builder('synthetic_av', data_dir, min_valid_clips=1)
  plans = tfds_builder.plan_splits(root, builder.builder_config, True, builder.build_stats)
  out = dict(builder._generate_examples(plans[split], builder.generation_settings(split, root)))
  return out, [m for s in builder.build_stats.values() for m in s.messages]


def _same(a, b):
  if a.keys() != b.keys():
    return False
  for key, ex in a.items():
    for name, value in ex.items():
      if isinstance(value, list) and value != b[key][name]:
        return False
      if not isinstance(value, list) and not np.array_equal(np.asarray(value), np.asarray(b[key][name])):
        return False
  return True


def _damage(path, how, rng):
  """One kind of damage. Flips touch text only: a flipped byte inside JPEG or mp4 payload decodes to
  other pixels or samples, which no reader can tell from real ones without a checksum."""
  data = open(path, 'rb').read()
  if how == 'truncate':
    open(path, 'wb').write(data[: len(data) // 2])
  elif how == 'flip':
    i = int(rng.integers(0, max(1, len(data) - 8)))
    open(path, 'wb').write(data[:i] + bytes(b ^ 0xFF for b in data[i : i + 8]) + data[i + 8 :])
  elif how == 'delete':
    os.remove(path)
  elif how == 'empty':
    open(path, 'wb').close()
  elif how == 'rename':
    os.rename(path, path + '.bak')
  elif how == 'latin1':
    open(path, 'wb').write(data.replace(b'0', b'\xe9', 1))
  elif how == 'non_finite':
    open(path, 'wb').write(data.replace(b'\n0', b'\nnan', 1))
  elif how == 'small_image':
    Image.new('RGB', (40, 40)).save(path, format='JPEG')


def test_damaged_inputs_never_pass_silently(micro, tmp_path):
  """A valid tree damaged in many ways: each outcome names the damaged file (or its video) in a
  DataError or in a counted build message, or leaves every example exactly as it was."""
  val = _val_video(micro)
  crop = lambda video, i: os.path.join(
    'cropped_aligned', video, sorted(os.listdir(os.path.join(micro, 'cropped_aligned', video)))[i]
  )
  cases = [  # (file relative to the tree, its video, the split whose examples it feeds, damages)
    (
      os.path.join(VA, 'Train_Set', 'syn001.txt'),
      'syn001',
      'train',
      ('truncate', 'flip', 'latin1', 'non_finite', 'delete'),
    ),
    (os.path.join(VA, 'Validation_Set', f'{val}.txt'), val, 'validation', ('empty', 'rename')),
    (crop('syn001', 3), 'syn001', 'train', ('truncate', 'empty', 'small_image')),  # a missing crop is no face
    (crop(val, 10), val, 'validation', ('empty', 'small_image')),
    ('corruptions.json', val, 'validation', ('truncate', 'flip', 'delete')),
    (os.path.join('raw_videos', f'{val}.mp4'), val, 'validation', ('truncate', 'empty', 'delete')),
  ]
  references, rng = {}, np.random.default_rng(0)
  for k, (relative, video, split, ways) in enumerate(cases):
    if split not in references:
      references[split] = _pipeline(micro, str(tmp_path / 'tfds_ref'), split)[0]
    for how in ways:
      root = str(tmp_path / f'raw_{k}_{how}')
      shutil.copytree(micro, root)
      path = os.path.join(root, relative)
      _damage(path, how, rng)
      try:
        out, messages = _pipeline(root, str(tmp_path / f'tfds_{k}_{how}'), split)
      except DataError as e:
        assert path in str(e) or video in str(e) or os.path.dirname(path) in str(e), (how, path, str(e))
        continue
      named = [m for m in messages if path in m or video in m]
      assert named or _same(out, references[split]), (
        f'{how} {path}: the result changed and no message names it'
      )


# ------------------------------------------------------------ Apache Beam
TWO_WORKERS = 'runner=DirectRunner,direct_running_mode=multi_processing,direct_num_workers=2'


def _decoded(builder) -> dict:
  """{split: {(video, clip ends): example}} of a built dataset, every feature decoded."""
  return {
    split: {
      (ex['video_name'], tuple(ex['end_frame'])): ex
      for ex in builder.as_dataset(split=split).as_numpy_iterator()
    }
    for split in builder.info.splits
  }


def _shards(builder) -> dict[str, bytes]:
  folder = str(builder.data_dir)
  return {
    name: open(os.path.join(folder, name), 'rb').read() for name in os.listdir(folder) if '.tfrecord' in name
  }


def _beam_build(raw: str, data_dir: str):
  """A Beam build with 2 worker processes, built once more if the runner lost examples (apache-beam
  2.78's DirectRunner did on this machine, docs/DATA.md; the builder's check stops such a build)."""
  for attempt in range(2):
    try:
      return build.build('synthetic_av', raw, data_dir, min_valid_clips=1, beam_pipeline_options=TWO_WORKERS)
    except DataError as e:
      if 'the Beam runner wrote' not in str(e) or attempt:
        raise


@pytest.mark.heavy
def test_worker_and_beam_builds_give_the_one_process_builds_examples_counts_and_errors(raw, tmp_path):
  """The same raw set built in this process, by 2 worker processes (the same shards, byte for byte)
  and by Beam with 2 worker processes (equal examples, split sizes, metadata and counted skips); a bad
  input a worker meets stops every build with the one-process build's error and leaves no dataset."""
  side = _side(raw)
  shutil.rmtree(os.path.join(raw, 'cropped_aligned', 'syn001'))  # skipped while planning
  test = next(v for v, d in side.items() if d['split'] == 'test')
  crops = os.path.join(raw, 'cropped_aligned', test)
  bad_jpeg = os.path.join(crops, sorted(os.listdir(crops))[5])
  _write(bad_jpeg, 'not a jpeg')  # skipped while making windows
  plain = build.build('synthetic_av', raw, str(tmp_path / 'plain'), min_valid_clips=1)
  workers = build.build('synthetic_av', raw, str(tmp_path / 'workers'), min_valid_clips=1, num_workers=2)
  beam = build.build(
    'synthetic_av', raw, str(tmp_path / 'beam'), min_valid_clips=1, beam_pipeline_options=TWO_WORKERS
  )
  assert _shards(workers) == _shards(plain)
  stats = lambda builder: {k: dict(v.counts) for k, v in builder.build_stats.items()}
  assert stats(workers) == stats(plain) == stats(beam) and stats(beam)['test']['unreadable_jpegs'] == 1
  assert any(bad_jpeg in m for m in workers.build_stats['test'].messages)
  sizes = lambda builder: {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes(beam) == sizes(plain)
  assert beam.info.metadata == plain.info.metadata and repr(beam.info.features) == repr(plain.info.features)
  ours, theirs = _decoded(beam), _decoded(plain)
  for split in theirs:
    assert ours[split].keys() == theirs[split].keys()
    for key, example in theirs[split].items():
      for name, value in example.items():
        np.testing.assert_array_equal(ours[split][key][name], value, err_msg=f'{split} {key} {name}')

  # The first training video's audio holds NaN: every build stops with the one-process build's error.
  os.remove(os.path.join(raw, 'raw_videos', 'syn000.mp4'))  # the audio of syn000_left and _right
  samples = np.zeros(44_100 * 10, np.float32)
  samples[:1000] = np.nan
  sf.write(os.path.join(raw, 'raw_videos', 'syn000.wav'), samples, 44_100, subtype='FLOAT')
  expected = (
    'syn000_left: the window of frames 1-65 (the clip ending at frame 1) has non-finite audio samples: '
    f'the track decoded from {os.path.join(raw, "raw_videos", "syn000.wav")} holds NaN or infinity'
  )
  for name, options in (
    ('plain2', {}),
    ('workers2', {'num_workers': 2}),
    ('beam2', {'beam_pipeline_options': TWO_WORKERS}),
  ):
    with pytest.raises(DataError) as error:
      build.build('synthetic_av', raw, str(tmp_path / name), min_valid_clips=1, **options)
    assert str(error.value) == expected, name
    _nothing_complete(str(tmp_path / name))


def test_a_beam_build_that_lost_examples_is_an_error():
  """What tfds wrote against what the workers made: the check that keeps a runner's loss from
  becoming a complete-looking dataset."""
  stats = {'train': examples.BuildStats()}
  stats['train'].count('windows', 12)
  written = tfds.core.SplitInfo(name='train', shard_lengths=[5, 5], num_bytes=0, filename_template=None)
  with pytest.raises(DataError, match='wrote 10 examples of split train but its workers made 12'):
    tfds_builder.check_beam_output([written], stats)
  stats['train'].count('windows', -2)
  tfds_builder.check_beam_output([written], stats)


def test_the_faster_float_serialization_writes_tfds_bytes():
  """serialization.packed_floats against tfds's own serializer: the same bytes for every kind of
  feature the builders write, floats of any shape included."""
  features = tfds.features.FeaturesDict(
    {
      'audio': tfds.features.Tensor(shape=(2, 3, 4), dtype=np.float32),
      'empty': tfds.features.Tensor(shape=(0,), dtype=np.float32),
      'mask': tfds.features.Tensor(shape=(3,), dtype=np.bool_),
      'end': tfds.features.Tensor(shape=(3,), dtype=np.int32),
      'name': tfds.features.Text(),
    }
  )
  rng = np.random.default_rng(0)
  example = features.encode_example(
    {
      'audio': rng.normal(size=(2, 3, 4)).astype(np.float32) * 1e30,
      'empty': np.zeros(0, np.float32),
      'mask': np.array([True, False, True]),
      'end': np.array([1, -2, 300], np.int32),
      'name': 'syn000_left',
    }
  )
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  expected = serializer.serialize_example(example)
  with serialization.packed_floats():
    assert example_serializer._item_to_tf_feature is serialization._item_to_tf_feature  # in use
    assert serializer.serialize_example(example) == expected
  assert example_serializer._item_to_tf_feature is not serialization._item_to_tf_feature  # restored
