"""Evaluation metrics and post-processing on the host, in NumPy float64 (docs/DESIGN.md, section 5).

The split-level protocol:

1. `clips_to_frames`: each frame takes the prediction of the clip that ends on it;
2. `postprocess` per video and dimension: clip to [-1, 1], then a zero-padded moving average of
   20 frames (valence) / 50 frames (arousal);
3. `frame_ccc`: CCC over the concatenation of all validly labelled frames of all videos.

`score_clips` runs the three on the output of `inference.predict_split`.

Protocols (`protocol=`): 'challenge' (default, the ABAW challenge's) scores only the frames whose
valence and arousal are both labelled. 'authors' follows the authors' released evaluation code, for
numbers set beside the paper's: a frame whose valence label is INVALID_LABEL (arousal is not
checked) stays in the video's arrays as the pair (prediction 0, label 0) in both dimensions, is
smoothed together with the real predictions, and counts in the CCC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.ndimage

INVALID_LABEL = -5.0
"""Label value of an invalid (unannotated) frame, in either dimension."""

PROTOCOLS = ('challenge', 'authors')

DIMENSIONS = ('valence', 'arousal')
DEFAULT_WINDOWS = (20, 50)
"""Moving-average lengths in frames for (valence, arousal)."""

FRAME_FLAGS = ('corrupt_video', 'corrupt_audio', 'silenced')
"""Per-clip flags carried onto the frames; each defines a subset of frames that is also scored."""


def concordance_cc(x: np.ndarray, y: np.ndarray) -> float:
  """Concordance correlation coefficient with population statistics, two-pass in float64.

  `CCC = 2 cov(x, y) / (var x + var y + (mean x - mean y)^2)`. Symmetric in x and y.

  Args:
    x, y: arrays of the same size (flattened).

  Returns:
    the CCC; NaN when there is no sample or the denominator is 0.
  """
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f'concordance_cc: sizes differ ({x.size} vs {y.size})')
  if x.size == 0:
    return float('nan')
  mx, my = x.mean(), y.mean()
  dx, dy = x - mx, y - my
  den = np.mean(dx * dx) + np.mean(dy * dy) + (mx - my) ** 2
  return float(2.0 * np.mean(dx * dy) / den) if den > 0 else float('nan')


def postprocess_video(pred_frames: np.ndarray, window: int, ends: str = 'zeros') -> np.ndarray:
  """One video's (N,) per-frame predictions of one dimension: clip to [-1, 1], then moving average.

  The average is centred as scipy centres it (`origin=0`: for an even window, output i covers frames
  i - window // 2 .. i + (window - 1) // 2). At the ends, `ends='zeros'` pads with zeros (the
  challenge's evaluation: the first and last window // 2 frames are pulled toward 0); `ends='shrink'`
  averages only the frames that exist (predict.py: no pull at the ends). window 1: no smoothing.
  Returns (N,) float64.
  """
  if window < 1:
    raise ValueError(f'postprocess_video: window must be >= 1, got {window}')
  if ends not in ('zeros', 'shrink'):
    raise ValueError(f"postprocess_video: ends must be 'zeros' or 'shrink', got {ends!r}")
  clipped = np.clip(np.asarray(pred_frames, np.float64), -1.0, 1.0)
  average = lambda x: scipy.ndimage.uniform_filter1d(x, size=window, mode='constant', cval=0.0)
  if ends == 'zeros':
    return average(clipped)
  return average(clipped) / average(np.ones_like(clipped))


def postprocess(
  predictions: np.ndarray, windows: Sequence[int] = DEFAULT_WINDOWS, ends: str = 'zeros'
) -> np.ndarray:
  """`postprocess_video` on each column of one video's (N, D) predictions; returns (N, D)."""
  return np.stack([postprocess_video(predictions[:, d], w, ends) for d, w in enumerate(windows)], -1)


def _decode(name) -> str:
  return name.decode() if isinstance(name, bytes) else str(name)


def clips_to_frames(clips: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Per video, frame-indexed arrays from per-clip arrays (row j = frame j + 1).

  Args:
    clips: (N, L, ...) arrays over N windows of L clips: `video_name` (N,), `end_frame` (N, L)
      (1-based, 0 for padding clips), `predictions` (N, L, 2), `frame_labels` (N, L, 2),
      `frame_mask` (N, L) and any of `FRAME_FLAGS` (N, L).

  Returns:
    {video: {'predictions': (n, 2) with NaN for frames no clip ends on, 'labels': (n, 2) with
    INVALID_LABEL where invalid, and each flag of `clips` as (n,) bool}}, n = the last end frame.
    A frame predicted twice is an error: the evaluation must visit every window once.
  """
  real = clips['end_frame'] > 0
  names = np.repeat(np.asarray(clips['video_name'])[:, None], clips['end_frame'].shape[1], axis=1)[real]
  names = np.array([_decode(n) for n in names])
  flags = [key for key in FRAME_FLAGS if key in clips]
  flat = {
    k: np.asarray(clips[k])[real] for k in ('end_frame', 'predictions', 'frame_labels', 'frame_mask', *flags)
  }
  per_video = {}
  for video in np.unique(names):
    rows = np.flatnonzero(names == video)
    rows = rows[np.argsort(flat['end_frame'][rows], kind='stable')]
    video_frames = flat['end_frame'][rows]
    repeated = video_frames[1:][np.diff(video_frames) == 0]
    if repeated.size:
      raise ValueError(
        f'Video {video}: frame {repeated[0]} is predicted twice; the evaluation pipeline '
        'must visit every window once.'
      )
    n = int(video_frames[-1])
    index = video_frames - 1
    entry = {'predictions': np.full((n, 2), np.nan), 'labels': np.full((n, 2), INVALID_LABEL)}
    entry['predictions'][index] = flat['predictions'][rows]
    valid = flat['frame_mask'][rows].astype(bool)
    entry['labels'][index[valid]] = flat['frame_labels'][rows][valid]
    for key in flags:
      entry[key] = np.zeros(n, bool)
      entry[key][index] = flat[key][rows]
    per_video[str(video)] = entry
  return per_video


def _ccc_dict(pred: np.ndarray, label: np.ndarray, prefix: str = '') -> dict[str, float]:
  """CCC per dimension over (n, D) frames, their mean and the frame count."""
  out = {f'{prefix}ccc_{name}': concordance_cc(pred[:, d], label[:, d]) for d, name in enumerate(DIMENSIONS)}
  out[f'{prefix}ccc_mean'] = float(np.mean([out[f'{prefix}ccc_{name}'] for name in DIMENSIONS]))
  out[f'{prefix}n_frames'] = int(pred.shape[0])
  return out


def scored_frames(
  prediction: np.ndarray,
  label: np.ndarray,
  windows: Sequence[int] = DEFAULT_WINDOWS,
  protocol: str = 'challenge',
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One video's scored frames: (post-processed predictions (n, 2), labels (n, 2), which of its N
  frames they are (N,) bool), from (N, 2) raw predictions (NaN: no prediction) and labels."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'Unknown evaluation protocol {protocol!r}; choose one of {PROTOCOLS}.')
  dense = np.nan_to_num(np.asarray(prediction, np.float64))
  label = np.asarray(label, np.float64)
  if protocol == 'authors':
    unlabelled = (label[:, 0] == INVALID_LABEL)[:, None]
    dense, label = np.where(unlabelled, 0.0, dense), np.where(unlabelled, 0.0, label)
    chosen = np.ones(label.shape[0], bool)
  else:
    chosen = np.all((label != INVALID_LABEL) & np.isfinite(label), axis=-1)
  return postprocess(dense, windows)[chosen], label[chosen], chosen


def frame_ccc(
  predictions: Mapping[str, np.ndarray],
  labels: Mapping[str, np.ndarray],
  *,
  subsets: Mapping[str, Mapping[str, np.ndarray]] | None = None,
  windows: Sequence[int] = DEFAULT_WINDOWS,
  protocol: str = 'challenge',
) -> dict[str, float]:
  """Split-level CCC: post-process each video, then CCC over all validly labelled frames.

  Args:
    predictions: {video: (N, 2) raw per-frame predictions} (before clipping and smoothing), row j
      aligned with row j of the labels.
    labels: {video: (N, 2) [valence, arousal]}; a frame with INVALID_LABEL (or NaN) in either
      dimension is invalid. Only these videos are scored.
    subsets: optional {name: {video: (N,) bool}} frame subsets (e.g. corrupted frames); a video
      absent from a subset contributes no frame to it.
    windows: moving-average lengths for (valence, arousal).
    protocol: 'challenge' or 'authors' (module docstring).

  Returns:
    `ccc_valence`, `ccc_arousal`, `ccc_mean`, `n_frames`, and per subset the same keys prefixed by
    `<name>/`. CCC values are NaN when there is no valid frame. A labelled frame without a finite
    prediction is an error naming the video and the frame.
  """
  subsets = subsets or {}
  preds, labs, subs = [], [], {name: [] for name in subsets}
  for video, label in labels.items():
    if video not in predictions:
      raise ValueError(f'frame_ccc: no predictions for video {video!r}')
    label = np.asarray(label, np.float64)
    dense = np.asarray(predictions[video], np.float64)
    if dense.shape != label.shape:
      raise ValueError(f'frame_ccc: video {video!r}: predictions {dense.shape}, labels {label.shape}')
    valid = np.all((label != INVALID_LABEL) & np.isfinite(label), axis=-1)
    missing = valid & ~np.all(np.isfinite(dense), axis=-1)
    if missing.any():
      raise ValueError(
        f'frame_ccc: video {video!r}: no finite prediction for {int(missing.sum())} labelled '
        f'frame(s), first {int(np.flatnonzero(missing)[0]) + 1}'
      )
    pred, lab, chosen = scored_frames(dense, label, windows, protocol)
    preds.append(pred)
    labs.append(lab)
    for name, subset in subsets.items():
      in_subset = np.asarray(subset.get(video, np.zeros(label.shape[0], bool)), bool)
      subs[name].append(in_subset[chosen])
  if not preds:
    raise ValueError('frame_ccc: no video to score')
  pred, lab = np.concatenate(preds), np.concatenate(labs)
  out = _ccc_dict(pred, lab)
  for name, chosen in subs.items():
    chosen = np.concatenate(chosen)
    out.update(_ccc_dict(pred[chosen], lab[chosen], prefix=f'{name}/'))
  return out


def _subset_name(flag: str) -> str:
  return 'not_silenced' if flag == 'silenced' else f'clean_{flag.split("_")[1]}'


def score_clips(clips: Mapping[str, np.ndarray], protocol: str = 'challenge') -> dict[str, float]:
  """Split-level CCC_v, CCC_a and their mean from per-clip predictions (see `clips_to_frames`), also
  over the frames with and without each flag that is set anywhere (e.g. `corrupt_video/ccc_mean`,
  `clean_video/ccc_mean`)."""
  videos = clips_to_frames(clips)
  subsets = {}
  for key in FRAME_FLAGS:
    if any(key in v and v[key].any() for v in videos.values()):
      subsets[key] = {name: v[key] for name, v in videos.items()}
      subsets[_subset_name(key)] = {name: ~v[key] for name, v in videos.items()}
  return frame_ccc(
    {n: v['predictions'] for n, v in videos.items()},
    {n: v['labels'] for n, v in videos.items()},
    subsets=subsets,
    protocol=protocol,
  )


def video_frames(clips: Mapping[str, np.ndarray], protocol: str = 'challenge') -> dict[str, tuple]:
  """{video: (post-processed predictions (n, 2), labels (n, 2))}: each video's scored frames, the
  units of a bootstrap over videos (`iaca_jax.stats.bootstrap_videos`)."""
  videos = clips_to_frames(clips)
  return {
    name: scored_frames(v['predictions'], v['labels'], protocol=protocol)[:2] for name, v in videos.items()
  }


def pooled_ccc_mean(frames: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
  """The split-level ccc_mean of a list of `video_frames` values (their frames pooled)."""
  pred = np.concatenate([p for p, _ in frames])
  label = np.concatenate([lab for _, lab in frames])
  return _ccc_dict(pred, label)['ccc_mean']
