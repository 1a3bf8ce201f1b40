r"""The whole experiment on the synthetic set, from one command.

  python experiments.py --mode=demo --results_dir=results/demo      # what `make demo` runs
  python experiments.py --mode=ablation --results_dir=results/demo  # what `make ablation` runs
  python experiments.py --mode=claims --results_dir=results/demo    # what `make claims` runs

Every variant trains `--replicas` seeds in one run (`config.replicas.count`; demo 3, ablation 5,
claims 18); tables give the mean and the 95% t-interval over replicas, comparisons the paired
difference over the shared seeds, and the headline comparison also a bootstrap over validation videos
(`iaca_jax.stats`). The claims decide each comparison on two disjoint sets of seeds
(`iaca_jax.claims`).

Steps (each skipped when its output already exists, so a rerun resumes): generate the synthetic set
-> build the TFRecord shards -> cache the frozen encoders' features -> train each variant ->
evaluate (CCC, clean/corrupted frames, missing-audio sweep) -> tables and figures in results_dir.
The demo trains in `results_dir/runs/<variant>`, the ablation in `results_dir/ablation_runs/<variant>`,
the claims in `results_dir/claims_runs/<variant>`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from configs import synthetic_demo  # noqa: E402
from data import build  # noqa: E402
from data.synthetic_av import generate  # noqa: E402
from iaca_jax import (  # noqa: E402
  claims,
  cli,
  evaluate_lib,
  feature_cache,
  gate_analysis,
  metrics,
  reports,
  runtime,
  stats,
  train_lib,
)
from iaca_jax.fileio import atomic_write  # noqa: E402
from iaca_jax.preprocessing import corruptions  # noqa: E402

DEMO_VARIANTS = (
  ('rjca_iaca', dict(cross_attention='rjca', gating='iaca')),
  ('rjca_nogate', dict(cross_attention='rjca', gating='none')),
)
ABLATION_VARIANTS = (
  tuple(
    (f'{ca}_{gate}', dict(cross_attention=ca, gating=gate))
    for ca in ('ca', 'jca', 'rjca')
    for gate in ('none', 'stage1', 'iaca')
  )
  + tuple(
    (f'rjca_iaca_{stage2}', dict(cross_attention='rjca', gating='iaca', stage2=stage2))
    for stage2 in ('sum', 'iteration', 'raw')  # 'modality' is rjca_iaca
  )
  + (('rjca_iaca_t2_0.1', dict(cross_attention='rjca', gating='iaca', stage2_temperature=0.1)),)
)
# The paper's claims (docs/RESULTS.md): the ablation's fusion x gating grid and every stage-2 design
# on RJCA, 18 seeds each = two disjoint sets of 9, the most that `stats.seeds_needed` asked of the
# ablation's comparisons for +0.02 (5-9).
CLAIMS_VARIANTS = ABLATION_VARIANTS[:9] + tuple(
  (f'rjca_iaca_{stage2}', dict(cross_attention='rjca', gating='iaca', stage2=stage2))
  for stage2 in ('mlp', 'sum', 'iteration', 'raw')
)
# Why stage 2 does not turn away from an inconsistent voice: training length and stage-2 temperature
# (`make claims` has the stage-2 designs and the counterfactual weights).
RJCA_IACA = dict(cross_attention='rjca', gating='iaca')
WHY_VARIANTS = (
  ('rjca_iaca', RJCA_IACA),
  ('rjca_iaca_8_epochs', dict(RJCA_IACA, training=dict(num_epochs=8))),
  ('rjca_iaca_t2_0.3', dict(RJCA_IACA, stage2_temperature=0.3)),
  ('rjca_iaca_t2_0.1', dict(RJCA_IACA, stage2_temperature=0.1)),
)
DEMO_REPLICAS, ABLATION_REPLICAS, CLAIMS_REPLICAS, WHY_REPLICAS = 3, 5, 18, 9
CLAIMS_MISSING_AUDIO = (0.5, 0.9)  # shares of validation clips silenced
STAGE2_AUDIO_SCALES = (0.5, 2.0)  # the counterfactual stage-2 audio weights of the claims
# (label, variant, baseline): paired differences over the shared seeds; the paper's claims.
DEMO_COMPARISONS = (('RJCA: IACA - no gate', 'rjca_iaca', 'rjca_nogate'),)
ABLATION_COMPARISONS = (
  tuple((f'{ca.upper()}: IACA - no gate', f'{ca}_iaca', f'{ca}_none') for ca in ('ca', 'jca', 'rjca'))
  + (
    ('RJCA: IACA - stage 1 only', 'rjca_iaca', 'rjca_stage1'),
    ('RJCA: stage 1 only - no gate', 'rjca_stage1', 'rjca_none'),
    ('RJCA + IACA: stage-2 T 1.0 - 0.1', 'rjca_iaca', 'rjca_iaca_t2_0.1'),
  )
  + tuple(
    (f'RJCA + IACA: modality - {s}', 'rjca_iaca', f'rjca_iaca_{s}') for s in ('sum', 'iteration', 'raw')
  )
)
CLAIMS_COMPARISONS = (
  ABLATION_COMPARISONS[:5]
  + (('RJCA + IACA: stage-2 mlp - modality', 'rjca_iaca_mlp', 'rjca_iaca'),)
  + ABLATION_COMPARISONS[6:]
)


def log(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def demo_config(
  results_dir: str, replicas: int = 1, training: dict | None = None, **model_overrides
) -> ml_collections.ConfigDict:
  config = synthetic_demo.get_config()
  config.dataset.data_dir = os.path.join(results_dir, 'tfds')
  config.dataset.features_dir = os.path.join(results_dir, 'features')
  config.replicas.count = replicas
  config.model.update(model_overrides)
  config.training.update(training or {})
  return config


def prepare_data(results_dir: str, *, size: str = 'default', seed: int = 0) -> ml_collections.ConfigDict:
  """Synthetic set -> shards -> cached encoder features. Returns the base config."""
  config = demo_config(results_dir)
  raw_dir = os.path.join(results_dir, 'raw')
  if not os.path.isdir(os.path.join(raw_dir, 'cropped_aligned')):
    log(f'Generating the synthetic set ({size}) in {raw_dir}')
    generate.generate(raw_dir, generate.SIZES[size], seed, num_workers=2)
  log(f'Building the TFRecord shards in {config.dataset.data_dir}')
  build.build('synthetic_av', raw_dir, config.dataset.data_dir)
  if not os.path.isfile(os.path.join(config.dataset.features_dir, 'dataset_info.json')):
    log(f"Caching the frozen encoders' features in {config.dataset.features_dir}")
    feature_cache.cache_features(config)
  return config


def run_variant(
  results_dir: str,
  name: str,
  overrides: dict,
  *,
  replicas: int,
  missing_audio: bool,
  seeds: Sequence[int] = (0, 1, 2),
  fractions: Sequence[float] = evaluate_lib.MISSING_AUDIO_FRACTIONS,
  runs_dir: str = 'runs',
) -> dict:
  """Trains (or resumes) one variant's replicas in `results_dir/runs_dir/name` and evaluates each
  one's best checkpoint."""
  config = demo_config(results_dir, replicas, **overrides)
  workdir = os.path.join(results_dir, runs_dir, name)
  log(f'Training {name} in {workdir}')
  train_lib.train_and_evaluate(config, workdir)
  evaluator = evaluate_lib.Evaluator(config, workdir, 'best')
  output_dir = os.path.join(workdir, 'eval')
  result = {
    'name': name,
    'workdir': workdir,
    'steps': evaluator.steps,
    'validation': evaluate_lib.score_split(evaluator, config.dataset.eval_split, output_dir),
  }
  if missing_audio:
    log(f'Missing-audio sweep for {name}')
    result['missing_audio'] = evaluate_lib.missing_audio_sweep(
      evaluator, config.dataset.eval_split, output_dir, fractions=fractions, seeds=seeds, label=name
    )
  result['evaluator'] = evaluator
  return result


