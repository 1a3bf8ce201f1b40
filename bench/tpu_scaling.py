r"""The docs/SCALING.md table: the paper config compiled for five TPU slices (train_compile.py, libtpu,
no TPU needed), on raw frames, on cached features, and as 32 replicas, with the roofline estimates and
the estimated wall time of the paper's experiment on each slice.

  python bench/tpu_scaling.py [--rows=v5e-8/raw,...] [--reuse] [--out=bench/results/tpu_scaling]

Each row is one `train_compile.py` command (printed, and kept in the row's JSON report under
OUT/<row>.json); --reuse keeps the reports already there (an interrupted run resumes). Writes
OUT.json (every row's figures) and OUT.md (the table). A 2-core host takes 1-6 minutes per row.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from iaca_jax.fileio import atomic_write  # noqa: E402
from iaca_jax.topology import parse_topology  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('rows', [], 'Rows to compile (default: all), e.g. v5e-8/raw,v5e-256/replicas.')
flags.DEFINE_bool('reuse', False, 'Keep the row reports already written.')
flags.DEFINE_string('out', 'bench/results/tpu_scaling', 'Output prefix: OUT/<row>.json, OUT.json, OUT.md.')

# Cloud TPU names (chips; v4 and v5p count TensorCores, two per chip) -> libtpu topologies.
SLICES = {
  'v4-8': 'v4:2x2x1',
  'v5e-8': 'v5e:2x4',
  'v5e-256': 'v5e:16x16',
  'v5p-128': 'v5p:4x4x4',
  'v6e-256': 'v6e:16x16',
}
PAPER_BATCH = 64
REPLICAS = 32
# Aff-Wild2 (VA track, ABAW 2023 release): 594 videos, about 3.0 M frames; 356 training and 76 validation
# videos. A window is 16 clips and every frame ends exactly one clip, so windows = frames / 16; the
# split sizes below take each split's share of the videos (no per-split frame count is published here).
FRAMES, VIDEOS, TRAIN_VIDEOS, VALIDATION_VIDEOS = 3.0e6, 594, 356, 76
TRAIN_WINDOWS = FRAMES / 16 * TRAIN_VIDEOS / VIDEOS
VALIDATION_WINDOWS = FRAMES / 16 * VALIDATION_VIDEOS / VIDEOS
EPOCHS = 30


def row_args(name: str) -> list[str]:
  """The train_compile.py arguments of row `<slice>/<raw|cached|replicas>`."""
  slice_name, kind = name.split('/')
  topology = SLICES[slice_name]
  n = math.prod(parse_topology(topology)[1])
  args = ['train_compile.py', '--config', 'configs/tpu.py', f'--topology={topology}']
  if kind == 'replicas':  # each group of gcd(32, chips) trains 32/groups replicas on the paper batch
    args += [f'--config.replicas.count={REPLICAS}', '--config.replicas.shard=True']
  else:  # the paper batch, or one sequence per chip on a slice of more than 64 chips
    args.append(f'--config.dataset.batch_size={max(PAPER_BATCH, n)}')
  if kind == 'raw':
    args.append('--config.dataset.features_dir=None')
  return args


ROWS = [f'{s}/{k}' for s in SLICES for k in ('raw', 'cached', 'replicas')]


def run_row(name: str, path: str) -> dict:
  args = row_args(name) + [f'--report={path}']
  print(f'--- {name}: python {shlex.join(args)}', flush=True)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
  print('\n'.join(line for line in proc.stdout.splitlines()), flush=True)
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  if errors:
    print(errors[-1], flush=True)
  if not os.path.exists(path):
    raise RuntimeError(f'{name}: no report written (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  report = json.load(open(path))
  report['command'] = 'python ' + shlex.join(args[:-1])
  report['wall_s'] = time.perf_counter() - start
  atomic_write(path, json.dumps(report, indent=1))
  return report


def summarise(name: str, report: dict, reports: dict) -> dict:
  """The table's figures of one row; the wall time of the paper's experiment on that slice."""
  row = dict(row=name, command=report['command'])
  if 'error' in report:
    row.update(fits=False, error=report['error'])
    return row
  train, evaluate = report['steps']['train'], report['steps']['eval']
  step_s = train['roofline']['step_s']
  steps_per_epoch = TRAIN_WINDOWS // report['global_batch']
  row.update(
    fits=report['fits'],
    layout=report['layout'],
    global_batch=report['global_batch'],
    memory_gib=report['peak_bytes'] / 2**30,
    hbm_gib=report['chip']['hbm_bytes'] / 2**30,
    step_ms=step_s * 1e3,
    bound_by=train['roofline']['bound_by'],
    mfu_bound=train['roofline']['mfu_bound'],
    compile_s=train['compile_s'],
    training_h=EPOCHS * steps_per_epoch * step_s / 3600,
  )
  slice_name, kind = name.split('/')
  if kind == 'raw':  # the encoders' pass over the windows is the raw eval step, once per window
    row['cache_features_h'] = (
      (TRAIN_WINDOWS + VALIDATION_WINDOWS) / report['global_batch'] * (evaluate['roofline']['step_s'] / 3600)
    )
    row['experiment_h'] = row['training_h']
  else:
    raw = reports.get(f'{slice_name}/raw')
    caching = summarise(f'{slice_name}/raw', raw, {}).get('cache_features_h') if raw else None
    row['experiment_h'] = None if caching is None else caching + row['training_h']
  return row


def table(rows: list[dict]) -> str:
  lines = [
    '| slice | input | fits | memory per chip (GiB) | step (ms, bound) | MFU bound | global batch | paper experiment (h) |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    slice_name, kind = r['row'].split('/')
    kind = {'raw': 'raw frames', 'cached': 'cached features', 'replicas': f'{REPLICAS} replicas (cached)'}[
      kind
    ]
    if 'error' in r:
      lines.append(f'| {slice_name} | {kind} | no: {r["error"][:90]} | | | | | |')
      continue
    hours = '?' if r['experiment_h'] is None else f'{r["experiment_h"]:.2f}'
    lines.append(
      f'| {slice_name} | {kind} | {"yes" if r["fits"] else "no"} | {r["memory_gib"]:.2f} of {r["hbm_gib"]:.1f} | '
      f'{r["step_ms"]:.2f} ({r["bound_by"]}) | {r["mfu_bound"]:.1%} | {r["global_batch"]} | {hours} |'
    )
  return '\n'.join(lines)


def main(argv):
  del argv
  out = os.path.join(REPO, FLAGS.out)
  os.makedirs(out, exist_ok=True)
  names = FLAGS.rows or ROWS
  reports = {}
  for name in ROWS:
    path = os.path.join(out, name.replace('/', '_') + '.json')
    if name in names and not (FLAGS.reuse and os.path.exists(path)):
      reports[name] = run_row(name, path)
    elif os.path.exists(path):
      reports[name] = json.load(open(path))
  rows = [summarise(name, reports[name], reports) for name in ROWS if name in reports]
  summary = dict(train_windows=TRAIN_WINDOWS, validation_windows=VALIDATION_WINDOWS, epochs=EPOCHS, rows=rows)
  atomic_write(out + '.json', json.dumps(summary, indent=1))
  atomic_write(out + '.md', table(rows) + '\n')
  print(table(rows))


if __name__ == '__main__':
  app.run(main)
