"""Evaluation metrics (NumPy) against independent computations: NumPy, audmetric, scipy."""

import audmetric
import numpy as np
import pytest
import scipy.ndimage

from iaca_jax import metrics


def reference_ccc(x: np.ndarray, y: np.ndarray) -> float:
  """CCC written out with NumPy's biased (population) covariance."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cov = np.cov(x, y, bias=True)
  return 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (x.mean() - y.mean()) ** 2)


# ----------------------------------------------------------------------------- smoothing


@pytest.mark.parametrize('size', [1, 2, 3, 4, 5, 20, 21, 49, 50])
@pytest.mark.parametrize('length', [1, 7, 19, 20, 49, 50, 51, 123, 1000])
def test_smoothing_matches_scipy(size, length):
  x = np.random.default_rng(size * 1000 + length).uniform(-1.5, 1.5, length)  # some values get clipped
  want = scipy.ndimage.uniform_filter1d(np.clip(x, -1, 1), size=size, mode='constant', cval=0.0)
  np.testing.assert_allclose(metrics.postprocess_video(x, size), want, rtol=0, atol=1e-12)


def test_smoothing_long_sequence_and_centring():
  x = np.random.default_rng(8).uniform(-1, 1, 50_000) * 0.5 + 0.5  # mostly positive: cumsum grows
  for size in (20, 50):
    want = scipy.ndimage.uniform_filter1d(x, size=size, mode='constant', cval=0.0)
    np.testing.assert_allclose(metrics.postprocess_video(x, size), want, rtol=0, atol=1e-10)
  impulse = np.zeros(10)
  impulse[5] = 1.0  # even size 4 covers [i - 2, i + 1]: output i sees frame 5 for i in 4..7
  np.testing.assert_allclose(metrics.postprocess_video(impulse, 4), np.r_[[0] * 4, [0.25] * 4, [0] * 2])


@pytest.mark.parametrize('size', [1, 4, 5, 20, 50])
def test_shrinking_ends_average_only_the_frames_that_exist(size):
  """predict's smoothing: a constant stays constant to the last frame (the challenge's zero padding
  pulls the ends toward 0); inside, the same as the evaluation's."""
  x = np.random.default_rng(size).uniform(-1.5, 1.5, 123)
  clipped, half = np.clip(x, -1, 1), size // 2
  want = [clipped[max(0, i - half) : i + (size - 1) // 2 + 1].mean() for i in range(len(x))]
  np.testing.assert_allclose(metrics.postprocess_video(x, size, ends='shrink'), want, atol=1e-12)
  np.testing.assert_allclose(metrics.postprocess_video(np.full(30, 0.75), size, ends='shrink'), 0.75)
  inner = slice(half, len(x) - size)
  np.testing.assert_allclose(
    metrics.postprocess_video(x, size, 'shrink')[inner], metrics.postprocess_video(x, size)[inner]
  )
  if size > 1:
    assert metrics.postprocess_video(np.full(30, 0.75), size)[0] < 0.75  # the evaluation's zero padding


def test_postprocess_default_windows():
  rng = np.random.default_rng(9)
  v, a = rng.uniform(-1.2, 1.2, (2, 300))
  sv, sa = metrics.postprocess(np.stack([v, a], -1)).T
  np.testing.assert_allclose(
    sv, scipy.ndimage.uniform_filter1d(np.clip(v, -1, 1), 20, mode='constant'), atol=1e-12
  )
  np.testing.assert_allclose(
    sa, scipy.ndimage.uniform_filter1d(np.clip(a, -1, 1), 50, mode='constant'), atol=1e-12
  )


def test_clips_to_frames_puts_clip_predictions_back_on_frames():
  clips = {
    'video_name': np.array([b'a', b'a']),
    'end_frame': np.array([[1, 3], [2, 0]]),
    'predictions': np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [9, 9]]]),
    'frame_labels': np.array([[[0.0, 0.1], [0.2, 0.3]], [[0.4, 0.5], [0, 0]]]),
    'frame_mask': np.array([[True, False], [True, False]]),
    'corrupt_video': np.array([[False, True], [False, False]]),
    'corrupt_audio': np.zeros((2, 2), bool),
    'silenced': np.zeros((2, 2), bool),
  }
  frames = metrics.clips_to_frames(clips)['a']
  np.testing.assert_array_equal(frames['predictions'], [[0.1, 0.2], [0.5, 0.6], [0.3, 0.4]])
  np.testing.assert_array_equal(frames['labels'], [[0.0, 0.1], [0.4, 0.5], [-5, -5]])
  np.testing.assert_array_equal(frames['corrupt_video'], [False, False, True])
  clips['end_frame'] = np.array([[1, 3], [3, 0]])
  with pytest.raises(ValueError, match='predicted twice'):
    metrics.clips_to_frames(clips)


