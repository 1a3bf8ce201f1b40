r"""The fp32 matmul rate this CPU reaches through each library, and the vector units' own limit.

    .venv/bin/python tools/cpu_diagnostics/matmul_peaks.py [--n=2048] [--reps=7] [--out=...]

Why: the fusion benchmark charges each side with the peak measured in its own process, and JAX
(XLA:CPU with YNNPACK) reads about twice what PyTorch (MKL) does on the same cores. This checks that
JAX's figure is real work: besides one product timed alone, a loop of products where each one
consumes the result of the one before (nothing to cache or skip), compared with NumPy's BLAS and
with the limit of the cores' fused multiply-add units (cores x FMA pipes x lanes x 2 x clock).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(HERE)), 'bench')]

import common  # noqa: E402 (bench/common.py)
import numpy as np  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', 2048, 'Matrix size (n x n).')
flags.DEFINE_integer('reps', 7, 'Timed products per library (median).')
flags.DEFINE_integer('chain', 10, 'Products in the dependent chain (JAX).')
flags.DEFINE_string('out', os.path.join(HERE, 'results', 'matmul_peaks.json'), 'Where to write the JSON.')


def median_rate(product, n: int, reps: int) -> float:
  product()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    product()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / float(np.median(times))


def jax_rates(a: np.ndarray, b: np.ndarray, reps: int, chain: int) -> dict:
  import jax

  n = a.shape[0]
  x, y = jax.device_put(a), jax.device_put(b)
  single = jax.jit(lambda p, q: p @ q)
  # Each product reads the previous one's result: the loop's products cannot be shared or skipped.
  chained = jax.jit(lambda p, q: jax.lax.fori_loop(0, chain, lambda i, c: (c @ q) * (0.5 / n) + p, p))
  expected = a.astype(np.float64)
  for _ in range(chain):
    expected = expected @ b * (0.5 / n) + a
  error = float(np.abs(np.asarray(chained(x, y)) - expected).max())
  return dict(
    single=median_rate(lambda: single(x, y).block_until_ready(), n, reps),
    chained=chain * median_rate(lambda: chained(x, y).block_until_ready(), n, 3),
    chained_max_abs_error_vs_float64=error,
  )


def torch_rate(a: np.ndarray, b: np.ndarray, reps: int) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  x, y = torch.from_numpy(a), torch.from_numpy(b)
  return median_rate(lambda: torch.mm(x, y), a.shape[0], reps)


def fma_limit(isa: list[str], measured: float) -> dict:
  """The cores' fp32 FMA throughput per cycle, the clock the kernel reports (a VM may report only
  the nominal one) and the clock the measured rate implies at that throughput."""
  lanes = 16 if 'avx512f' in isa else 8 if 'avx2' in isa else 4
  per_cycle = (os.cpu_count() or 1) * 2 * lanes * 2  # two FMA pipes a core, 2 FLOP per FMA
  reported = None
  with open('/proc/cpuinfo') as f:
    mhz = [float(line.split(':')[1]) for line in f if line.startswith('cpu MHz')]
  if mhz:
    reported = max(mhz) * 1e6
  return dict(
    flops_per_cycle=per_cycle,
    assumes='two full-width FMA pipes a core (Zen 5, Intel server cores with AVX-512)',
    reported_clock_hz=reported,
    flops_per_s_at_reported_clock=per_cycle * reported if reported else None,
    clock_implied_by_measured_hz=measured / per_cycle,
  )


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  a = rng.standard_normal((FLAGS.n, FLAGS.n)).astype(np.float32)
  b = rng.standard_normal((FLAGS.n, FLAGS.n)).astype(np.float32)
  machine = common.machine()
  result = dict(
    machine=machine,
    n=FLAGS.n,
    load_before=common.load_average(),
    numpy=median_rate(lambda: a @ b, FLAGS.n, FLAGS.reps),
    jax=jax_rates(a, b, FLAGS.reps, FLAGS.chain),
    torch=torch_rate(a, b, FLAGS.reps),
    load_after=common.load_average(),
  )
  best = max(result['numpy'], result['jax']['single'], result['jax']['chained'], result['torch'] or 0)
  result['fma_limit'] = fma_limit(machine.get('cpu_isa', []), best)
  common.write_json(FLAGS.out, result)
  gflops = lambda x: f'{x / 1e9:.0f}' if x else '-'
  print(
    f'fp32 {FLAGS.n}^2 matmul, GFLOP/s: numpy {gflops(result["numpy"])}, jax {gflops(result["jax"]["single"])} '
    f'(dependent chain {gflops(result["jax"]["chained"])}), torch {gflops(result["torch"])}; '
    f'{result["fma_limit"]["flops_per_cycle"]} FLOP/cycle -> the best implies '
    f'{result["fma_limit"]["clock_implied_by_measured_hz"] / 1e9:.2f} GHz -> {FLAGS.out}'
  )


if __name__ == '__main__':
  app.run(main)
