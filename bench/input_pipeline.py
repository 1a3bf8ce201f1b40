r"""Benchmark of the data stage: synthetic generation, shard build and input-pipeline throughput.

    .venv/bin/python bench/input_pipeline.py [--work_dir=/tmp/iaca_bench_input] [--reuse]

Generates the default synthetic set, builds its shards, then measures the
pipeline in windows/s and windows per CPU-second (per core): training mode (JPEG decoding + jitter + normalisation),
evaluation mode (decoding + normalisation, padded batches) and evaluation
without faces (features other than 'video', as a precomputed-feature model
would read). Prints the numbers and writes bench/results/input_pipeline.json.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import build  # noqa: E402
from data.synthetic_av import generate  # noqa: E402
from iaca_jax import input_pipeline as ip  # noqa: E402

flags.DEFINE_string('work_dir', '/tmp/iaca_bench_input', 'Where the raw set and shards go.')
flags.DEFINE_string('size', 'default', 'Synthetic size preset.')
flags.DEFINE_bool('reuse', False, 'Reuse a raw set / shards already in work_dir (no timing).')
flags.DEFINE_integer('batch_size', 8, 'Global (= per-host) batch size.')
flags.DEFINE_string(
  'out',
  os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'input_pipeline.json'),
  'JSON result file.',
)
FLAGS = flags.FLAGS


def _dir_size(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)  # every tf.data thread of this process
  return usage.ru_utime + usage.ru_stime


def _throughput(batches, skip=1):
  """Windows/s over all batches after the first `skip` (warm-up: tracing, file opening), and
  windows per CPU-second of this process (= per fully used core; robust to a busy machine)."""
  it = iter(batches)
  for _ in range(skip):
    next(it)
  start, cpu_start, windows, count = time.perf_counter(), _cpu_seconds(), 0, 0
  for b in it:
    windows += int(b['valid_window'].sum())
    count += 1
  elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
  return dict(
    windows=windows,
    batches=count,
    seconds=round(elapsed, 2),
    windows_per_s=round(windows / elapsed, 2),
    cpu_seconds=round(cpu, 2),
    windows_per_cpu_s=round(windows / cpu, 2),
  )


def main(argv):
  del argv
  raw = os.path.join(FLAGS.work_dir, 'raw')
  data_dir = os.path.join(FLAGS.work_dir, 'tfds')
  result = dict(
    machine=dict(cpus=os.cpu_count(), python=platform.python_version(), load_avg_before=os.getloadavg()),
    size=FLAGS.size,
    batch_size=FLAGS.batch_size,
  )
  if not (FLAGS.reuse and os.path.isdir(raw)):
    shutil.rmtree(raw, ignore_errors=True)
    start = time.perf_counter()
    side = generate.generate(raw, generate.SIZES[FLAGS.size], seed=0, overwrite=True)
    result['generate'] = dict(
      seconds=round(time.perf_counter() - start, 1),
      videos=len(side['videos']),
      frames=sum(v['num_frames'] for v in side['videos'].values()),
      megabytes=round(_dir_size(raw) / 2**20, 1),
    )
    print('generate:', result['generate'], flush=True)
  if not (FLAGS.reuse and os.path.isdir(data_dir)):
    shutil.rmtree(data_dir, ignore_errors=True)
    start = time.perf_counter()
    builder = build.build('synthetic_av', raw, data_dir)
    result['build'] = dict(
      seconds=round(time.perf_counter() - start, 1),
      windows={k: v.num_examples for k, v in builder.info.splits.items()},
      megabytes=round(_dir_size(data_dir) / 2**20, 1),
    )
    print('build:', result['build'], flush=True)
  common = dict(global_batch_size=FLAGS.batch_size, process_index=0, process_count=1)
  result['train'] = _throughput(ip.create_train_dataset('synthetic_av', data_dir, seed=0, **common))
  print('train (decode + jitter):', result['train'], flush=True)
  result['eval'] = _throughput(ip.create_eval_dataset('synthetic_av', data_dir, split='validation', **common))
  print('eval (decode):', result['eval'], flush=True)
  no_video = [f for f in ip.get_builder('synthetic_av', data_dir).info.features if f != 'video']
  result['eval_no_video'] = _throughput(
    ip.create_eval_dataset('synthetic_av', data_dir, split='validation', features=no_video, **common)
  )
  print('eval without faces:', result['eval_no_video'], flush=True)
  result['machine']['load_avg_after'] = os.getloadavg()
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    json.dump(result, f, indent=1)
  print('wrote', FLAGS.out)


if __name__ == '__main__':
  app.run(main)
