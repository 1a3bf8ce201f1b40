"""A CPU kernel: dropout whose mask is one fused elementwise expression, bit-identical to `nn.Dropout`.

The dense co-attention layer drops out a (batch, 512, 1024) affinity: 33.5M elements at the paper's
size, four times a step. XLA's CPU lowering of JAX's threefry primitive runs its five rounds as a
loop over full-size arrays, so drawing those masks took ~30% of the fusion train step on a CPU
(profile in docs/PERFORMANCE.md). Written out as the same arithmetic on the element index, the hash
fuses with the select into one pass, 5x faster on a CPU, and the mask equals
`jax.random.bernoulli`'s (hence `nn.Dropout`'s) bit for bit: same keys, same bits, same outputs
(tests/test_cpu_dropout.py). The XLA kernels use `nn.Dropout`.
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
  k1, k2 = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  # Partitionable threefry hashes the (hi, lo) 32-bit halves of each element's row-major index; the
  # index fits in the low half (fewer than 2**32 elements).
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), index)
  bits = bits1 ^ bits2
  # jax.random.uniform: 23 mantissa bits -> [1, 2) -> [0, 1); then bernoulli's `u < p`.
  float_bits = jax.lax.shift_right_logical(bits, np.uint32(32 - 23)) | np.uint32(0x3F800000)
  uniform = jax.lax.bitcast_convert_type(float_bits, jnp.float32) - np.float32(1.0)
  uniform = jnp.maximum(np.float32(0.0), uniform * np.float32(1.0) + np.float32(0.0))
  return uniform < np.float32(p)


class FusedDropout(nn.Dropout):
  """`nn.Dropout` (same fields, rng stream and result) whose mask comes from `bernoulli` above.

  `keep_mask` gives the mask alone, for kernels that apply it themselves (cpu_kernels/coattention.py).
  """

  def keep_mask(self, shape: tuple[int, ...], deterministic: bool | None = None) -> jnp.ndarray | None:
    """The keep mask `__call__` would apply to an input of `shape` (bool), or None when nothing is
    dropped (deterministic, or rate 0). Draws the same key from the same stream as `__call__`."""
    if nn.merge_param('deterministic', self.deterministic, deterministic) or self.rate == 0.0:
      return None
    return bernoulli(self.make_rng(self.rng_collection), 1.0 - self.rate, shape)

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
