"""Verdicts that repeat: each paired comparison decided on two disjoint sets of seeds.

A run of K replicas trains seeds (replicas) 0 .. K-1; `seed_sets` splits them into consecutive,
disjoint sets (replicas 9-17 of one run of 18 are the run `config.replicas.first=9`,
`config.replicas.count=9`: `iaca_jax.replicas`). Each comparison's paired difference is tested on
every set alone (`stats.paired_difference`, `stats.verdict`); the claim is `robust_verdict`: the
sets' verdict where they all agree, otherwise 'undecided'. A verdict that one set of seeds gives and
another does not is a draw of the seed-to-seed spread, not a finding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iaca_jax import stats

UNDECIDED = 'undecided'


def seed_sets(replicas: int, sets: int = 2) -> list[range]:
  """`sets` consecutive, disjoint ranges of replica indices of equal length covering 0 .. replicas-1."""
  if sets < 1 or replicas % sets or replicas // sets < 2:
    raise ValueError(
      f'seed_sets: {replicas} replicas do not split into {sets} equal sets of at least 2 seeds; '
      f'use a multiple of {sets} of at least {2 * sets}'
    )
  size = replicas // sets
  return [range(k * size, (k + 1) * size) for k in range(sets)]


def robust_verdict(verdicts: Sequence[str]) -> str:
  """The verdict of every set where they agree; 'undecided' where they do not."""
  return verdicts[0] if len(set(verdicts)) == 1 else UNDECIDED


def set_label(seeds: range) -> str:
  return f'seeds {seeds.start}-{seeds.stop - 1}'


def decide(label: str, variant: Sequence[float], baseline: Sequence[float], sets: Sequence[range]) -> dict:
  """One comparison: per seed set and over all seeds, the paired difference variant - baseline
  (per replica values, replica k of both trained from the same seed), with its verdict; the seeds
  the paired t-test needs for `stats.EFFECT` from all seeds' spread; and the claim."""
  variant, baseline = np.asarray(variant, np.float64), np.asarray(baseline, np.float64)
  per_set = []
  for seeds in sets:
    diff = stats.paired_difference(variant[seeds.start : seeds.stop], baseline[seeds.start : seeds.stop])
    per_set.append(dict(diff, seeds=set_label(seeds), verdict=stats.verdict(diff['low'], diff['high'])))
  pooled = stats.paired_difference(variant, baseline)
  pooled['verdict'] = stats.verdict(pooled['low'], pooled['high'])
  sd = pooled['sd']
  return {
    'label': label,
    'sets': per_set,
    'all': pooled,
    'seeds_needed': stats.seeds_needed(sd=sd) if np.isfinite(sd) and sd > 0 else None,
    'claim': robust_verdict([s['verdict'] for s in per_set]),
  }


def verdict_table(rows: Sequence[dict], scores: str = 'the validation mean CCC') -> str:
  """`decide` rows as a Markdown table; `scores` names what was compared."""
  if not rows:
    return ''
  sets = [s['seeds'] for s in rows[0]['sets']]
  lines = [
    f'Paired difference (variant - baseline) of {scores}, replica k of both trained '
    'from the same seed: mean [95% t-interval] and the verdict on each disjoint set of seeds, then '
    f"over all seeds with the paired t-test's p. Seeds needed: for {stats.EFFECT:+.2f} with "
    f'{stats.POWER:.0%} power at the 5% level, from the spread over all seeds. The claim stands '
    '(supported / not supported) only where every set of seeds gives that verdict; otherwise it is '
    'undecided.',
    '',
    '| comparison | ' + ' | '.join(sets) + ' | all seeds | p | seeds needed | claim |',
    '|---' * (len(sets) + 5) + '|',
  ]
  for row in rows:
    cells = [
      f'{stats.format_interval(s["mean"], s["low"], s["high"], signed=True)} {s["verdict"]}'
      for s in row['sets']
    ]
    pooled = row['all']
    needed = row['seeds_needed'] if row['seeds_needed'] is not None else 'n/a'
    lines.append(
      f'| {row["label"]} | '
      + ' | '.join(cells)
      + f' | {stats.format_interval(pooled["mean"], pooled["low"], pooled["high"], signed=True)} | '
      f'{pooled["p"]:.3f} | {needed} | **{row["claim"]}** |'
    )
  return '\n'.join(lines) + '\n'
