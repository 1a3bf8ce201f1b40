"""Sums over many elements written as products with a vector of ones: a CPU kernel (docs/PERFORMANCE.md,
"CPU kernels").

XLA:CPU rewrites a reduction over more than 32 elements into a reduce-window over blocks and emits it as a
scalar loop that reads ~1-2 GB/s: in the fusion train step the spatial attention's bias gradient (a sum
over 50,176 rows of 512) took 46 ms, the global norms ~0.8 ms per 4 MiB parameter, the sum over the time
and batch axes of each LSTM bias gradient ~3 ms. The same sums as matrix products run in YNNPACK's matrix
kernels at memory speed (4 ms, 0.2 ms, 0.1 ms). YNNPACK's own reductions stay off (iaca_jax/runtime.py:
they drop NaN); a product propagates NaN and infinities as a sum does (tests/test_cpu_reductions.py).
Other backends, where reductions are fast and fuse with their producers, use the plain `jnp` sums of
`iaca_jax.models.kernels`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from iaca_jax.models.kernels import accumulator as _accumulator


def sum_leading(x: jnp.ndarray) -> jnp.ndarray:
  """The sum over every axis but the last: (..., C) -> (C,), in x's dtype (accumulated in >= float32)."""
  if x.ndim < 2:
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)), dtype=_accumulator(x.dtype)).astype(x.dtype)
  rows = x.reshape(-1, x.shape[-1])
  ones = jnp.ones(rows.shape[:1], x.dtype)
  return jnp.einsum('n,nc->c', ones, rows, preferred_element_type=_accumulator(x.dtype)).astype(x.dtype)


def sum_trailing(x: jnp.ndarray, axes: int = 1) -> jnp.ndarray:
  """The sum over the last `axes` axes: (..., *trailing) -> (...), accumulated in >= float32 and
  returned in that precision."""
  lead = x.shape[: x.ndim - axes]
  if axes == 0:
    return x.astype(_accumulator(x.dtype))
  columns = x.reshape(math.prod(lead), -1)
  ones = jnp.ones(columns.shape[1:], x.dtype)
  return jnp.einsum('nk,k->n', columns, ones, preferred_element_type=_accumulator(x.dtype)).reshape(lead)


def sum_of_squares(tree) -> jnp.ndarray:
  """The sum of the squares of every element of a pytree of arrays, a float32 (or wider) scalar."""
  total = jnp.zeros((), jnp.float32)
  for leaf in map(jnp.asarray, jax.tree.leaves(tree)):
    square = jnp.square(leaf.astype(_accumulator(leaf.dtype)))
    total = total + jnp.sum(sum_trailing(square, min(leaf.ndim, 1)))
  return total


def global_norm(tree) -> jnp.ndarray:
  """sqrt(sum of squares) over a pytree (optax.tree.norm), the sums as products."""
  return jnp.sqrt(sum_of_squares(tree))


def all_finite(x: jnp.ndarray) -> jnp.ndarray:
  """Whether no element of x is NaN or infinite (a bool scalar).

  x times a vector of zeros, as a product, is 0 where a row is finite and NaN where it is not
  (inf * 0 = NaN); only the row results are then checked. The zeros pass an optimization barrier, so
  that no simplification can fold the product to 0.
  """
  if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  # Rows of at least 256 elements (e.g. (..., 112, 3) for raw RGB frames), so that the row results
  # to check are few.
  row = 1
  for size in reversed(x.shape):
    row *= size
    if row >= 256:
      break
  columns = x.reshape(-1, row)
  zeros = jax.lax.optimization_barrier(jnp.zeros(columns.shape[1:], x.dtype))
  return jnp.all(jnp.isfinite(jnp.einsum('nk,k->n', columns, zeros, preferred_element_type=jnp.float32)))
