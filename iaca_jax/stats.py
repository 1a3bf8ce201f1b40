"""Uncertainty of results over replicas (seeds) and over validation videos, with scipy.

- `t_interval`: mean and 95% Student-t interval of a score over K independent replicas;
- `paired_difference`: the same for the per-replica difference of two variants trained on the same
  seeds (replica k of both shares its initialisation seed and the data order);
- `bootstrap_videos`: a percentile bootstrap over validation videos of a statistic of per-video frames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
  """(mean, low, high): the Student-t interval of the mean of `values` (n - 1 degrees of freedom);
  low = high = NaN with fewer than two values."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean()) if x.size else float('nan')
  if x.size < 2:
    return mean, float('nan'), float('nan')
  if np.ptp(x) == 0:  # identical values: a zero-width interval (scipy would give NaN)
    return mean, mean, mean
  low, high = scipy.stats.t.interval(confidence, x.size - 1, loc=mean, scale=scipy.stats.sem(x))
  return mean, float(low), float(high)


def paired_difference(
  a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, float]:
  """`t_interval` of a_k - b_k over replicas k, and the two-sided paired t-test's p-value."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'paired_difference: {a.size} against {b.size} replicas; pair the same seeds')
  mean, low, high = t_interval(a - b, confidence)
  p = float(scipy.stats.ttest_rel(a, b).pvalue) if a.size >= 2 else float('nan')
  return {'mean': mean, 'low': low, 'high': high, 'p': p, 'n': int(a.size)}


def verdict(low: float, high: float) -> str:
  """'supported' (interval above 0), 'not supported' (below 0) or 'undecided' (contains 0)."""
  if low > 0:
    return 'supported'
  if high < 0:
    return 'not supported'
  return 'undecided'


def format_interval(mean: float, low: float, high: float, signed: bool = False) -> str:
  """'0.412 [0.389, 0.435]', or with `signed` '+0.04 [+0.01, +0.07]' style signs."""
  f = '{:+.3f}' if signed else '{:.3f}'
  if not np.isfinite(low):
    return f.format(mean)
  return f'{f.format(mean)} [{f.format(low)}, {f.format(high)}]'


def bootstrap_videos(
  statistic: Callable[[np.ndarray], float],
  num_videos: int,
  *,
  resamples: int = 2000,
  confidence: float = CONFIDENCE,
  seed: int = 0,
) -> tuple[float, float, float]:
  """(value on all videos, low, high): percentile bootstrap of `statistic(video_indices)` over
  resamples of the `num_videos` videos with replacement (scipy.stats.bootstrap)."""
  indices = np.arange(num_videos)
  result = scipy.stats.bootstrap(
    (indices,),
    lambda idx: statistic(np.asarray(idx, int)),
    vectorized=False,
    n_resamples=resamples,
    confidence_level=confidence,
    method='percentile',
    rng=np.random.default_rng(seed),
  )
  return (
    float(statistic(indices)),
    float(result.confidence_interval.low),
    float(result.confidence_interval.high),
  )
