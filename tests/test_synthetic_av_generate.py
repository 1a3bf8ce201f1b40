"""The synthetic generator: determinism from the seed and the Aff-Wild2 layout it writes."""

import hashlib
import json
import os

import av
import numpy as np
from PIL import Image

from data.synthetic_av import generate

SMALL = generate.Settings(
  num_train_videos=3, num_validation_videos=1, num_test_videos=1, min_frames=60, max_frames=70
)
VA = '6th_ABAW_Annotations/VA_Estimation_Challenge'


def _digest(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, root)] = hashlib.md5(fh.read()).hexdigest()
  return out


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
  a = generate.generate(str(tmp_path / 'a'), SMALL, seed=5)
  generate.generate(str(tmp_path / 'b'), SMALL, seed=5)
  c = generate.generate(str(tmp_path / 'c'), SMALL, seed=6)
  da, db, dc = (_digest(str(tmp_path / x)) for x in 'abc')
  assert da == db
  assert da != dc and a['videos'] != c['videos']
  assert not os.path.exists(str(tmp_path / 'a') + '.incomplete')


def test_layout(tmp_path):
  root = str(tmp_path / 'raw')
  side = generate.generate(root, SMALL, seed=0)['videos']
  assert {v: d['split'] for v, d in side.items()} == {
    'syn000_left': 'train',
    'syn000_right': 'train',
    'syn001': 'train',
    'syn002-24-640x360': 'validation',
    'syn003': 'test',
  }
  with open(os.path.join(root, VA, 'Test_Set.txt')) as f:
    assert f.read().split() == ['syn003']
  for video, d in side.items():
    n = d['num_frames']
    if d['split'] == 'test':
      path = os.path.join(root, 'synthetic_ground_truth', 'Test_Set', video + '.txt')
    else:
      path = os.path.join(
        root, VA, {'train': 'Train_Set', 'validation': 'Validation_Set'}[d['split']], video + '.txt'
      )
    with open(path) as f:
      lines = f.read().splitlines()
    assert lines[0] == 'valence,arousal' and len(lines) == n + 1
    labels = np.array([l.split(',') for l in lines[1:]], np.float32)
    invalid = {f for iv in d['invalid_labels'] for f in range(iv['start'], iv['end'] + 1)}
    assert {i + 1 for i in np.flatnonzero(labels[:, 0] == -5)} == invalid
    ok = labels[labels[:, 0] != -5]
    assert np.abs(ok).max() <= 1
    missing = {f for iv in d['face'] if iv['kind'] == 'missing' for f in range(iv['start'], iv['end'] + 1)}
    crops = sorted(int(f[:5]) for f in os.listdir(os.path.join(root, 'cropped_aligned', video)))
    assert crops == [f for f in range(1, n + 1) if f not in missing]
    with av.open(os.path.join(root, 'raw_videos', d['audio_source'] + '.mp4')) as c:
      assert c.streams.video[0].frames == n
      assert float(c.streams.video[0].average_rate) == d['fps']
      assert c.streams.audio[0].sample_rate == 44_100
  assert side['syn000_left']['audio_source'] == side['syn000_right']['audio_source'] == 'syn000'
  assert side['syn002-24-640x360']['fps'] == 24.0
  assert sorted(os.listdir(os.path.join(root, 'raw_videos'))) == [
    'syn000.mp4',
    'syn001.mp4',
    'syn002-24-640x360.mp4',
    'syn003.mp4',
  ]
  with open(os.path.join(root, 'corruptions.json')) as f:
    assert json.load(f)['format'] == 'synthetic_av_corruptions/1'


def _fit_and_errors(measure, truth, other, clean, inconsistent):
  """Maps a measured cue to the curve by a line fitted on clean frames; returns the mean error of
  that reading against the true curve and against the distractor curve on the inconsistent frames."""
  slope, offset = np.polyfit(measure[clean], truth[clean], 1)
  reading = slope * measure + offset
  assert np.corrcoef(reading[clean], truth[clean])[0, 1] > 0.9  # the cue is readable at all
  return np.abs(reading - truth)[inconsistent].mean(), np.abs(reading - other)[inconsistent].mean()


def test_inconsistent_intervals_follow_the_other_curve(tmp_path):
  """In an 'inconsistent' interval the face and the voice follow the distractor curves, not the labels:
  the arousal read from the pixels (mean red-minus-blue: the cheek flush) and from the audio (the
  loudest sample around each frame, in dB), each mapped to arousal on the clean frames, is closer to
  the distractor than to the label there."""
  settings = generate.Settings(
    num_train_videos=1,
    num_validation_videos=0,
    num_test_videos=0,
    min_frames=420,
    max_frames=420,
    corrupt_every=210,
    corrupt_frames=(50, 70),
    face_kinds=('inconsistent',),
    audio_kinds=('inconsistent',),
    audio_kind_probs=None,
    cross_cues=True,
  )
  root = str(tmp_path / 'raw')
  side = generate.generate(root, settings, seed=3)['videos']['syn000']
  n, fps = side['num_frames'], int(side['fps'])
  with open(os.path.join(root, VA, 'Train_Set', 'syn000.txt')) as f:
    labels = np.array([l.split(',') for l in f.read().splitlines()[1:]], np.float32)
  arousal, valid = labels[:, 1], labels[:, 0] != -5
  other = generate.distractor_curves(3, 0, 0, n, fps)[1]

  def frames(kind_key, margin):
    inside = np.zeros(n, bool)
    for iv in side[kind_key]:
      assert iv['kind'] == 'inconsistent'
      inside[max(iv['start'] - 1 + margin, 0) : max(iv['end'] - margin, 0)] = True
    return inside

  face_bad, audio_bad = frames('face', 0), frames('audio', 8)
  assert face_bad.any() and audio_bad.any()
  assert np.abs(arousal - other)[face_bad & valid].mean() > 0.2  # the check below can fail

  folder = os.path.join(root, 'cropped_aligned', 'syn000')
  flush = np.array(
    [np.asarray(Image.open(os.path.join(folder, f'{i:05d}.jpg')), np.float32) for i in range(1, n + 1)]
  )
  flush = (flush[..., 0] - flush[..., 2]).mean(axis=(1, 2))
  clean = valid & ~face_bad
  to_label, to_other = _fit_and_errors(flush, arousal, other, clean, face_bad & valid)
  assert to_other < 0.5 * to_label

  with av.open(os.path.join(root, 'raw_videos', 'syn000.mp4')) as c:
    audio = np.concatenate([fr.to_ndarray().reshape(-1) for fr in c.decode(audio=0)])
  sr = 44_100
  half = int(0.3 * sr)
  loud = np.array(
    [np.abs(audio[max(0, int(i / fps * sr) - half) : int(i / fps * sr) + half]).max() for i in range(n)]
  )
  loud_db = 20 * np.log10(loud + 1e-6)
  clean = valid & ~frames('audio', -20)
  to_label, to_other = _fit_and_errors(loud_db, arousal, other, clean, audio_bad & valid)
  assert np.abs(arousal - other)[audio_bad & valid].mean() > 0.2
  assert to_other < 0.5 * to_label
