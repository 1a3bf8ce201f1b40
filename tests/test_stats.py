"""Intervals over replicas, paired differences, the bootstrap over videos, and the authors'
evaluation protocol, each against a direct NumPy / scipy computation."""

import numpy as np
import pytest
import scipy.stats

from iaca_jax import metrics, stats


def test_t_interval_is_the_student_t_interval_of_the_mean():
  values = np.array([0.41, 0.37, 0.44, 0.39, 0.40])
  mean, low, high = stats.t_interval(values)
  half = scipy.stats.t.ppf(0.975, df=4) * values.std(ddof=1) / np.sqrt(5)
  assert mean == pytest.approx(values.mean())
  assert (low, high) == pytest.approx((values.mean() - half, values.mean() + half))
  assert np.isnan(stats.t_interval([0.4])[1])


def test_paired_difference_uses_the_per_seed_differences():
  a = np.array([0.41, 0.37, 0.44, 0.39, 0.40])
  b = np.array([0.36, 0.35, 0.40, 0.37, 0.33])
  d = a - b
  half = scipy.stats.t.ppf(0.975, df=4) * d.std(ddof=1) / np.sqrt(5)
  result = stats.paired_difference(a, b)
  assert (result['mean'], result['low'], result['high']) == pytest.approx(
    (d.mean(), d.mean() - half, d.mean() + half)
  )
  t = d.mean() / (d.std(ddof=1) / np.sqrt(5))
  assert result['p'] == pytest.approx(2 * scipy.stats.t.sf(abs(t), df=4))
  assert stats.verdict(result['low'], result['high']) == 'supported'
  assert stats.verdict(-0.1, 0.2) == 'undecided' and stats.verdict(-0.3, -0.1) == 'not supported'
  assert stats.format_interval(0.04, 0.01, 0.07, signed=True) == '+0.040 [+0.010, +0.070]'
  with pytest.raises(ValueError, match='pair the same seeds'):
    stats.paired_difference(a, b[:4])


def test_bootstrap_over_videos_gives_the_percentile_interval_of_resampled_videos():
  rng = np.random.default_rng(0)
  per_video = rng.normal(size=6)
  value, low, high = stats.bootstrap_videos(lambda idx: per_video[idx].mean(), 6, resamples=4000, seed=1)
  assert value == pytest.approx(per_video.mean())
  # Direct: the 2.5 / 97.5 percentiles of the means of 4000 resamples with replacement.
  draws = np.random.default_rng(2).integers(0, 6, size=(20000, 6))
  direct = np.percentile(per_video[draws].mean(1), [2.5, 97.5])
  np.testing.assert_allclose((low, high), direct, atol=0.05)


