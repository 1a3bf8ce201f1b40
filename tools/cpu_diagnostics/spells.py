r"""The machine's speed over time: three fixed kernels timed in turn for `--seconds`, with the median of
each 1-second window. It tells whether a benchmark's noise is the machine's (on the shared 2-core VM
of issue 15 the memory bandwidth came in spells of seconds; tools/cpu_diagnostics/README.md).

    .venv/bin/python tools/cpu_diagnostics/spells.py --seconds=90   # -> tools/cpu_diagnostics/results/spells.json

The kernels: a 2048^2 fp32 matrix product (compute-bound, ~17 GFLOP), an elementwise pass over 64 MiB
(memory-bound: `tanh(x) * 1.5 + x`, 128 MiB moved), and the co-attention's fused dropout mask over
8M elements (integer ALU work, no memory traffic to speak of). Run it alone: other jobs on the cores
make spells of their own.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'bench'), HERE]

import common  # noqa: E402 (bench/common.py)
import common_diag  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from iaca_jax import runtime  # noqa: E402
from iaca_jax.cpu_kernels import dropout  # noqa: E402

flags.DEFINE_float('seconds', 60.0, 'How long to watch.')
flags.DEFINE_string('out', '', 'JSON output (default tools/cpu_diagnostics/results/spells.json).')
FLAGS = flags.FLAGS


def kernels() -> dict:
  """name -> (jitted function, its argument)."""
  square = jax.random.normal(jax.random.key(0), (2048, 2048))
  vector = jax.random.normal(jax.random.key(1), (64 * 2**20 // 4,))
  return {
    'matmul': (jax.jit(lambda a: a @ a), square),
    'elementwise': (jax.jit(lambda x: jnp.tanh(x) * 1.5 + x), vector),
    'mask': (jax.jit(lambda key: dropout.bernoulli(key, 0.4, (16, 512, 1024))), jax.random.key(2)),
  }


def main(argv) -> None:
  del argv
  runtime.configure_process()  # as the entry points do, before any device is used
  timed = {name: lambda _, fn=fn, arg=arg: fn(arg) for name, (fn, arg) in kernels().items()}
  for call in timed.values():
    common.time_calls(call, None, 1)  # compiles
  windows, load_before, end = [], common.load_average(), time.time() + FLAGS.seconds
  while time.time() < end:
    start, times = time.time(), {name: [] for name in timed}
    while time.time() - start < 1.0:
      for name, call in timed.items():
        times[name] += common.time_calls(call, None, 1)[0]
    windows.append({name: statistics.median(t) for name, t in times.items()})
  summary = {}
  for name in timed:
    series = [w[name] for w in windows]
    summary[name] = dict(fastest_s=min(series), median_s=statistics.median(series), slowest_s=max(series))
    summary[name]['slowest_over_fastest'] = max(series) / min(series)
    print(
      f'{name:12s} 1-s windows: fastest {1e3 * min(series):.2f} ms, median {1e3 * statistics.median(series):.2f} '
      f'ms, slowest {1e3 * max(series):.2f} ms ({max(series) / min(series):.2f}x)'
    )
  common_diag.write_run(
    FLAGS.out,
    'spells.json',
    load_average=[load_before, common.load_average()],
    summary=summary,
    windows_s=windows,
  )


if __name__ == '__main__':
  app.run(main)
