"""Cross-attention fusion blocks (SPEC 3.5): `none`, `ca`, `jca`, `rjca`.

Every block maps (audio (B, L, d), video (B, L, d)) to attended features of the same shapes plus a
dict of analysis outputs, among them per-clip attention scores `score_audio` / `score_video` (B, L)
for the attention figure, and `iterations`: the attended pair after each iteration (used by the
`iteration` stage-2 gate).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
CROSS_ATTENTION_TYPES = ('none', 'ca', 'jca', 'rjca')


# ---------------------------------------------------------------------------------------------
# Dropout whose mask is one fused elementwise expression.
#
# The co-attention layer drops out a (B, d, 2d) affinity: 33.5M elements at the paper's size, four
# times a step. XLA's CPU lowering of JAX's threefry primitive runs its five rounds as a loop over
# full-size arrays, so drawing those masks took ~30% of the fusion train step on a CPU (profile in
# docs/PERFORMANCE.md). Written out as the same arithmetic on the element index, the hash fuses
# with the select into one pass, 5x faster, and the mask is bit-identical to
# `jax.random.bernoulli` (hence to `nn.Dropout`): same keys, same bits, same outputs.

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


def _is_fusable_threefry(key, shape) -> bool:
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(key))
  else:
    impl = jax.config.jax_default_prng_impl
  return (impl == 'threefry2x32' and jax.config.jax_threefry_partitionable and key.shape in ((), (2,))
          and 0 < math.prod(shape) < 2 ** 32)


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jnp.ndarray:
  """`jax.random.bernoulli(key, p, shape)` (mode 'low'), bit for bit, as fusable elementwise ops.

  Falls back to `jax.random.bernoulli` for other PRNG implementations, the non-partitionable
  threefry mode, or arrays of 2**32 elements or more.
  """
  if not _is_fusable_threefry(key, shape):
    return jax.random.bernoulli(key, p, shape)
  k1, k2 = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  # Partitionable threefry hashes the (hi, lo) 32-bit halves of each element's row-major index.
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

  Give it the name `nn.Dropout` would get (`Dropout_<n>`) to keep a model's rng streams unchanged.
  """

  def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0 or self.broadcast_dims:
      return super().__call__(inputs, deterministic, rng)
    keep_prob = 1.0 - self.rate
    rng = self.make_rng(self.rng_collection) if rng is None else rng
    mask = bernoulli(rng, keep_prob, inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class NoCrossAttention(nn.Module):
  """The concatenation baseline: attended features are the inputs."""

  @nn.compact
  def __call__(self, audio, video, *, train: bool):
    del train
    ones = jnp.ones(audio.shape[:2], jnp.float32)
    return audio, video, {'score_audio': ones, 'score_video': ones, 'iterations': [(audio, video)]}


class CrossAttention(nn.Module):
  """CA: Z = Xa W Xv^T / sqrt(d) (L x L); each modality attends over its own time steps with the
  softmax of the cross-correlation taken the other way (Praveen et al.'s cross-attention)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio, video, *, train: bool):
    del train
    d = audio.shape[-1]
    w = self.param('correlation', nn.initializers.xavier_uniform(), (d, d))
    z = jnp.einsum('bid,de,bje->bij', audio, w.astype(self.dtype), video).astype(jnp.float32) / math.sqrt(d)
    attn_audio = jax.nn.softmax(jnp.swapaxes(z, 1, 2), axis=-1)  # rows: audio output step j over steps i
    attn_video = jax.nn.softmax(z, axis=-1)
    att_a = jnp.einsum('bji,bid->bjd', attn_audio.astype(audio.dtype), audio)
    att_v = jnp.einsum('bij,bjd->bid', attn_video.astype(video.dtype), video)
    aux = {'correlation': z, 'score_audio': jnp.mean(z, axis=1), 'score_video': jnp.mean(z, axis=2),
           'iterations': [(att_a, att_v)]}
    return att_a, att_v, aux


class JointCrossAttention(nn.Module):
  """JCA: J = [Xa, Xv]; C_m = tanh(X_m W_jm J^T / sqrt(d)); H_m = ReLU(X_m W_m + C_m W_cm);
  attended_m = H_m W_hm + X_m. The C_m W_cm term acts on the time axis, so L is fixed per model."""

  hidden: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio, video, *, train: bool):
    del train
    d = audio.shape[-1]
    joint = jnp.concatenate([audio, video], axis=-1)                          # (B, L, 2d)
    outputs, scores = {}, {}
    for name, x in (('audio', audio), ('video', video)):
      dense = lambda n, suffix: nn.Dense(n, use_bias=False, dtype=self.dtype, name=f'{name}_{suffix}')
      corr = jnp.einsum('bie,bje->bij', dense(2 * d, 'joint')(x), joint) / math.sqrt(d)
      corr = jnp.tanh(corr.astype(jnp.float32))                               # (B, L, L)
      hidden = nn.relu(dense(self.hidden or d, 'input')(x) + dense(self.hidden or d, 'correlation')(corr))
      outputs[name] = dense(d, 'output')(hidden) + x
      scores[name] = jnp.mean(corr, axis=-1)
    aux = {'score_audio': scores['audio'], 'score_video': scores['video'],
           'iterations': [(outputs['audio'], outputs['video'])]}
    return outputs['audio'], outputs['video'], aux


class DenseCoAttentionLayer(nn.Module):
  """One iteration of the authors' dense co-attention (SPEC Appendix A, `coattn.dcn_layers.N`).

  Works on (x1, x2) = (video, audio), video first as in their code. (B, L, d) x 2 -> (B, L, d) x 2.
  """

  dropout: float = 0.6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x1, x2, *, train: bool):
    length, d = x1.shape[1], x1.shape[2]
    joint_dim = 2 * d
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    # Named as nn.Dropout would be auto-named (Dropout_0..3 in call order): the rng streams are kept.
    drop = lambda y, n: FusedDropout(self.dropout, deterministic=not train, name=f'Dropout_{n}')(y)
    joint = dense(joint_dim, 'query_linear')(jnp.concatenate([x1, x2], axis=-1))  # (B, L, 2d)
    outputs, scores = [], []
    for i, x in ((1, x1), (2, x2)):
      keys = dense(length, f'key{i}_linear')(jnp.swapaxes(x, 1, 2))              # (B, d, L)
      values = dense(d, f'value{i}_linear')(x)                                   # (B, L, d)
      affinity = jnp.einsum('bdl,blj->bdj', keys, joint) / math.sqrt(joint_dim)
      affinity = drop(jnp.tanh(affinity.astype(jnp.float32)).astype(self.dtype), 2 * i - 2)  # (B, d, 2d)
      hidden = nn.relu(jnp.tanh(jnp.einsum('bld,bdj->blj', values, affinity)))   # (B, L, 2d)
      outputs.append(x + drop(nn.relu(dense(d, f'output{i}_linear')(hidden)), 2 * i - 1))
      scores.append(jnp.mean(hidden.astype(jnp.float32), axis=-1))
    return outputs[0], outputs[1], scores[0], scores[1]


class RecursiveJointCrossAttention(nn.Module):
  """RJCA: the dense co-attention layer applied `iterations` times with separate weights."""

  iterations: int = 2
  dropout: float = 0.6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio, video, *, train: bool):
    steps = []
    for i in range(self.iterations):
      video, audio, score_v, score_a = DenseCoAttentionLayer(self.dropout, self.dtype, name=f'layer_{i}')(
          video, audio, train=train)
      steps.append((audio, video))
    aux = {'score_audio': score_a, 'score_video': score_v, 'iterations': steps}
    return audio, video, aux


def make_cross_attention(kind: str, *, iterations: int = 2, dropout: float = 0.6,
                         dtype: Dtype = jnp.float32, name: str = 'cross_attention') -> nn.Module:
  if kind == 'none':
    return NoCrossAttention(name=name)
  if kind == 'ca':
    return CrossAttention(dtype=dtype, name=name)
  if kind == 'jca':
    return JointCrossAttention(dtype=dtype, name=name)
  if kind == 'rjca':
    return RecursiveJointCrossAttention(iterations, dropout, dtype, name=name)
  raise ValueError(f'Unknown cross_attention {kind!r}; expected one of {CROSS_ATTENTION_TYPES}.')
