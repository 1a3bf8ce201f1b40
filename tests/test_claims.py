"""Verdicts on disjoint seed sets, against scipy's paired t-test on each set written out by hand."""

import numpy as np
import pytest
import scipy.stats

from iaca_jax import claims, stats


def test_seed_sets_are_consecutive_disjoint_halves_and_odd_counts_are_refused():
  assert claims.seed_sets(18) == [range(0, 9), range(9, 18)]
  assert claims.seed_sets(12, sets=3) == [range(0, 4), range(4, 8), range(8, 12)]
  for bad in (17, 2):
    with pytest.raises(ValueError, match='equal sets of at least 2 seeds'):
      claims.seed_sets(bad)


def test_a_claim_stands_only_where_both_seed_sets_give_its_verdict():
  rng = np.random.default_rng(0)
  baseline = rng.normal(0.7, 0.03, 10)
  # Seeds 0-4: a clear gain; seeds 5-9: none. Both-set verdicts differ -> undecided.
  gain = np.concatenate([np.full(5, 0.05), np.zeros(5)]) + rng.normal(0, 0.005, 10)
  row = claims.decide('x', baseline + gain, baseline, claims.seed_sets(10))
  for got, seeds in zip(row['sets'], (slice(0, 5), slice(5, 10))):
    d = gain[seeds]
    low, high = scipy.stats.t.interval(0.95, 4, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(5))
    assert (got['mean'], got['low'], got['high']) == pytest.approx((d.mean(), low, high))
    assert got['p'] == pytest.approx(scipy.stats.ttest_rel(baseline[seeds] + d, baseline[seeds]).pvalue)
  assert [s['verdict'] for s in row['sets']] == ['supported', 'undecided']
  assert row['claim'] == 'undecided'
  assert row['all']['n'] == 10 and row['all']['mean'] == pytest.approx(gain.mean())
  assert row['seeds_needed'] == stats.seeds_needed(sd=np.std(gain, ddof=1))

  agree = claims.decide('y', baseline - 0.04 + rng.normal(0, 0.005, 10), baseline, claims.seed_sets(10))
  assert [s['verdict'] for s in agree['sets']] == ['not supported'] * 2 and agree['claim'] == 'not supported'

  table = claims.verdict_table([row, agree]).splitlines()
  assert table[2] == '| comparison | seeds 0-4 | seeds 5-9 | all seeds | p | seeds needed | claim |'
  first, second = (stats.format_interval(s['mean'], s['low'], s['high'], signed=True) for s in row['sets'])
  assert table[4].startswith(f'| x | {first} supported | {second} undecided | ')
  assert table[4].endswith(' | **undecided** |')
  assert '**not supported**' in table[5]