def _per_replica(result: dict, key: str) -> list[float]:
  validation = result['validation']
  return [r[key] for r in validation.get('replicas', [validation])]


def ablation_table(results: Sequence[dict]) -> str:
  """Mean and 95% t-interval over each variant's replicas of the validation CCC."""
  columns = (
    ('CCC_v', 'ccc_valence'),
    ('CCC_a', 'ccc_arousal'),
    ('mean', 'ccc_mean'),
    ('mean, video corrupted', 'corrupt_video/ccc_mean'),
    ('mean, audio corrupted', 'corrupt_audio/ccc_mean'),
  )
  replicas = sorted({len(_per_replica(r, 'ccc_mean')) for r in results})
  lines = [
    f'Mean [95% t-interval] over {"/".join(map(str, replicas))} replicas (seeds) per variant.',
    '',
    '| variant | ' + ' | '.join(c for c, _ in columns) + ' |',
    '|---' * (len(columns) + 1) + '|',
  ]
  for r in results:
    cells = [
      stats.format_interval(*stats.t_interval(_per_replica(r, key))) if key in r['validation'] else '-'
      for _, key in columns
    ]
    lines.append(f'| {r["name"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def paired_comparisons(results: Sequence[dict], comparisons: Sequence[tuple]) -> list[dict]:
  """Per comparison (label, variant, baseline): the paired difference of the validation mean CCC
  over the shared seeds, its 95% t-interval, the paired t-test's p and the verdict."""
  by_name = {r['name']: r for r in results}
  rows = []
  for label, variant, baseline in comparisons:
    if variant in by_name and baseline in by_name:
      diff = stats.paired_difference(
        _per_replica(by_name[variant], 'ccc_mean'), _per_replica(by_name[baseline], 'ccc_mean')
      )
      rows.append(dict(diff, label=label, verdict=stats.verdict(diff['low'], diff['high'])))
  return rows


def comparison_table(rows: Sequence[dict]) -> str:
  lines = [
    'Paired difference of the validation mean CCC over the shared seeds (replica k of both variants '
    'has the same seed), mean [95% t-interval]; a claim is supported when the interval is above 0. '
    f'Seeds needed: how many seeds the paired t-test needs to detect a difference of '
    f'{stats.EFFECT:+.2f} with {stats.POWER:.0%} power at the 5% level, given the spread of these '
    'differences (`stats.seeds_needed`).',
    '',
    '| comparison | difference | p (paired t) | replicas | at 95% | seeds needed |',
    '|---|---|---|---|---|---|',
  ]
  for row in rows:
    sd = row.get('sd', float('nan'))
    needed = stats.seeds_needed(sd=sd) if np.isfinite(sd) and sd > 0 else 'n/a'
    lines.append(
      f'| {row["label"]} | {stats.format_interval(row["mean"], row["low"], row["high"], signed=True)} | '
      f'{row["p"]:.3f} | {row["n"]} | {row["verdict"]} | {needed} |'
    )
  return '\n'.join(lines) + '\n'


def bootstrap_headline(
  variant: dict, baseline: dict, split: str, resamples: int = 2000, each: Sequence[list] | None = None
) -> dict:
  """Bootstrap over validation videos of (replica-mean CCC of `variant`) - (that of `baseline`):
  each resample draws videos with replacement and rescores every replica of both on them.
  `each`: the per-replica clips of the variant and of the baseline on `split`, when already predicted."""
  each = each or [result['evaluator'].predict_each(split) for result in (variant, baseline)]
  frames = {}
  for side, clips_each in zip(('variant', 'baseline'), each):
    frames[side] = [metrics.video_frames(c) for c in clips_each]
  videos = sorted(frames['variant'][0])

  def statistic(idx):
    chosen = [videos[i] for i in idx]
    score = {
      side: np.mean([metrics.pooled_ccc_mean([f[v] for v in chosen]) for f in per_replica])
      for side, per_replica in frames.items()
    }
    return score['variant'] - score['baseline']

  value, low, high = stats.bootstrap_videos(statistic, len(videos), resamples=resamples)
  return {'mean': value, 'low': low, 'high': high, 'videos': len(videos), 'resamples': resamples}


def missing_audio_drop(result: dict, fraction: float | None = None) -> list[float]:
  """Per replica: the validation mean CCC minus its mean over the silenced shares, or at the share
  `fraction` (how much is lost)."""
  clean = np.array(_per_replica(result, 'ccc_mean'))
  rows = [
    r for r in result['missing_audio']['rows'] if fraction is None or np.isclose(r['fraction'], fraction)
  ]
  if not rows:
    raise ValueError(f'{result["name"]}: no missing-audio row for {fraction:.0%} silenced')
  silenced = np.mean([row.get('ccc_mean_replicas', [row['ccc_mean_mean']]) for row in rows], axis=0)
  return (clean - silenced).tolist()


def missing_audio_comparisons(results: Sequence[dict], comparisons: Sequence[tuple]) -> list[dict]:
  """'IACA degrades less under missing audio': per comparison, the paired difference over the shared
  seeds of (baseline's drop - variant's drop), the drop being `missing_audio_drop`."""
  by_name = {r['name']: r for r in results if 'missing_audio' in r}
  rows = []
  for label, variant, baseline in comparisons:
    if variant in by_name and baseline in by_name:
      diff = stats.paired_difference(
        missing_audio_drop(by_name[baseline]), missing_audio_drop(by_name[variant])
      )
      rows.append(
        dict(diff, label=f'{label}: drop avoided', verdict=stats.verdict(diff['low'], diff['high']))
      )
  return rows


def no_sidecar(sidecar_path: str) -> tuple[list[str], dict]:
  """The per-kind sections' stand-in where the set has no corruption sidecar (not a generated set)."""
  return [f"(No {sidecar_path}: the per-kind analysis needs the generated set's sidecar.)", ''], {}


def ground_truth_sections(
  clips: dict, each: Sequence[list], sidecar_path: str, label: str, protocol: str = 'challenge'
) -> tuple[list[str], dict]:
  """RESULTS.md lines on the gates against the synthetic set's corruptions (`iaca_jax.gate_analysis`):
  the AUROC of each gate value per corruption kind (`clips`: one model's, e.g. replica 0's gates) and
  the paired difference `label` per kind (`each`: the per-replica clips of the variant and of the
  baseline). Also the rows, for results.json. Without the sidecar, a line saying so."""
  if not os.path.isfile(sidecar_path):
    return no_sidecar(sidecar_path)
  groups = gate_analysis.clip_groups(clips, corruptions.read_corruptions(sidecar_path))
  aurocs = gate_analysis.gate_aurocs(clips, groups)
  kinds = gate_analysis.kind_differences(*each, groups, protocol)
  lines = [
    gate_analysis.gate_auroc_table(aurocs, int(groups[gate_analysis.CLEAN].sum())),
    f'## {label} per kind of corruption (ground truth: `{corruptions.FILENAME}`)',
    '',
    gate_analysis.kind_difference_table(kinds, label),
  ]
  return lines, {'gate_aurocs': aurocs, 'kind_differences': kinds}


def write_json(path: str, results: Sequence[dict], **extra) -> None:
  plain = [{k: v for k, v in r.items() if k != 'evaluator'} for r in results]
  atomic_write(path, json.dumps({'variants': plain, **extra}, indent=1, default=float))


def run_demo(results_dir: str, size: str = 'default', replicas: int = DEMO_REPLICAS) -> str:
  start = time.time()
  config = prepare_data(results_dir, size=size)
  results = [
    run_variant(results_dir, name, overrides, replicas=replicas, missing_audio=True)
    for name, overrides in DEMO_VARIANTS
  ]
  iaca = results[0]['evaluator']
  clips = iaca.predict(config.dataset.eval_split)
  video = sorted({n.decode() for n in clips['video_name']})[0]
  figure = evaluate_lib.attention_figure(iaca, video, config.dataset.eval_split, results_dir, clips)
  submission = evaluate_lib.write_submission(iaca, 'test', results_dir)
  sweeps = [r['missing_audio'] for r in results]
  reports.plot_missing_audio(sweeps, os.path.join(results_dir, 'missing_audio.png'))
  comparisons = paired_comparisons(results, DEMO_COMPARISONS)
  comparisons += missing_audio_comparisons(results, DEMO_COMPARISONS)
  log('Bootstrap over validation videos')
  each = [r['evaluator'].predict_each(config.dataset.eval_split) for r in results]
  headline = bootstrap_headline(results[0], results[1], config.dataset.eval_split, each=each)
  log('The gates against the corruptions')
  truth, truth_rows = ground_truth_sections(
    clips,
    each,
    os.path.join(results_dir, 'raw', corruptions.FILENAME),
    'RJCA + IACA - no gate',
    iaca.protocol,
  )
  summary = [
    '# Demo results (synthetic set)',
    '',
    f'Made by `make demo` in {time.time() - start:.0f} s; {replicas} replicas (seeds) per variant.',
    '',
    '## Validation CCC (docs/DESIGN.md §5 protocol)',
    '',
    ablation_table(results),
    '## Paired differences',
    '',
    comparison_table(comparisons),
    'Bootstrap over the validation videos ({videos} videos, {resamples} resamples, percentile 95% '
    'interval) of the replica-mean CCC difference RJCA + IACA - no gate: {interval}.'.format(
      interval=stats.format_interval(headline['mean'], headline['low'], headline['high'], signed=True),
      **headline,
    ),
    '',
    '## What the gates do (RJCA + IACA replica 0, mean gate values over validation clips)',
    '',
    reports.gate_table(clips),
    *truth,
    '## Missing audio (share of validation clips silenced; 3 silencing seeds)',
    '',
    reports.missing_audio_table(sweeps),
    '![missing audio](missing_audio.png)',
    '',
    f'## Attention scores ({video}, replica 0)',
    '',
    f'![attention]({os.path.basename(figure)})',
    '',
    f'Challenge-format predictions for the test split (mean of the replicas): `{os.path.basename(submission)}`.',
    '',
  ]
  path = os.path.join(results_dir, 'RESULTS.md')
  atomic_write(path, '\n'.join(summary))
  write_json(
    os.path.join(results_dir, 'results.json'),
    results,
    comparisons=comparisons,
    bootstrap_headline=headline,
    **truth_rows,
  )
  log(f'Done in {time.time() - start:.0f} s: see {path}')
  return path


def train_grid(
  results_dir: str,
  variants: Sequence[tuple[str, dict]],
  replicas: int,
  runs_dir: str,
  fractions: Sequence[float] = evaluate_lib.MISSING_AUDIO_FRACTIONS,
) -> list[dict]:
  """`run_variant` of each (name, model overrides) in `results_dir/runs_dir`; the missing-audio sweep
  (one silencing seed, at `fractions`) for the plain no-gate and IACA variants of each fusion."""
  return [
    run_variant(
      results_dir,
      name,
      overrides,
      replicas=replicas,
      missing_audio=overrides.get('gating') in ('none', 'iaca') and len(overrides) == 2,
      seeds=(0,),
      fractions=fractions,
      runs_dir=runs_dir,
    )
    for name, overrides in variants
  ]


def run_ablation(results_dir: str, size: str = 'default', replicas: int = ABLATION_REPLICAS) -> str:
  start = time.time()
  config = prepare_data(results_dir, size=size)
  # Apart from the demo's runs: `rjca_iaca` there has another number of replicas, and resuming a
  # checkpoint of 3 replicas as 5 fails.
  results = train_grid(results_dir, ABLATION_VARIANTS, replicas, 'ablation_runs')
  comparisons = paired_comparisons(results, ABLATION_COMPARISONS)
  comparisons += missing_audio_comparisons(results, ABLATION_COMPARISONS[:3])
  log('Bootstrap over validation videos')
  by_name = {r['name']: r for r in results}
  headlines = {
    label: bootstrap_headline(by_name[variant], by_name[baseline], config.dataset.eval_split)
    for label, variant, baseline in ABLATION_COMPARISONS[:3]
  }
  path = os.path.join(results_dir, 'ablation.md')
  body = [
    '# Ablation on the synthetic set (validation)',
    '',
    f'Made by `make ablation` in {time.time() - start:.0f} s; {replicas} replicas (seeds) per variant.',
    '',
    ablation_table(results),
    '## Paired differences',
    '',
    comparison_table(comparisons),
    'Bootstrap over the validation videos (percentile 95% interval; the seeds held fixed) of the '
    'replica-mean CCC difference:',
    '',
    *(
      f'- {label}: {stats.format_interval(h["mean"], h["low"], h["high"], signed=True)} '
      f'({h["videos"]} videos, {h["resamples"]} resamples)'
      for label, h in headlines.items()
    ),
    '',
    '## Missing audio (1 silencing seed)',
    '',
    reports.missing_audio_table([r['missing_audio'] for r in results if 'missing_audio' in r]),
  ]
  atomic_write(path, '\n'.join(body))
  write_json(
    os.path.join(results_dir, 'ablation.json'),
    results,
    comparisons=comparisons,
    bootstrap_headlines=headlines,
  )
  log(f'Ablation table: {path}')
  return path


def claims_gate_sections(
  results: Sequence[dict], sidecar_path: str, split: str, protocol: str
) -> tuple[list[str], dict]:
  """The gates of every gated RJCA variant against the corruptions, AUROC over all seeds
  (`gate_analysis.replica_gate_aurocs`); and per kind of corruption each fusion's IACA - no gate,
  decided on both seed sets. Without the sidecar, a line saying so."""
  if not os.path.isfile(sidecar_path):
    return no_sidecar(sidecar_path)
  sidecar = corruptions.read_corruptions(sidecar_path)
  by_name = {r['name']: r for r in results}
  each = {}

  def clips_of(name):
    if name not in each:
      each[name] = by_name[name]['evaluator'].predict_each(split)
    return each[name]

  groups = gate_analysis.clip_groups(clips_of('rjca_none')[0], sidecar)
  clean = int(groups[gate_analysis.CLEAN].sum())
  sets = claims.seed_sets(len(clips_of('rjca_none')))

  def kind_scores(per_replica):
    return [gate_analysis.kind_scores(c, groups, protocol) for c in per_replica]

  def per_kind(label, variant, baseline):
    """`claims.decide` on each kind's frames; variant, baseline: per replica `kind_scores`."""
    return [
      claims.decide(
        label(group, int(variant[0][f'{group}/n_frames'])),
        [v[f'{group}/ccc_mean'] for v in variant],
        [b[f'{group}/ccc_mean'] for b in baseline],
        sets,
      )
      for group in groups
    ]

  lines, rows = [], {'gate_aurocs': {}}
  for name in (n for n, o in CLAIMS_VARIANTS if n.startswith('rjca_') and o['gating'] != 'none'):
    aurocs = gate_analysis.replica_gate_aurocs(clips_of(name), groups)
    rows['gate_aurocs'][name] = aurocs
    lines += [f'### {name}', '', gate_analysis.replica_auroc_table(aurocs, clean, len(each[name])), '']
  scores = {
    name: kind_scores(clips_of(name)) for ca in ('ca', 'jca', 'rjca') for name in (f'{ca}_iaca', f'{ca}_none')
  }
  rows['kind_differences'] = kind_rows = [
    row
    for ca in ('ca', 'jca', 'rjca')
    for row in per_kind(
      lambda group, frames, ca=ca: f'{ca.upper()}: IACA - no gate, {group} ({frames} frames)',
      scores[f'{ca}_iaca'],
      scores[f'{ca}_none'],
    )
  ]
  lines += [
    f'## IACA - no gate per kind of corruption (ground truth: `{corruptions.FILENAME}`)',
    '',
    'Over the frames whose clip is corrupted in one way (at least 16 of its 32 frames) or clean (none).',
    '',
    claims.verdict_table(kind_rows, "the mean CCC over the kind's frames"),
  ]
  rows['stage2_audio_scaled'] = scaled = []
  iaca = by_name['rjca_iaca']
  for scale in STAGE2_AUDIO_SCALES:
    log(f'rjca_iaca with its stage-2 audio weight scaled by {scale}')
    forced = evaluate_lib.predict_each_intervened(
      iaca['evaluator'].config, iaca['workdir'], split, gate_analysis.scale_stage2_audio(scale)
    )
    scaled += per_kind(
      lambda group, frames, scale=scale: f'audio weight x {scale}, {group}',
      kind_scores(forced),
      scores['rjca_iaca'],
    )
  lines += [
    '## What the loss makes of a stage-2 audio weight forced down or up (RJCA + IACA)',
    '',
    'Every stage-2 weight pair [w_a, w_v] of the trained models replaced by [s w_a, w_v] / (s w_a + w_v) '
    "(`gate_analysis.scale_stage2_audio`): the change of the mean CCC over each kind's frames. Where "
    'a lower audio weight costs less than on clean frames, the loss favours a gate that gives those '
    'clips less audio weight than clean ones; a gain says how much it would pay.',
    '',
    claims.verdict_table(scaled, "the mean CCC over the kind's frames (forced - trained model)"),
  ]
  return lines, rows


def run_claims(results_dir: str, size: str = 'default', replicas: int = CLAIMS_REPLICAS) -> str:
  """Every claim decided on two disjoint sets of seeds: `CLAIMS_VARIANTS` with `replicas` seeds each,
  `CLAIMS_COMPARISONS`, the missing-audio drop avoided at `CLAIMS_MISSING_AUDIO`, the gates against the
  corruptions. Writes claims.md and claims.json in results_dir."""
  start = time.time()
  sets = claims.seed_sets(replicas)  # refuses a count that does not split before any training
  config = prepare_data(results_dir, size=size)
  results = train_grid(results_dir, CLAIMS_VARIANTS, replicas, 'claims_runs', CLAIMS_MISSING_AUDIO)
  by_name = {r['name']: r for r in results}
  ccc = lambda name: _per_replica(by_name[name], 'ccc_mean')
  verdicts = [claims.decide(label, ccc(v), ccc(b), sets) for label, v, b in CLAIMS_COMPARISONS]
  for fraction in CLAIMS_MISSING_AUDIO:
    for label, v, b in CLAIMS_COMPARISONS[:3]:
      verdicts.append(
        claims.decide(
          f'{label}: drop avoided, {fraction:.0%} of clips silenced',
          missing_audio_drop(by_name[b], fraction),
          missing_audio_drop(by_name[v], fraction),
          sets,
        )
      )
  log('The gates against the corruptions')
  truth, truth_rows = claims_gate_sections(
    results,
    os.path.join(results_dir, 'raw', corruptions.FILENAME),
    config.dataset.eval_split,
    results[0]['evaluator'].protocol,
  )
  path = os.path.join(results_dir, 'claims.md')
  body = [
    '# The claims on the synthetic set (validation)',
    '',
    f'Made by `make claims` in {time.time() - start:.0f} s; {replicas} replicas (seeds) per variant, '
    f'decided on {" and ".join(claims.set_label(s) for s in sets)}.',
    '',
    '## Verdicts',
    '',
    claims.verdict_table(verdicts),
    "Drop avoided: (the baseline's validation CCC minus its CCC with that share of the clips' audio "
    'silenced) minus the same for the variant; above 0 the variant loses less.',
    '',
    '## Validation CCC',
    '',
    ablation_table(results),
    '## The gates against the corruptions (ground truth)',
    '',
    *truth,
    '## Missing audio (1 silencing seed)',
    '',
    reports.missing_audio_table([r['missing_audio'] for r in results if 'missing_audio' in r]),
  ]
  atomic_write(path, '\n'.join(body))
  write_json(os.path.join(results_dir, 'claims.json'), results, verdicts=verdicts, **truth_rows)
  log(f'Claims: {path} ({time.time() - start:.0f} s)')
  return path


def stage2_audio_table(rows_by_variant: dict[str, list[dict]]) -> str:
  """The stage-2 audio weight's AUROC per audio corruption and a missing face, one row per variant
  (`gate_analysis.replica_gate_aurocs` rows)."""
  kinds = [f'audio: {k}' for k in corruptions.AUDIO_KINDS] + ['video: missing']
  lines = ['| variant | ' + ' | '.join(kinds) + ' |', '|---' * (len(kinds) + 1) + '|']
  for name, rows in rows_by_variant.items():
    by_kind = {r['clips']: r for r in rows}
    cells = [
      stats.format_interval(*by_kind[k]['stage-2 audio weight']) if k in by_kind else '-' for k in kinds
    ]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def run_why(results_dir: str, size: str = 'default', replicas: int = WHY_REPLICAS) -> str:
  """RJCA + IACA trained longer and with other stage-2 temperatures: does its stage-2 audio weight
  separate each kind of corruption (AUROC over seeds)? Writes why.md and why.json in results_dir."""
  start = time.time()
  config = prepare_data(results_dir, size=size)
  sidecar = corruptions.read_corruptions(os.path.join(results_dir, 'raw', corruptions.FILENAME))
  results, aurocs = [], {}
  for name, overrides in WHY_VARIANTS:
    result = run_variant(
      results_dir, name, overrides, replicas=replicas, missing_audio=False, runs_dir='why_runs'
    )
    each = result['evaluator'].predict_each(config.dataset.eval_split)
    groups = gate_analysis.clip_groups(each[0], sidecar)
    aurocs[name] = gate_analysis.replica_gate_aurocs(each, groups, scores=('score_audio', 'score_video'))
    results.append(result)
  path = os.path.join(results_dir, 'why.md')
  body = [
    '# Why stage 2 does not turn away from an inconsistent voice (validation)',
    '',
    f'Made by `python experiments.py --mode=why` in {time.time() - start:.0f} s; {replicas} replicas '
    '(seeds) per variant.',
    '',
    ablation_table(results),
    'AUROC of the stage-2 audio weight separating the clips of each kind from the clean clips: mean '
    f'[95% t-interval] over {replicas} seeds; below 0.5 the weight is lower on the corrupted clips.',
    '',
    stage2_audio_table(aurocs),
  ]
  clean = int(groups[gate_analysis.CLEAN].sum())  # the same validation clips for every variant
  for name, rows in aurocs.items():
    body += [f'## {name}', '', gate_analysis.replica_auroc_table(rows, clean, replicas), '']
  atomic_write(path, '\n'.join(body))
  write_json(os.path.join(results_dir, 'why.json'), results, gate_aurocs=aurocs)
  log(f'Why: {path} ({time.time() - start:.0f} s)')
  return path


def main(argv):
  runtime.configure_process()  # before JAX starts its backends (iaca_jax/runtime.py)
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  run, replicas = {
    'demo': (run_demo, DEMO_REPLICAS),
    'ablation': (run_ablation, ABLATION_REPLICAS),
    'claims': (run_claims, CLAIMS_REPLICAS),
    'why': (run_why, WHY_REPLICAS),
  }[f.mode]
  replicas = f.replicas or replicas
  cli.run_reporting_user_errors(lambda: run(f.results_dir, f.size, replicas))


if __name__ == '__main__':
  flags.DEFINE_enum('mode', 'demo', ['demo', 'ablation', 'claims', 'why'], 'What to run.')
  flags.DEFINE_string('results_dir', 'results/demo', 'Where data, runs, tables and figures go.')
  flags.DEFINE_enum('size', 'default', ['default', 'tiny'], 'Size of the generated synthetic set.')
  flags.DEFINE_integer(
    'replicas', 0, 'Seeds per variant, trained in one run (0: demo 3, ablation 5, claims 18).'
  )
  app.run(main, flags_parser=cli.parse_flags)
