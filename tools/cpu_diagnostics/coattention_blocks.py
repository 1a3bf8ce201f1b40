r"""Row chunks of the dense co-attention (`iaca_jax.cpu_kernels.coattention.coattend`), timed at the
paper's size: one affinity (64, 512, 1024) in fp32, forward + backward, dropout on, against the
affinity differentiated by JAX (`dense`). The variants alternate within each repetition; the median
and minimum wall time and the process CPU time per call are reported. Steps run inline, as the entry
points run them on a CPU (`iaca_jax.runtime.configure_process`).

    .venv/bin/python tools/cpu_diagnostics/coattention_blocks.py
    .venv/bin/python tools/cpu_diagnostics/coattention_blocks.py --chunks=1,2,64 --reps=7
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'bench'), HERE]

import common  # noqa: E402 (bench/common.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from iaca_jax import runtime  # noqa: E402
from iaca_jax.cpu_kernels.coattention import coattend  # noqa: E402
from iaca_jax.cpu_kernels.dropout import bernoulli  # noqa: E402

flags.DEFINE_string('chunks', '1,2,4,8,64', 'Batch rows per chunk (64: the whole batch, no loop).')
flags.DEFINE_integer('reps', 5, 'Repetitions of each variant (alternated).')
flags.DEFINE_integer('batch', 64, 'Batch.')
flags.DEFINE_string('out', '', 'JSON result file (default: none).')
FLAGS = flags.FLAGS

D, L, RATE = 512, 16, 0.6


def dense(keys, joint, values, rng):
  affinity = jnp.tanh(jnp.einsum('bdl,blj->bdj', keys, joint) / math.sqrt(joint.shape[-1]))
  mask = bernoulli(rng, 1.0 - RATE, affinity.shape)
  affinity = jax.lax.select(mask, affinity / (1.0 - RATE), jnp.zeros_like(affinity))
  return jax.nn.relu(jnp.tanh(jnp.einsum('bld,bdj->blj', values, affinity)))


def main(argv):
  del argv
  runtime.configure_process()  # as the entry points do, before any device is used
  keys_ = jax.random.split(jax.random.key(0), 4)
  b = FLAGS.batch
  inputs = (
    jax.random.normal(keys_[0], (b, D, L)),
    jax.random.normal(keys_[1], (b, L, 2 * D)),
    jax.random.normal(keys_[2], (b, L, D)),
  )
  cotangent = jax.random.normal(keys_[3], (b, L, 2 * D))
  rng = jax.random.key(5)

  def step(fn):
    return jax.jit(jax.grad(lambda args: jnp.sum(fn(*args, rng) * cotangent)))

  variants = {'dense': step(dense)}
  for chunk in (int(c) for c in FLAGS.chunks.split(',')):
    variants[str(chunk)] = step(
      lambda k, j, v, r, chunk=chunk: coattend(
        k, j, v, bernoulli(r, 1.0 - RATE, (k.shape[0], D, 2 * D)), keep=1.0 - RATE, chunk=chunk
      )
    )
  for fn in variants.values():
    jax.block_until_ready(fn(inputs))
  times = {name: [] for name in variants}
  cpus = {name: [] for name in variants}
  for _ in range(FLAGS.reps):
    for name, fn in variants.items():
      start, cpu = time.perf_counter(), common.cpu_seconds()
      jax.block_until_ready(fn(inputs))
      times[name].append(time.perf_counter() - start)
      cpus[name].append(common.cpu_seconds() - cpu)
  rows = [
    dict(
      variant=name,
      median_ms=1e3 * float(np.median(t)),
      min_ms=1e3 * min(t),
      cpu_ms=1e3 * float(np.median(cpus[name])),
      vs_dense=float(np.median(t) / np.median(times['dense'])),
    )
    for name, t in times.items()
  ]
  print(f'load {common.load_average()}')
  print(
    common.table(
      rows,
      [
        ('variant', 'chunk', 's'),
        ('median_ms', 'median ms', '.0f'),
        ('min_ms', 'min ms', '.0f'),
        ('cpu_ms', 'CPU ms', '.0f'),
        ('vs_dense', 'vs dense', '.2f'),
      ],
    )
  )
  if FLAGS.out:
    common.write_json(FLAGS.out, dict(command=' '.join(['python'] + sys.argv), rows=rows, times=times))


if __name__ == '__main__':
  app.run(main)
