r"""Benchmark of the preprocessing stage: windows per second of the default synthetic set's build in
one process, with N worker processes (`--num_workers`), and with Apache Beam's DirectRunner and N
worker processes.

    .venv/bin/python bench/build.py [--workers=2] [--rounds=2] [--work_dir=/tmp/iaca_bench_build]

Generates the default synthetic set once (kept in --work_dir), then builds it from scratch in
alternating rounds: `data.build.build` in this process, with `num_workers=N`, and with
`beam_pipeline_options=runner=DirectRunner,direct_running_mode=multi_processing,direct_num_workers=N`.
Each build's wall time covers everything `python -m data.build` does (planning: every annotation and
raw video checked; the windows; the shards). A Beam build that its own check stops (the runner lost
examples) is recorded as such. Results: bench/results/build_cpu.json.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from data import build  # noqa: E402
from data.synthetic_av import generate  # noqa: E402
from iaca_jax.preprocessing import DataError  # noqa: E402

flags.DEFINE_integer('workers', 2, 'Worker processes of the --num_workers and the Beam builds.')
flags.DEFINE_integer('rounds', 2, 'Alternating rounds of both builds.')
flags.DEFINE_string('work_dir', '/tmp/iaca_bench_build', 'Where the raw set and the shards go.')
flags.DEFINE_string('out', os.path.join(ROOT, 'bench', 'results', 'build_cpu.json'), 'JSON result file.')
FLAGS = flags.FLAGS


def timed_build(raw: str, data_dir: str, **options) -> dict:
  """Wall seconds, windows/s, and the CPU seconds of this process and of its finished children
  (the worker processes; Beam's are not all counted) per window."""
  shutil.rmtree(data_dir, ignore_errors=True)
  cpu = lambda who: sum(resource.getrusage(who)[:2])
  start, own, children = time.perf_counter(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
  try:
    builder = build.build('synthetic_av', raw, data_dir, **options)
  except DataError as e:
    return dict(seconds=round(time.perf_counter() - start, 2), failed=str(e))
  seconds = time.perf_counter() - start
  windows = sum(split.num_examples for split in builder.info.splits.values())
  return dict(
    seconds=round(seconds, 2),
    windows=windows,
    windows_per_s=round(windows / seconds, 2),
    own_cpu_ms_per_window=round(1000 * (cpu(resource.RUSAGE_SELF) - own) / windows, 2),
    children_cpu_ms_per_window=round(1000 * (cpu(resource.RUSAGE_CHILDREN) - children) / windows, 2),
  )


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  raw = os.path.join(FLAGS.work_dir, 'raw')
  if not os.path.isdir(raw):
    generate.generate(raw, generate.SIZES['default'], seed=0)
  beam = f'runner=DirectRunner,direct_running_mode=multi_processing,direct_num_workers={FLAGS.workers}'
  result = {
    'command': ' '.join(sys.argv),
    'machine': common.machine(),
    'commit': subprocess.run(
      ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip(),
    'load_average_before': common.load_average(),
    'beam_pipeline_options': beam,
    'rounds': [],
  }
  for i in range(FLAGS.rounds):
    row = {
      'one_process': timed_build(raw, os.path.join(FLAGS.work_dir, 'plain')),
      'workers': timed_build(raw, os.path.join(FLAGS.work_dir, 'workers'), num_workers=FLAGS.workers),
      'beam': timed_build(raw, os.path.join(FLAGS.work_dir, 'beam'), beam_pipeline_options=beam),
    }
    for kind in ('workers', 'beam'):
      if 'windows_per_s' in row[kind]:
        row[f'{kind}_over_one_process'] = round(
          row[kind]['windows_per_s'] / row['one_process']['windows_per_s'], 3
        )
    print(f'round {i}: {row}', flush=True)
    result['rounds'].append(row)
  result['load_average_after'] = common.load_average()
  common.write_json(FLAGS.out, result)
  print(f'Wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
