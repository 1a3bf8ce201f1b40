r"""The whole experiment on the synthetic set, from one command.

  python experiments.py --mode=demo --results_dir=results/demo      # what `make demo` runs
  python experiments.py --mode=ablation --results_dir=results/demo  # {ca,jca,rjca} x {none,iaca}

Steps (each skipped when its output already exists, so a rerun resumes): generate the synthetic set
-> build the TFRecord shards -> cache the frozen encoders' features -> train each variant ->
evaluate (CCC, clean/corrupted frames, missing-audio sweep) -> tables and figures in results_dir.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from configs import synthetic_demo  # noqa: E402
from data import build  # noqa: E402
from data.synthetic_av import generate  # noqa: E402
from iaca_jax import cli, evaluate_lib, feature_cache, reports, train_lib  # noqa: E402
from iaca_jax.fileio import atomic_write  # noqa: E402

DEMO_VARIANTS = (
  ('rjca_iaca', dict(cross_attention='rjca', gating='iaca')),
  ('rjca_nogate', dict(cross_attention='rjca', gating='none')),
)
ABLATION_VARIANTS = tuple(
  (f'{ca}_{gate}', dict(cross_attention=ca, gating=gate))
  for ca in ('ca', 'jca', 'rjca')
  for gate in ('none', 'iaca')
) + (
  ('rjca_stage1', dict(cross_attention='rjca', gating='stage1')),
  ('rjca_iaca_t2_0.1', dict(cross_attention='rjca', gating='iaca', stage2_temperature=0.1)),
)


def log(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def demo_config(results_dir: str, **model_overrides) -> ml_collections.ConfigDict:
  config = synthetic_demo.get_config()
  config.dataset.data_dir = os.path.join(results_dir, 'tfds')
  config.dataset.features_dir = os.path.join(results_dir, 'features')
  config.model.update(model_overrides)
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
  results_dir: str, name: str, overrides: dict, *, missing_audio: bool, seeds: Sequence[int] = (0, 1, 2)
) -> dict:
  """Trains (or resumes) one variant and evaluates its best checkpoint."""
  config = demo_config(results_dir, **overrides)
  workdir = os.path.join(results_dir, 'runs', name)
  log(f'Training {name} in {workdir}')
  train_lib.train_and_evaluate(config, workdir)
  evaluator = evaluate_lib.Evaluator(config, workdir, 'best')
  output_dir = os.path.join(workdir, 'eval')
  result = {
    'name': name,
    'step': evaluator.step,
    'validation': evaluate_lib.score_split(evaluator, config.dataset.eval_split, output_dir),
  }
  if missing_audio:
    log(f'Missing-audio sweep for {name}')
    result['missing_audio'] = evaluate_lib.missing_audio_sweep(
      evaluator, config.dataset.eval_split, output_dir, seeds=seeds, label=name
    )
  result['evaluator'] = evaluator
  return result


def ablation_table(results: Sequence[dict]) -> str:
  lines = [
    '| variant | CCC_v | CCC_a | mean | mean, video corrupted | mean, audio corrupted |',
    '|---|---|---|---|---|---|',
  ]
  for r in results:
    v = r['validation']
    lines.append(
      f'| {r["name"]} | {v["ccc_valence"]:.4f} | {v["ccc_arousal"]:.4f} | {v["ccc_mean"]:.4f} | '
      f'{v.get("corrupt_video/ccc_mean", float("nan")):.4f} | '
      f'{v.get("corrupt_audio/ccc_mean", float("nan")):.4f} |'
    )
  return '\n'.join(lines) + '\n'


def run_demo(results_dir: str, size: str = 'default') -> str:
  start = time.time()
  config = prepare_data(results_dir, size=size)
  results = [
    run_variant(results_dir, name, overrides, missing_audio=True) for name, overrides in DEMO_VARIANTS
  ]
  iaca = results[0]['evaluator']
  clips = iaca.predict(config.dataset.eval_split)
  video = sorted({n.decode() for n in clips['video_name']})[0]
  figure = evaluate_lib.attention_figure(iaca, video, config.dataset.eval_split, results_dir, clips)
  submission = evaluate_lib.write_submission(iaca, 'test', results_dir)
  sweeps = [r['missing_audio'] for r in results]
  reports.plot_missing_audio(sweeps, os.path.join(results_dir, 'missing_audio.png'))
  summary = [
    '# Demo results (synthetic set)',
    '',
    f'Made by `make demo` in {time.time() - start:.0f} s.',
    '',
    '## Validation CCC (docs/DESIGN.md §5 protocol)',
    '',
    ablation_table(results),
    '## What the gates do (RJCA + IACA, mean gate values over validation clips)',
    '',
    reports.gate_table(clips),
    '## Missing audio (share of validation clips silenced; 3 seeds)',
    '',
    reports.missing_audio_table(sweeps),
    '![missing audio](missing_audio.png)',
    '',
    f'## Attention scores ({video})',
    '',
    f'![attention]({os.path.basename(figure)})',
    '',
    f'Challenge-format predictions for the test split: `{os.path.basename(submission)}`.',
    '',
  ]
  path = os.path.join(results_dir, 'RESULTS.md')
  atomic_write(path, '\n'.join(summary))
  atomic_write(
    os.path.join(results_dir, 'results.json'),
    json.dumps([{k: v for k, v in r.items() if k != 'evaluator'} for r in results], indent=1, default=float),
  )
  log(f'Done in {time.time() - start:.0f} s: see {path}')
  return path


def run_ablation(results_dir: str, size: str = 'default') -> str:
  prepare_data(results_dir, size=size)
  results = [
    run_variant(results_dir, name, overrides, missing_audio=False) for name, overrides in ABLATION_VARIANTS
  ]
  path = os.path.join(results_dir, 'ablation.md')
  atomic_write(path, '# Ablation on the synthetic set (validation)\n\n' + ablation_table(results))
  log(f'Ablation table: {path}')
  return path


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  run = run_demo if f.mode == 'demo' else run_ablation
  cli.run_reporting_user_errors(lambda: run(f.results_dir, f.size))


if __name__ == '__main__':
  flags.DEFINE_enum('mode', 'demo', ['demo', 'ablation'], 'What to run.')
  flags.DEFINE_string('results_dir', 'results/demo', 'Where data, runs, tables and figures go.')
  flags.DEFINE_enum('size', 'default', ['default', 'tiny'], 'Size of the generated synthetic set.')
  app.run(main, flags_parser=cli.parse_flags)
