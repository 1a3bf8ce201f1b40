"""Dropout whose mask is one fused elementwise expression, bit-identical to `nn.Dropout`.

The dense co-attention layer drops out a (batch, 512, 1024) affinity: 33.5M elements at the paper's
size, four times a step. XLA's CPU lowering of JAX's threefry primitive runs its five rounds as a
loop over full-size arrays, so drawing those masks took ~30% of the fusion train step on a CPU
(profile in docs/PERFORMANCE.md). Written out as the same arithmetic on the element index, the hash
fuses with the select into one pass, 5x faster on a CPU, and the mask equals
`jax.random.bernoulli`'s (hence `nn.Dropout`'s) bit for bit: same keys, same bits, same outputs
(tests/test_dropout.py). `IACAModel(fused_dropout=False)` uses `nn.Dropout` instead.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), the hash behind JAX's default PRNG."""
  rotl = lambda v, r: (v << np.uint32(r)) | (v >> np.uint32(32 - r))
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ rotl(x2, r)
    x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def is_fusable_threefry(key, shape) -> bool:
  """Whether `bernoulli` writes out the hash for this key and shape (else jax.random.bernoulli)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(key))
  else:
    impl = jax.config.jax_default_prng_impl
  return (
    impl == 'threefry2x32'
    and jax.config.jax_threefry_partitionable
    and key.shape in ((), (2,))
    and 0 < math.prod(shape) < 2**32
  )


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jnp.ndarray:
  """`jax.random.bernoulli(key, p, shape)` (mode 'low'), bit for bit, as fusable elementwise ops.

  Falls back to `jax.random.bernoulli` for other PRNG implementations, the non-partitionable
  threefry mode, or arrays of 2**32 elements or more.
  """
  if not is_fusable_threefry(key, shape):
    return jax.random.bernoulli(key, p, shape)
  return bernoulli_block(key, p, shape, (0,) * len(shape), shape)


def bernoulli_block(
  key: jax.Array, p: float, shape: tuple[int, ...], start: tuple, block_shape: tuple[int, ...]
) -> jnp.ndarray:
  """The block `[start : start + block_shape]` of `bernoulli(key, p, shape)`, computed on its own.

  `start` may hold traced integers (e.g. a loop counter times the block size). Only for keys where
  `is_fusable_threefry(key, shape)` holds: the mask bits hash each element's row-major index in the
  whole `shape`, so a block needs no other element's bits.
  """
  if not is_fusable_threefry(key, shape):
    raise ValueError(f'bernoulli_block needs a partitionable threefry key and < 2**32 elements; got {key}')
  k1, k2 = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  # Partitionable threefry hashes the (hi, lo) 32-bit halves of each element's row-major index.
  index, stride = jnp.zeros(block_shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    offset = jnp.asarray(start[axis]).astype(jnp.uint32)
    index = index + (jax.lax.broadcasted_iota(jnp.uint32, block_shape, axis) + offset) * np.uint32(stride)
    stride *= shape[axis]
  bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros(block_shape, jnp.uint32), index)
  bits = bits1 ^ bits2
  # jax.random.uniform: 23 mantissa bits -> [1, 2) -> [0, 1); then bernoulli's `u < p`.
  float_bits = jax.lax.shift_right_logical(bits, np.uint32(32 - 23)) | np.uint32(0x3F800000)
  uniform = jax.lax.bitcast_convert_type(float_bits, jnp.float32) - np.float32(1.0)
  uniform = jnp.maximum(np.float32(0.0), uniform * np.float32(1.0) + np.float32(0.0))
  return uniform < np.float32(p)


class FusedDropout(nn.Dropout):
  """`nn.Dropout` (same fields, rng stream and result) whose mask comes from `bernoulli` above.

  Give it the name `nn.Dropout` would get (`Dropout_<n>`) to keep a model's rng streams unchanged.
  """

  def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0 or self.broadcast_dims:
      # nn.Dropout merges `deterministic` itself: pass it on only if it came at call time.
      return super().__call__(inputs, None if self.deterministic is not None else deterministic, rng)
    keep_prob = 1.0 - self.rate
    rng = self.make_rng(self.rng_collection) if rng is None else rng
    mask = bernoulli(rng, keep_prob, inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
