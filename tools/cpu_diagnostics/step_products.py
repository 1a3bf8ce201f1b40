r"""Every matrix product of a compiled train step, timed alone at its own shape: how long the step's
products take on this machine each by itself, against the flat floor (all of their FLOPs at the
2048^2 product's rate).

The "share of the matmul peak" of `bench/train_step.py` and `bench/fusion_vs_torch.py` charges every
FLOP at the rate of one (2048, 2048) product whose operands stay in cache. The step's products are
of other shapes, and most read operands that the op before them has just written to memory. This
tool lists the products of the compiled step (XLA's own dots and the YNNPACK fusions around them),
counts how often each runs per step (loop bodies included, from a `jax.profiler` trace), and times
each distinct product by itself, twice: with the same operands every call (cached) and cycling
through copies too large together for the last-level cache (fresh). The sums say how long the
step's products take when each runs alone at the rate this machine gives its shape. That is not a
strict floor: in the step two small products may run at once, one per core, which can beat one
product spread over both.

    .venv/bin/python tools/cpu_diagnostics/step_products.py            # the paper-size fusion step, fp32
    .venv/bin/python tools/cpu_diagnostics/step_products.py --case=demo --top=10 --out=/tmp/step_products_demo.json

Operands are made in the default (row-major) layout; XLA may have given the step's operands another.
"""

from __future__ import annotations

import collections
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'bench'), HERE]

import common  # noqa: E402 (bench/common.py)
import common_diag  # noqa: E402

from iaca_jax import runtime  # noqa: E402

os.environ['XLA_FLAGS'] = common.profile_flags(os.environ.get('XLA_FLAGS', ''))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import train_step  # noqa: E402, F401 (bench/train_step.py: registers the case flags used below)
from absl import app, flags  # noqa: E402

# --case, --warmup and --out are bench/train_step.py's flags (one case here; fusion by default).
flags.DEFINE_integer('traced_steps', 2, 'Steps in the trace that counts the products per step.')
flags.DEFINE_integer('fresh_mib', 128, 'Operand copies cycled through per product, in MiB (> the cache).')
flags.DEFINE_float('seconds', 0.3, 'Timing budget per distinct product and setting.')
flags.DEFINE_integer('top', 20, 'Products listed (by time per step, fresh operands).')
FLAGS = flags.FLAGS

_HLO_DTYPES = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16, 'f64': jnp.float64}


def _median_seconds(call, operands: list) -> float:
  """Median wall time of `call(*pair)`, cycling through the operand pairs (two untimed calls first)."""
  # The carry of `common.time_calls` is the index of the next pair; each call waits for its product.
  at = lambda index: (common.block(call(*operands[index % len(operands)])), index + 1)[1]
  _, _, index = common.time_calls(at, 0, 2)
  first, _, index = common.time_calls(at, index, 1)
  reps = int(min(200, max(5, FLAGS.seconds / max(first[0], 1e-6))))
  return statistics.median(common.time_calls(at, index, reps)[0])


