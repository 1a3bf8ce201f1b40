"""The dense co-attention's affinity product, block by block (docs/PERFORMANCE.md, "Fusion step vs
PyTorch").

Per modality the authors' dense co-attention computes
    affinity = dropout(tanh(keys @ joint / sqrt(D)))        (B, d, D) = (64, 512, 1024): 128 MiB in fp32
    hidden   = relu(tanh(values @ affinity))                (B, L, D)
with keys (B, d, L), joint (B, L, D), values (B, L, d). Written whole, the affinity is stored,
read back and, in the backward pass, written and read again several times per layer: at the paper's
size that traffic, not the 26 GFLOP of products, was 60% of the fusion train step on a CPU.
Columns of the affinity are independent, so `coattend` computes it per block of (batch rows,
columns): both products, tanh and dropout of a block stay in cache, and the backward pass recomputes
the block (`jax.checkpoint`) instead of storing it; only the dropout mask's bits are kept. The mask
of a block is the same slice of the same hash as the whole mask's (`dropout.bernoulli_block`), so
the result equals the dense formulation up to float summation order (tests/test_cross_attention.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from iaca_jax.models.dropout import bernoulli_block

Dtype = Any

# (batch rows, affinity columns) per block on a CPU, chosen by measurement (bench/coattention_blocks.py).
CPU_BLOCK = (4, 128)


def default_block(batch: int, columns: int) -> tuple[int, int]:
  """The block shape for the default backend: `CPU_BLOCK` on a CPU; elsewhere the whole affinity in
  one block, i.e. the dense formulation's work with no loop (a sequential loop of small blocks would
  leave most of an accelerator idle; not measured on one)."""
  if jax.default_backend() == 'cpu':
    return CPU_BLOCK
  return (batch, columns)


def _divisor_at_most(n: int, want: int) -> int:
  return max(k for k in range(1, min(n, max(want, 1)) + 1) if n % k == 0)


def coattend(
  keys: jnp.ndarray,
  joint: jnp.ndarray,
  values: jnp.ndarray,
  *,
  rate: float,
  rng: jax.Array | None,
  dtype: Dtype = jnp.float32,
  block: tuple[int, int] | None = None,
  save_mask: bool = True,
) -> jnp.ndarray:
  """relu(tanh(values @ dropout(tanh(keys @ joint / sqrt(D))))), block by block.

  keys (B, d, L), joint (B, L, D), values (B, L, d) -> (B, L, D). `rng`: the dropout key (None: no
  dropout), a partitionable threefry key (see `dropout.is_fusable_threefry`). Dropout with `rate`
  scales kept elements by 1 / (1 - rate), as `nn.Dropout` does. `block` = (batch rows, columns) per
  block, rounded down to divisors of B and D; None = `default_block`. `save_mask`: keep the dropout
  mask (bool, B * d * D bytes) for the backward pass instead of hashing again (1.5x faster on a CPU).
  """
  batch, d, _ = keys.shape
  columns = joint.shape[-1]
  rows, cols = block or default_block(batch, columns)
  rows, cols = _divisor_at_most(batch, rows), _divisor_at_most(columns, cols)
  n_rows, n_cols = batch // rows, columns // cols
  scale = math.sqrt(columns)
  keep = 1.0 - rate
  full_shape = (batch, d, columns)

  policy = jax.checkpoint_policies.save_only_these_names('dropout_mask') if save_mask else None

  @functools.partial(jax.checkpoint, policy=policy)
  def one_block(keys_b, joint_b, values_b, row, col):
    """(rows, d, L), (rows, L, cols), (rows, L, d) -> (rows, L, cols)."""
    affinity = jnp.einsum('bdl,blj->bdj', keys_b, joint_b) / scale
    affinity = jnp.tanh(affinity.astype(jnp.float32)).astype(dtype)
    if rng is not None and rate > 0.0:
      start = (row * rows, 0, col * cols)
      mask = checkpoint_name(bernoulli_block(rng, keep, full_shape, start, affinity.shape), 'dropout_mask')
      affinity = jax.lax.select(mask, affinity / keep, jnp.zeros_like(affinity))
    return jax.nn.relu(jnp.tanh(jnp.einsum('bld,bdj->blj', values_b, affinity)))

  def row_block(args):
    keys_b, joint_b, values_b, row = args  # joint_b: (n_cols, rows, L, cols)

    def col_block(inner):
      joint_c, col = inner
      return one_block(keys_b, joint_c, values_b, row, col)

    return jax.lax.map(col_block, (joint_b, jnp.arange(n_cols, dtype=jnp.uint32)))

  length = joint.shape[1]
  if n_rows == n_cols == 1:  # one block: no loop
    return one_block(keys, joint, values, jnp.uint32(0), jnp.uint32(0))
  joint_blocks = joint.reshape(n_rows, rows, length, n_cols, cols).transpose(0, 3, 1, 2, 4)
  hidden = jax.lax.map(
    row_block,
    (
      keys.reshape(n_rows, rows, d, length),
      joint_blocks,
      values.reshape(n_rows, rows, length, d),
      jnp.arange(n_rows, dtype=jnp.uint32),
    ),
  )  # (n_rows, n_cols, rows, L, cols)
  return hidden.transpose(0, 2, 3, 1, 4).reshape(batch, length, columns)
