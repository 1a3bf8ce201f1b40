"""Uncertainty of results over replicas (seeds) and over validation videos, with scipy.

- `t_interval`: mean and 95% Student-t interval of a score over K independent replicas;
- `paired_difference`: the same for the per-replica difference of two variants trained on the same
  seeds (replica k of both shares its initialisation seed and the data order);
- `bootstrap_videos`: a percentile bootstrap over validation videos of a statistic of per-video frames;
- `paired_power`, `seeds_needed`: the power of the two-sided paired t-test (noncentral t) and the
  seeds it needs to detect a given difference, from the spread of measured paired differences.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
EFFECT = 0.02  # the paired CCC difference a power analysis asks about
POWER = 0.8
ALPHA = 0.05  # two-sided


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
  """`t_interval` of a_k - b_k over replicas k, the two-sided paired t-test's p-value and the
  differences' standard deviation `sd`."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'paired_difference: {a.size} against {b.size} replicas; pair the same seeds')
  mean, low, high = t_interval(a - b, confidence)
  p = float(scipy.stats.ttest_rel(a, b).pvalue) if a.size >= 2 else float('nan')
  sd = float(np.std(a - b, ddof=1)) if a.size >= 2 else float('nan')
  return {'mean': mean, 'low': low, 'high': high, 'p': p, 'n': int(a.size), 'sd': sd}


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
  omit_undefined: bool = False,
) -> tuple[float, float, float]:
  """(value on all videos, low, high): percentile bootstrap of `statistic(video_indices)` over
  resamples of the `num_videos` videos with replacement (scipy.stats.bootstrap).

  `omit_undefined`: resamples on which the statistic is NaN (e.g. no drawn video holds a class it
  needs) are left out, and the interval is that of the others; by default one NaN makes it NaN.
  """
  indices = np.arange(num_videos)
  with warnings.catch_warnings():
    if omit_undefined:
      warnings.simplefilter('ignore', scipy.stats.DegenerateDataWarning)
    result = scipy.stats.bootstrap(
      (indices,),
      lambda idx: statistic(np.asarray(idx, int)),
      vectorized=False,
      n_resamples=resamples,
      confidence_level=confidence,
      method='percentile',
      rng=np.random.default_rng(seed),
    )
  low, high = result.confidence_interval.low, result.confidence_interval.high
  if omit_undefined:
    tail = (1 - confidence) / 2
    values = result.bootstrap_distribution
    if np.isfinite(values).any():
      low, high = np.nanquantile(values, [tail, 1 - tail])
  return float(statistic(indices)), float(low), float(high)


def difference_sd(differences: Sequence[float]) -> float:
  """The sample standard deviation (n - 1) of measured paired differences a_k - b_k over seeds."""
  x = np.asarray(differences, np.float64)
  if x.size < 2:
    raise ValueError(f'difference_sd: {x.size} difference(s); a spread needs at least two seeds')
  return float(x.std(ddof=1))


def paired_power(n: int, sd: float, effect: float = EFFECT, alpha: float = ALPHA) -> float:
  """Power of the two-sided paired t-test at level `alpha` with `n` seeds when the true mean
  difference is `effect` and the differences' standard deviation `sd`: under the alternative t has
  the noncentral t distribution (n - 1 degrees of freedom, noncentrality effect / (sd / sqrt n))."""
  if n < 2:
    raise ValueError(f'paired_power: a paired t-test needs at least 2 seeds, got {n}')
  if sd <= 0:
    raise ValueError(f'paired_power: the standard deviation must be positive, got {sd}')
  df, noncentrality = n - 1, effect / sd * np.sqrt(n)
  critical = scipy.stats.t.ppf(1 - alpha / 2, df)
  rejects = scipy.stats.nct.sf(critical, df, noncentrality) + scipy.stats.nct.cdf(
    -critical, df, noncentrality
  )
  return float(rejects)


def seeds_needed_normal(
  sd: float, effect: float = EFFECT, power: float = POWER, alpha: float = ALPHA
) -> float:
  """The normal approximation to `seeds_needed`, ((z_(1 - alpha/2) + z_power) sd / effect)^2 (not
  rounded; it underestimates the t-test's need, most for few seeds)."""
  z = scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power)
  return float((z * sd / effect) ** 2)


def seeds_needed(
  differences: Sequence[float] | None = None,
  *,
  sd: float | None = None,
  effect: float = EFFECT,
  power: float = POWER,
  alpha: float = ALPHA,
) -> int:
  """The fewest seeds (at least 2) with which the two-sided paired t-test at level `alpha` detects a
  true mean difference `effect` with probability at least `power` (`paired_power`, exact).

  The spread comes from the measured paired `differences` of a comparison (their sample standard
  deviation) or is given as `sd`, one of the two.
  """
  if (differences is None) == (sd is None):
    raise ValueError(
      'seeds_needed: give the measured differences or their standard deviation, one of the two'
    )
  if effect == 0 or not alpha < power < 1:
    raise ValueError(f'seeds_needed: no number of seeds gives power {power} for a difference of {effect}')
  sd = difference_sd(differences) if sd is None else sd
  achieved = lambda n: paired_power(n, sd, abs(effect), alpha)
  # Start at the normal approximation and walk to the exact answer (power grows with n).
  n = max(2, int(np.ceil(seeds_needed_normal(sd, abs(effect), power, alpha))))
  while n > 2 and achieved(n - 1) >= power:
    n -= 1
  while achieved(n) < power:
    n += 1
  return n