def time_alone(product: tuple) -> dict:
  """Seconds of one product by itself, with its operands cached and fresh.

  A product whose operands and result take 8 MiB or more runs as one call: cached, the same operands
  every call; fresh, cycling through copies that together exceed --fresh_mib. A smaller one (the
  loops' products) runs 64 times or more in one compiled loop over stacked copies of its operands,
  as the step's loops run it, so that the time per product leaves out the host's dispatch of a call:
  cached, over as many copies as fit in 4 MiB with their results (two at least); fresh, over copies
  of --fresh_mib together.
  """
  dtype, lhs, rhs, (lc, rc, lb, rb) = product
  dot = lambda a, b: jax.lax.dot_general(a, b, ((lc, rc), (lb, rb)))
  contracted = math.prod(lhs[d] for d in lc)
  out = common_diag.product_flops(product) / (2 * contracted)
  nbytes = int(math.prod(lhs) + math.prod(rhs) + out) * jnp.dtype(_HLO_DTYPES[dtype]).itemsize
  keys = jax.random.split(jax.random.key(0), 2)
  operands = lambda copies: [
    tuple(
      jax.random.normal(key, (copies, *shape), jnp.float32).astype(_HLO_DTYPES[dtype])
      for key, shape in zip(keys, (lhs, rhs))
    )
  ]
  if nbytes >= 8 * 2**20:  # operands and result
    a, b = (x[0] for x in operands(1)[0])
    copies = max(2, min(64, math.ceil(FLAGS.fresh_mib * 2**20 / nbytes)))
    fresh = [(a + i, b + i) for i in range(copies)]  # distinct buffers
    call = jax.jit(dot)
    return dict(cached=_median_seconds(call, [(a, b)]), fresh=_median_seconds(call, fresh))
  # `count` products a call, over the copies in turn; each result replaces the last (no stacked
  # output to write, as in the step's loops).
  count = max(64, min(4096, FLAGS.fresh_mib * 2**20 // nbytes))
  looped = jax.jit(
    lambda a, b: jax.lax.fori_loop(
      0,
      count,
      lambda i, _: dot(a[i % a.shape[0]], b[i % a.shape[0]]),
      jnp.zeros(jax.eval_shape(dot, a[0], b[0]).shape, a.dtype),
    )
  )
  result = {}
  for setting, budget in (('cached', 4 * 2**20), ('fresh', FLAGS.fresh_mib * 2**20)):
    copies = max(2, min(count, budget // nbytes))  # 2 at least: a loop-invariant product would be hoisted
    result[setting] = _median_seconds(looped, operands(copies)) / count
  return result


def calls_per_step(compiled, state, batch, rng, warmup: int) -> tuple[collections.Counter, float]:
  """Trace events per op name and step, and the wall time of a traced step."""
  step = lambda carry: compiled(carry[0], batch, rng)
  _, _, carry = common.time_calls(step, (state, None), warmup + 1)
  (walls, _, _), events = common.traced(lambda: common.time_calls(step, carry, FLAGS.traced_steps))
  counts = collections.Counter(event['name'] for event in events)
  return (
    collections.Counter({name: n / FLAGS.traced_steps for name, n in counts.items()}),
    statistics.median(walls),
  )


def main(argv) -> None:
  del argv
  runtime.configure_process()  # as the entry points do, before any device is used
  case = common_diag.single_case()
  compiled, state, batch, rng, settings = common_diag.compiled_case(case)
  table = common_diag.hlo_products(compiled.as_text())
  counts, step_s = calls_per_step(compiled, state, batch, rng, settings['warmup'])
  del state  # donated; its buffers are gone
  per_step = collections.Counter()
  for name, found in table.items():
    for product in found:
      per_step[product] += counts.get(name, 0)
  per_step = {product: n for product, n in per_step.items() if n}
  peak = common.matmul_peak(jnp.float32)
  rows, total = [], collections.Counter()
  for product, n in per_step.items():
    alone = time_alone(product)
    gflop = n * common_diag.product_flops(product) / 1e9
    row = dict(
      dtype=product[0],
      lhs='x'.join(map(str, product[1])),
      rhs='x'.join(map(str, product[2])),
      dims=common_diag.product_contraction(product),
      per_step=n,
      gflop=gflop,
      cached_ms=1e3 * n * alone['cached'],
      fresh_ms=1e3 * n * alone['fresh'],
      cached_rate=gflop / (n * alone['cached']),
      fresh_rate=gflop / (n * alone['fresh']),
    )
    rows.append(row)
    total.update(gflop=gflop, cached_ms=row['cached_ms'], fresh_ms=row['fresh_ms'])
  rows.sort(key=lambda r: -r['fresh_ms'])
  flat_ms = 1e3 * total['gflop'] * 1e9 / peak['flops_per_s']
  print(
    f'{case}: {len(rows)} distinct products, {total["gflop"]:.1f} GFLOP a step; step {1e3 * step_s:.0f} ms '
    f'(traced); {peak["flops_per_s"] / 1e9:.0f} GFLOP/s peak ({peak["n"]}^2)'
  )
  print(
    common.table(
      rows[: FLAGS.top],
      [
        ('lhs', 'lhs', 's'),
        ('rhs', 'rhs', 's'),
        ('dims', 'contracted (lhs.rhs)', 's'),
        ('per_step', 'per step', '.0f'),
        ('gflop', 'GFLOP', '.2f'),
        ('cached_ms', 'ms cached', '.1f'),
        ('fresh_ms', 'ms fresh', '.1f'),
        ('cached_rate', 'GFLOP/s cached', '.0f'),
        ('fresh_rate', 'GFLOP/s fresh', '.0f'),
      ],
    )
  )
  summary = dict(
    flat_floor_ms=flat_ms,
    alone_cached_ms=total['cached_ms'],
    alone_fresh_ms=total['fresh_ms'],
    step_ms=1e3 * step_s,
  )
  print(
    f'products alone: {total["cached_ms"]:.0f} ms cached, {total["fresh_ms"]:.0f} ms fresh, against '
    f'{flat_ms:.0f} ms at the peak; share of the step at the peak {100 * flat_ms / summary["step_ms"]:.1f}%, '
    f"at the products' own rates (fresh) {100 * total['fresh_ms'] / summary['step_ms']:.1f}%"
  )
  common_diag.write_run(
    FLAGS.out,
    f'step_products_{case}.json',
    load_average=common.load_average(),
    peak=peak,
    summary=summary,
    products=rows,
  )


if __name__ == '__main__':
  app.run(main)
