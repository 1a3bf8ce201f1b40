"""A CPU kernel: the dense co-attention's core with a hand-written backward pass, in row chunks
(docs/PERFORMANCE.md, "CPU kernels").

Per modality the authors' dense co-attention computes
    affinity = dropout(tanh(keys @ joint / sqrt(D)))        (B, d, D) = (64, 512, 1024): 128 MiB in fp32
    hidden   = relu(tanh(values @ affinity))                (B, L, D)
with keys (B, d, L), joint (B, L, D), values (B, L, d) (`iaca_jax.models.kernels.coattention`).
Differentiated by JAX, the affinity and its tanh are stored for the backward pass, which then writes
and reads several more tensors of that size per layer. `coattend` stores only the dropout mask (bool)
and the (B, L, D) output, recomputes the affinity in the backward pass and takes the shortest route to
the gradients: one elementwise pass and three products. It can run the batch one row chunk at a time
(`jax.lax.map`), so that every (chunk, d, D) intermediate stays in cache while each product and
elementwise pass of a chunk is still large enough for XLA to spread over the cores.

Chunks only on one device: over a mesh of several, XLA's partitioner gathers the whole batch into the
loop (each device would compute every row), so there the batch is one chunk and no loop is made.

The result equals the formulation JAX differentiates up to float summation order:
tests/test_cpu_coattention.py checks outputs and gradients within 1e-5.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.models import kernels

Dtype = Any

# Batch rows per chunk on one CPU device, chosen by measurement (tools/cpu_diagnostics/coattention_blocks.py
# and the step): one row's (512, 1024) fp32 affinity is 2 MiB, the size of two cores' second-level caches.
CPU_CHUNK = 1


def coattention(
  keys: jnp.ndarray,
  joint: jnp.ndarray,
  values: jnp.ndarray,
  dropout: nn.Module,
  *,
  dtype: Dtype = jnp.float32,
  chunk: int | None = CPU_CHUNK,
) -> jnp.ndarray:
  """`iaca_jax.models.kernels.coattention` through `coattend`; `dropout` is a `FusedDropout`, whose
  keep mask `coattend` applies. `chunk`: batch rows per loop iteration; None = the whole batch."""
  if dropout.rate >= 1.0:  # everything dropped: nothing to recompute
    return kernels.coattention(keys, joint, values, dropout, dtype=dtype)
  mask = dropout.keep_mask((keys.shape[0], keys.shape[1], joint.shape[-1]))
  return coattend(keys, joint, values, mask, keep=1.0 - dropout.rate, dtype=dtype, chunk=chunk)


def _divisor_at_most(n: int, want: int) -> int:
  return max(k for k in range(1, min(n, max(want, 1)) + 1) if n % k == 0)


def coattend(
  keys: jnp.ndarray,
  joint: jnp.ndarray,
  values: jnp.ndarray,
  mask: jnp.ndarray | None,
  *,
  keep: float,
  dtype: Dtype = jnp.float32,
  chunk: int | None = None,
) -> jnp.ndarray:
  """relu(tanh(values @ dropout(tanh(keys @ joint / sqrt(D))))).

  keys (B, d, L), joint (B, L, D), values (B, L, d) -> (B, L, D). `mask`: the dropout's keep mask
  (B, d, D) bool, or None for no dropout; kept elements are scaled by 1 / `keep` (0 < keep <= 1), as
  `nn.Dropout` does. `chunk`: batch rows per loop iteration, rounded down to a divisor of B; None =
  the whole batch (no loop).
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f'keep must be in (0, 1]; got {keep}')
  batch = keys.shape[0]
  chunk = batch if chunk is None else _divisor_at_most(batch, chunk)
  if chunk == batch:
    return _coattend(keys, joint, values, mask, keep, dtype)
  split = lambda x: None if x is None else x.reshape((batch // chunk, chunk) + x.shape[1:])
  hidden = jax.lax.map(
    lambda args: _coattend(*args, keep, dtype), (split(keys), split(joint), split(values), split(mask))
  )  # (B / chunk, chunk, L, D)
  return hidden.reshape((batch,) + hidden.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _coattend(keys, joint, values, mask, keep, dtype):
  return _forward(keys, joint, values, mask, keep, dtype)[0]


def _dropped_affinity(keys, joint, mask, keep, dtype):
  """(tanh of the affinity in fp32, the affinity after tanh and dropout in `dtype`), (B, d, D) each."""
  affinity = jnp.einsum('bdl,blj->bdj', keys, joint) / math.sqrt(joint.shape[-1])
  tanh = jnp.tanh(affinity.astype(jnp.float32))
  dropped = tanh.astype(dtype)
  if mask is not None:
    dropped = jax.lax.select(mask, dropped / keep, jnp.zeros_like(dropped))
  return tanh, dropped


def _forward(keys, joint, values, mask, keep, dtype):
  _, dropped = _dropped_affinity(keys, joint, mask, keep, dtype)
  hidden = jax.nn.relu(jnp.tanh(jnp.einsum('bld,bdj->blj', values, dropped)))
  return hidden, (keys, joint, values, mask, hidden)


def _backward(keep, dtype, residuals, grad):
  keys, joint, values, mask, hidden = residuals
  # hidden = relu(tanh(h)): d/dh = 1 - tanh(h)^2 where tanh(h) > 0, else 0 (JAX's relu'(0) = 0 too).
  grad_h = jnp.where(hidden > 0, grad * (1 - hidden * hidden), 0).astype(dtype)  # (B, L, D)
  tanh, dropped = _dropped_affinity(keys, joint, mask, keep, dtype)
  # Computed as (B, d, L) and transposed: XLA:CPU's product in this orientation (a 512 x 1024 by
  # 16 x 1024 product, contracted over 1024) took 1-3% less of the step than 'blj,bdj->bld' did.
  grad_values = jnp.swapaxes(jnp.einsum('bdj,blj->bdl', dropped, grad_h), 1, 2)  # (B, L, d)
  grad_dropped = jnp.einsum('bld,blj->bdj', values, grad_h)  # (B, d, D)
  if mask is not None:
    grad_dropped = jax.lax.select(mask, grad_dropped / keep, jnp.zeros_like(grad_dropped))
  grad_affinity = grad_dropped.astype(jnp.float32) * (1 - tanh * tanh) / math.sqrt(joint.shape[-1])
  grad_affinity = grad_affinity.astype(dtype)
  grad_keys = jnp.einsum('bdj,blj->bdl', grad_affinity, joint)
  grad_joint = jnp.einsum('bdl,bdj->blj', keys, grad_affinity)
  return grad_keys, grad_joint, grad_values, None


_coattend.defvjp(_forward, _backward)