def test_score_clips_from_clips_to_the_split_ccc():
  """Clips of two videos -> frames -> CCC without smoothing, against the CCC of the known per-frame values."""
  end = np.array([[1, 2, 3], [4, 5, 0], [1, 2, 3]])
  names = np.array([b'a', b'a', b'b'])
  value = lambda video, f: [{'a': 0.0, 'b': 0.5}[video] + f / 10, -({'a': 0.0, 'b': 0.5}[video] + f / 10)]
  preds = np.array([[value(n.decode(), f) if f else [9.0, 9.0] for f in row] for n, row in zip(names, end)])
  labels = np.array(
    [
      [[0.1, 0.0], [0.2, 0.1], [0.4, -0.2]],
      [[0.3, 0.1], [0.6, -0.6], [0, 0]],
      [[0.7, -0.5], [0.6, -0.8], [0.9, -0.7]],
    ]
  )
  frame_mask = (end > 0) & ~((names[:, None] == b'a') & (end == 2))  # frame 2 of a unlabelled
  clips = {
    'video_name': names,
    'end_frame': end,
    'predictions': preds,
    'frame_labels': labels,
    'frame_mask': frame_mask,
    'corrupt_video': np.zeros_like(frame_mask),
    'corrupt_audio': end == 3,
  }
  frames = metrics.clips_to_frames(clips)
  result = metrics.frame_ccc(
    {n: v['predictions'] for n, v in frames.items()},
    {n: v['labels'] for n, v in frames.items()},
    windows=(1, 1),
  )
  keep = frame_mask & (end > 0)
  want_p, want_l = preds[keep], labels[keep]
  assert result['n_frames'] == keep.sum() == 7
  for d, name in enumerate(metrics.DIMENSIONS):
    want = reference_ccc(np.clip(want_p[:, d], -1, 1), want_l[:, d])
    assert result[f'ccc_{name}'] == pytest.approx(want, abs=1e-12)
  full = metrics.score_clips(clips)
  assert full['corrupt_audio/n_frames'] == (keep & (end == 3)).sum()
  assert full['clean_audio/n_frames'] == (keep & (end != 3)).sum()
  assert 'corrupt_video/n_frames' not in full


def test_frame_ccc_against_scipy_and_audmetric():
  rng = np.random.default_rng(10)
  lengths = {'v1': 37, 'v2': 120, 'v3_left': 300, 'v4': 5}
  labels, preds, corrupted = {}, {}, {}
  for video, n in lengths.items():
    lab = np.clip(np.cumsum(rng.normal(0, 0.1, (n, 2)), 0), -1, 1)
    start = rng.integers(0, n)
    lab[start : start + n // 5] = -5.0
    labels[video] = lab
    preds[video] = lab + rng.normal(0, 0.4, (n, 2))  # partly outside [-1, 1]
    if video != 'v4':
      corrupted[video] = rng.random(n) < 0.3
  want_p, want_l, want_c = [], [], []
  for video, lab in labels.items():
    smooth = np.stack(
      [
        scipy.ndimage.uniform_filter1d(np.clip(preds[video][:, d], -1, 1), w, mode='constant')
        for d, w in enumerate((20, 50))
      ],
      -1,
    )
    valid = (lab[:, 0] != -5) & (lab[:, 1] != -5)
    want_p.append(smooth[valid])
    want_l.append(lab[valid])
    want_c.append(corrupted.get(video, np.zeros(len(lab), bool))[valid])
  want_p, want_l, want_c = map(np.concatenate, (want_p, want_l, want_c))

  result = metrics.frame_ccc(preds, labels, subsets={'corrupted': corrupted})
  for d, name in enumerate(metrics.DIMENSIONS):
    assert result[f'ccc_{name}'] == pytest.approx(
      audmetric.concordance_cc(want_l[:, d], want_p[:, d]), abs=1e-10
    )
    sub = audmetric.concordance_cc(want_l[want_c, d], want_p[want_c, d])
    assert result[f'corrupted/ccc_{name}'] == pytest.approx(sub, abs=1e-10)
  assert result['ccc_mean'] == pytest.approx((result['ccc_valence'] + result['ccc_arousal']) / 2)
  assert result['n_frames'] == len(want_l) and result['corrupted/n_frames'] == want_c.sum()

  # A labelled frame without a prediction is an error naming the video, not a NaN in the result.
  preds['v2'] = preds['v2'].copy()
  preds['v2'][np.flatnonzero(labels['v2'][:, 0] != -5)[3]] = np.nan
  with pytest.raises(ValueError, match='v2.*no finite prediction'):
    metrics.frame_ccc(preds, labels)
