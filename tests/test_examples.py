"""Per-video example assembly on a hand-made 40-frame video (no files, no tfds)."""

import re

import numpy as np
import pytest
from PIL import Image

from iaca_jax.preprocessing import DataError, examples, mel

N = 40
SILENCE = (-100 + 14.8) / 19.895


def _video(with_labels=True, corrupt=False):
  frames = [f for f in range(1, N + 1) if not 10 <= f <= 20]  # no face on frames 10..20
  labels = np.stack([np.arange(1, N + 1) / 100, -np.arange(1, N + 1) / 100], 1).astype(np.float32)
  labels[34:36] = -5  # frames 35, 36 invalid
  face = np.zeros(N, bool)
  face[:20] = True  # frames 1..20 corrupted
  return examples.VideoInput(
    name='vid',
    num_frames=N,
    fps=30.0,
    crops={f: b'jpeg%d' % f for f in frames},
    audio=np.zeros(int(N / 30 * 44_100), np.float32),
    labels=labels if with_labels else None,
    corrupt_face=face if corrupt else None,
    corrupt_audio=np.zeros(N, bool) if corrupt else None,
  )


def _run(video, train, min_valid_clips=8):
  return dict(
    examples.video_examples(video, mel.mel_settings(44_100), train=train, min_valid_clips=min_valid_clips)
  )


def test_eval_windows_hand_worked():
  out = _run(_video(corrupt=True), train=False)
  assert len(out) == 32  # first clip ends at 1..32
  w0 = out['vid/000481']
  assert w0['end_frame'].tolist() == [1, 33] + [0] * 14
  # Clip ending at 1: only frame 1 present -> repeated 8 times.
  assert w0['video'][:8] == [b'jpeg1'] * 8
  # Clip ending at 33: frames 2..33 minus 10..20 = 21 present -> every 2nd back from 33.
  assert w0['video'][8:16] == [b'jpeg%d' % f for f in (8, 21, 23, 25, 27, 29, 31, 33)]
  # Padding clips hold the zero frame.
  assert set(w0['video'][16:]) == {examples.zero_frame_jpeg()}
  np.testing.assert_allclose(w0['labels'][:2], [[0.01, -0.01], [0.33, -0.33]])
  assert w0['mask'].tolist() == [True, True] + [False] * 14
  np.testing.assert_array_equal(w0['frame_labels'], w0['labels'])
  assert w0['frame_mask'].tolist() == w0['mask'].tolist()
  # Corrupted face frames 1..20: clip ending at 33 has 19 of 32 -> corrupted; clip ending at 1 has 1.
  assert w0['corrupt_video'].tolist() == [False, True] + [False] * 14
  assert not w0['corrupt_audio'].any()
  assert w0['video_name'] == 'vid'
  assert w0['audio'].shape == (16, 64, 104)
  np.testing.assert_allclose(w0['audio'], SILENCE, atol=1e-6)  # silent track, padding clips
  # Window 2: clip ending at 35 -> its last chosen frame (35) is labelled -5: masked in eval.
  w2 = out['vid/000483']
  assert w2['end_frame'][:2].tolist() == [3, 35]
  assert w2['mask'][:2].tolist() == [True, False]
  assert w2['frame_mask'][:2].tolist() == [True, False]
  np.testing.assert_array_equal(w2['labels'][1], [0, 0])
  assert w2['video'][15] == b'jpeg35'
  # Window 19: clip ending at 20 (frames 1..20, faces 1..9): last 8 present, label of frame 9.
  w19 = out['vid/000500']
  assert w19['video'][:8] == [b'jpeg%d' % f for f in range(2, 10)]
  np.testing.assert_allclose(w19['labels'][0], [0.09, -0.09])
  np.testing.assert_allclose(w19['frame_labels'][0], [0.20, -0.20])
  assert w19['corrupt_video'][0]


def test_train_rules():
  # Training chooses among validly labelled frames: clip ending at 35 uses frame 34.
  out = _run(_video(), train=True, min_valid_clips=1)
  assert len(out) == 32
  w2 = out['vid/000483']
  assert w2['mask'][:2].tolist() == [True, True]
  np.testing.assert_allclose(w2['labels'][1], [0.34, -0.34])
  assert w2['video'][15] == b'jpeg34'
  assert not w2['frame_mask'][1]  # the end frame itself is still invalid
  # Keep rule: at most 2 valid clips per window here.
  assert len(_run(_video(), train=True, min_valid_clips=2)) == 8
  assert len(_run(_video(), train=True, min_valid_clips=3)) == 0
  assert len(_run(_video(), train=True)) == 0  # default: 8 of 16 clips


def test_test_split_has_no_labels():
  out = _run(_video(with_labels=False), train=False)
  assert len(out) == 32
  for ex in out.values():
    assert not ex['mask'].any() and not ex['frame_mask'].any()
    assert not ex['labels'].any() and not ex['frame_labels'].any()
    assert not ex['corrupt_video'].any() and not ex['corrupt_audio'].any()
  ends = np.concatenate([ex['end_frame'] for ex in out.values()])
  np.testing.assert_array_equal(np.sort(ends[ends > 0]), np.arange(1, N + 1))


def test_label_shape_mismatch_is_an_error():
  v = _video()
  v.labels = v.labels[:-1]
  with pytest.raises(ValueError):
    _run(v, train=False)


def test_crop_problems_are_named_and_counted_apart(tmp_path):
  """A zero-byte or non-image crop gives its reason; a resized crop is named; a grey one is counted."""

  paths = {
    1: tmp_path / 'empty.jpg',
    2: tmp_path / 'text.jpg',
    3: tmp_path / 'small.jpg',
    4: tmp_path / 'grey.jpg',
  }
  paths[1].write_bytes(b'')
  paths[2].write_text('not an image')
  Image.new('RGB', (64, 64), (90, 20, 200)).save(paths[3], format='JPEG')
  Image.new('L', (112, 112), 128).save(paths[4], format='JPEG')
  stats = examples.BuildStats()
  crops = examples.load_crops({k: str(v) for k, v in paths.items()}, 4, 'vid', stats)
  assert sorted(crops) == [3, 4]
  assert stats.counts['unreadable_jpegs'] == 2 and stats.counts['resized_jpegs'] == 1
  assert stats.counts['reencoded_jpegs'] == 1
  text = '\n'.join(stats.messages)
  assert f'{paths[1]} (empty file (0 bytes))' in text and f'{paths[2]} (not an image file' in text
  assert f'{paths[3]} resized from 64x64 to 112x112' in text and 'BytesIO' not in text


def test_non_finite_audio_stops_the_build_naming_the_video_window_clip_and_file():
  video = _video()
  video.audio_path = '/raw/vid.mp4'
  video.audio[int(20 / 30 * 44_100)] = np.nan  # inside the clips ending at frames 21 and later
  with pytest.raises(DataError) as e:
    _run(video, train=False)
  first_window = r'frames 1-\d+ \(the clip ending at frame (2[1-9]|[3-9]\d)\)'
  assert re.search(rf'^vid: the window of {first_window} has non-finite audio', str(e.value)), str(e.value)
  assert '/raw/vid.mp4' in str(e.value)