def moving_average(x, w):
  """Zero-padded moving average, output i over frames i - w // 2 .. i + (w - 1) // 2."""
  padded = np.concatenate([np.zeros(w // 2), x, np.zeros(w)])
  return np.array([padded[i : i + w].sum() / w for i in range(len(x))])


def authors_ccc(videos):
  """The authors' rule, transcribed: a frame whose valence label is -5 becomes (prediction 0,
  label 0) in both dimensions, is smoothed with the rest and counts in the CCC."""
  preds, labels = [], []
  for pred, label in videos:
    pred, label = np.nan_to_num(pred.copy()), label.copy()
    off = label[:, 0] == -5
    pred[off], label[off] = 0.0, 0.0
    pred = np.clip(pred, -1, 1)
    preds.append(np.stack([moving_average(pred[:, 0], 20), moving_average(pred[:, 1], 50)], -1))
    labels.append(label)
  p, y = np.concatenate(preds), np.concatenate(labels)
  out = []
  for d in range(2):
    x, t = p[:, d], y[:, d]
    out.append(2 * np.cov(x, t, bias=True)[0, 1] / (x.var() + t.var() + (x.mean() - t.mean()) ** 2))
  return out


def test_authors_protocol_matches_a_direct_transcription_and_differs_from_the_challenge():
  rng = np.random.default_rng(3)
  videos = {}
  for name, n in (('a', 400), ('b', 260)):
    t = np.arange(n)
    label = np.stack([np.sin(t / 40), np.cos(t / 55)], -1) * 0.6
    pred = label + rng.normal(scale=0.3, size=label.shape)
    label[50:120] = -5.0  # unlabelled stretch
    label[200:210, 1] = -5.0  # arousal alone unlabelled: the authors' code does not check it
    pred[300:310] = np.nan  # frames no clip ends on (unlabelled or not)
    label[300:310] = -5.0
    videos[name] = (pred, label)
  got = metrics.frame_ccc(
    {k: p for k, (p, _) in videos.items()}, {k: y for k, (_, y) in videos.items()}, protocol='authors'
  )
  np.testing.assert_allclose(
    [got['ccc_valence'], got['ccc_arousal']], authors_ccc(videos.values()), rtol=1e-10
  )
  assert got['n_frames'] == 660
  challenge = metrics.frame_ccc(
    {k: p for k, (p, _) in videos.items()}, {k: y for k, (_, y) in videos.items()}
  )
  assert challenge['n_frames'] < 660 and abs(challenge['ccc_valence'] - got['ccc_valence']) > 1e-3
  with pytest.raises(ValueError, match='protocol'):
    metrics.scored_frames(videos['a'][0], videos['a'][1], protocol='paper')


def test_experiment_tables_pair_variants_by_seed_and_state_the_interval():
  import experiments  # noqa: PLC0415 - the entry point's helpers, without running it

  rng = np.random.default_rng(4)
  base = rng.uniform(0.3, 0.4, 5)
  results = [
    {'name': name, 'validation': {'ccc_mean': float(np.mean(v)), 'replicas': [{'ccc_mean': x} for x in v]}}
    for name, v in (('rjca_iaca', base + 0.04 + rng.normal(0, 0.005, 5)), ('rjca_nogate', base))
  ]
  rows = experiments.paired_comparisons(results, experiments.DEMO_COMPARISONS)
  a = np.array([r['ccc_mean'] for r in results[0]['validation']['replicas']])
  d = a - base
  low, high = scipy.stats.t.interval(0.95, 4, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(5))
  assert (rows[0]['low'], rows[0]['high']) == pytest.approx((low, high)) and rows[0]['verdict'] == 'supported'
  table = experiments.comparison_table(rows)
  assert f'{d.mean():+.3f} [{low:+.3f}, {high:+.3f}]' in table and '95%' in table
  # d's spread is ~0.005: far under the +0.02 to detect, so 80% power needs few seeds (hand-checked
  # with the normal approximation: ((1.96 + 0.84) * 0.005 / 0.02)^2 = 0.5, the t-test's floor is 3-4).
  assert table.splitlines()[-1].endswith(f'| 5 | supported | {stats.seeds_needed(sd=d.std(ddof=1))} |')
  assert 3 <= stats.seeds_needed(sd=d.std(ddof=1)) <= 4
  assert '95% t-interval] over 5 replicas' in experiments.ablation_table(
    [{'name': r['name'], 'validation': r['validation']} for r in results]
  )


def test_seeds_needed_gives_the_textbook_sample_sizes_of_the_paired_t_test():
  # G*Power / Cohen (1988): two-sided paired t-test at 5% with 80% power, effect size d = mean / sd.
  for d, n in ((0.2, 199), (0.5, 34), (0.8, 15), (1.0, 10)):
    assert stats.seeds_needed(sd=1.0, effect=d) == n
    assert stats.seeds_needed(sd=0.04, effect=0.04 * d) == n  # only effect / sd matters
  assert stats.paired_power(34, 1.0, 0.5) == pytest.approx(0.8078, abs=1e-4)  # G*Power's actual power
  # The normal approximation, by hand: ((1.95996 + 0.84162) / 0.5)^2 = 31.4, below the exact 34.
  assert stats.seeds_needed_normal(1.0, 0.5) == pytest.approx(((1.959964 + 0.841621) / 0.5) ** 2, rel=1e-5)


def test_paired_power_is_the_share_of_simulated_paired_t_tests_that_reject():
  rng = np.random.default_rng(5)
  n, sd, effect, runs = 6, 0.03, 0.03, 40000
  d = rng.normal(effect, sd, size=(runs, n))
  t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
  rejected = np.mean(np.abs(t) > 2.570582)  # t_(0.975, 5) from the table
  assert stats.paired_power(n, sd, effect) == pytest.approx(rejected, abs=0.01)
  # Many seeds: the noncentral t tends to the normal, power Phi(d sqrt(n) - z_0.975) + Phi(-d sqrt(n) - z).
  shift = 0.15 * np.sqrt(400)
  normal = scipy.stats.norm.cdf(shift - 1.959964) + scipy.stats.norm.cdf(-shift - 1.959964)
  assert stats.paired_power(400, 1.0, 0.15) == pytest.approx(normal, abs=2e-3)


def test_seeds_needed_reads_the_spread_of_the_measured_differences():
  differences = [0.01, 0.05, 0.03, 0.02, 0.04]  # sample sd sqrt(0.001 / 4) = 0.0158
  sd = np.sqrt(np.sum((np.array(differences) - 0.03) ** 2) / 4)
  n = stats.seeds_needed(differences)
  assert n == stats.seeds_needed(sd=sd) and stats.seeds_needed(differences, effect=-0.02) == n
  assert stats.paired_power(n - 1, sd) < 0.8 <= stats.paired_power(n, sd)
  # d = 0.02 / 0.0158 = 1.26: between the tabulated d = 1.0 (10 seeds) and d = 1.5 (6 seeds).
  assert 6 <= n <= 10
  with pytest.raises(ValueError, match='one of the two'):
    stats.seeds_needed(differences, sd=0.01)
  with pytest.raises(ValueError, match='at least two'):
    stats.seeds_needed([0.02])


def test_bootstrap_over_videos_can_leave_out_resamples_where_the_statistic_is_undefined():
  per_video = np.array([0.3, np.nan, 0.5, 0.1, np.nan])  # e.g. videos without a positive clip
  statistic = lambda idx: np.nanmean(per_video[idx]) if np.isfinite(per_video[idx]).any() else np.nan
  value, low, high = stats.bootstrap_videos(statistic, 5, resamples=3000, seed=1, omit_undefined=True)
  assert value == pytest.approx(0.3) and np.isfinite([low, high]).all()
  draws = np.random.default_rng(2).integers(0, 5, size=(40000, 5))
  defined = [statistic(d) for d in draws if np.isfinite(per_video[d]).any()]
  np.testing.assert_allclose((low, high), np.percentile(defined, [2.5, 97.5]), atol=0.03)
  # Without undefined resamples, the same interval as scipy's.
  plain = lambda idx: np.nan_to_num(per_video)[idx].mean()
  assert stats.bootstrap_videos(plain, 5, seed=3, omit_undefined=True) == pytest.approx(
    stats.bootstrap_videos(plain, 5, seed=3)
  )
