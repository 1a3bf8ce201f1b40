"""Cross-attention fusion blocks (docs/DESIGN.md §3.5): `none`, `ca`, `jca`, `rjca`.

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

from iaca_jax.models.coattention_blocks import coattend
from iaca_jax.models.dense import Dense
from iaca_jax.models.dropout import FusedDropout, bernoulli

Dtype = Any
CROSS_ATTENTION_TYPES = ('none', 'ca', 'jca', 'rjca')


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
    aux = {
      'correlation': z,
      'score_audio': jnp.mean(z, axis=1),
      'score_video': jnp.mean(z, axis=2),
      'iterations': [(att_a, att_v)],
    }
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
    joint = jnp.concatenate([audio, video], axis=-1)  # (B, L, 2d)
    outputs, scores = {}, {}
    for name, x in (('audio', audio), ('video', video)):
      dense = lambda n, suffix, name=name: Dense(n, use_bias=False, dtype=self.dtype, name=f'{name}_{suffix}')
      corr = jnp.einsum('bie,bje->bij', dense(2 * d, 'joint')(x), joint) / math.sqrt(d)
      corr = jnp.tanh(corr.astype(jnp.float32))  # (B, L, L)
      hidden = nn.relu(dense(self.hidden or d, 'input')(x) + dense(self.hidden or d, 'correlation')(corr))
      outputs[name] = dense(d, 'output')(hidden) + x
      scores[name] = jnp.mean(corr, axis=-1)
    aux = {
      'score_audio': scores['audio'],
      'score_video': scores['video'],
      'iterations': [(outputs['audio'], outputs['video'])],
    }
    return outputs['audio'], outputs['video'], aux


class _DropoutKey(nn.Module):
  """The key `nn.Dropout` draws, when named as that dropout would be (same scope, same stream)."""

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.make_rng('dropout')


def _keep_mask(rng: jax.Array, keep: float, shape: tuple[int, ...], *, fused: bool) -> jnp.ndarray:
  """`nn.Dropout`'s keep mask: from `dropout.bernoulli` when `fused`, else `jax.random.bernoulli`."""
  return (bernoulli if fused else jax.random.bernoulli)(rng, keep, shape)


def _dropout(x: jnp.ndarray, rate: float, rng: jax.Array, *, fused: bool) -> jnp.ndarray:
  """`nn.Dropout(rate)(x)` drawing from `rng`."""
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = 1.0 - rate
  mask = _keep_mask(rng, keep, x.shape, fused=fused)
  return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class DenseCoAttentionLayer(nn.Module):
  """One iteration of the authors' dense co-attention (docs/DESIGN.md §A, `coattn.dcn_layers.N`).

  Works on (x1, x2) = (video, audio), video first as in their code. (B, L, d) x 2 -> (B, L, d) x 2.
  With `blocked` the (B, d, 2d) affinities go through `coattention_blocks.coattend` (a hand-written
  backward pass, row chunks on a CPU): the same result with less memory traffic. `blocked=False` is
  the formulation JAX differentiates, the reference for the other.
  """

  dropout: float = 0.6
  dtype: Dtype = jnp.float32
  fused_dropout: bool = True  # masks from dropout.bernoulli (bit-identical to nn.Dropout, faster on a CPU)
  blocked: bool = True
  chunk: int | None = None  # batch rows per chunk of `coattend`; None: the backend's default

  @nn.compact
  def __call__(self, x1, x2, *, train: bool):
    length, d = x1.shape[1], x1.shape[2]
    joint_dim = 2 * d
    dense = lambda n, name: Dense(n, dtype=self.dtype, name=name)
    dropout_cls = FusedDropout if self.fused_dropout else nn.Dropout
    # Named as nn.Dropout would be auto-named (Dropout_0..3 in call order): the rng streams are kept.
    drop = lambda y, n: dropout_cls(self.dropout, deterministic=not train, name=f'Dropout_{n}')(y)
    joint = dense(joint_dim, 'query_linear')(jnp.concatenate([x1, x2], axis=-1))  # (B, L, 2d)
    outputs, scores = [], []
    affinity_shape = (x1.shape[0], d, joint_dim)
    keep = 1.0 - self.dropout
    for i, x in ((1, x1), (2, x2)):
      keys = dense(length, f'key{i}_linear')(jnp.swapaxes(x, 1, 2))  # (B, d, L)
      values = dense(d, f'value{i}_linear')(x)  # (B, L, d)
      dropping = train and self.dropout > 0.0
      rng = _DropoutKey(name=f'Dropout_{2 * i - 2}')() if dropping else None
      if self.blocked and keep > 0.0:
        mask = _keep_mask(rng, keep, affinity_shape, fused=self.fused_dropout) if dropping else None
        hidden = coattend(keys, joint, values, mask, keep=keep, dtype=self.dtype, chunk=self.chunk)
      else:  # the affinity (B, d, 2d) differentiated by JAX; the reference for `coattend`
        affinity = jnp.einsum('bdl,blj->bdj', keys, joint) / math.sqrt(joint_dim)
        affinity = jnp.tanh(affinity.astype(jnp.float32)).astype(self.dtype)
        if dropping:
          affinity = _dropout(affinity, self.dropout, rng, fused=self.fused_dropout)
        hidden = nn.relu(jnp.tanh(jnp.einsum('bld,bdj->blj', values, affinity)))  # (B, L, 2d)
      outputs.append(x + drop(nn.relu(dense(d, f'output{i}_linear')(hidden)), 2 * i - 1))
      scores.append(jnp.mean(hidden.astype(jnp.float32), axis=-1))
    return outputs[0], outputs[1], scores[0], scores[1]


class RecursiveJointCrossAttention(nn.Module):
  """RJCA: the dense co-attention layer applied `iterations` times with separate weights."""

  iterations: int = 2
  dropout: float = 0.6
  dtype: Dtype = jnp.float32
  fused_dropout: bool = True
  blocked: bool = True

  @nn.compact
  def __call__(self, audio, video, *, train: bool):
    steps = []
    for i in range(self.iterations):
      layer = DenseCoAttentionLayer(
        self.dropout, self.dtype, self.fused_dropout, self.blocked, name=f'layer_{i}'
      )
      video, audio, score_v, score_a = layer(video, audio, train=train)
      steps.append((audio, video))
    aux = {'score_audio': score_a, 'score_video': score_v, 'iterations': steps}
    return audio, video, aux


def make_cross_attention(
  kind: str,
  *,
  iterations: int = 2,
  dropout: float = 0.6,
  dtype: Dtype = jnp.float32,
  fused_dropout: bool = True,
  blocked_coattention: bool = True,
  name: str = 'cross_attention',
) -> nn.Module:
  if kind == 'none':
    return NoCrossAttention(name=name)
  if kind == 'ca':
    return CrossAttention(dtype=dtype, name=name)
  if kind == 'jca':
    return JointCrossAttention(dtype=dtype, name=name)
  if kind == 'rjca':
    return RecursiveJointCrossAttention(
      iterations, dropout, dtype, fused_dropout, blocked_coattention, name=name
    )
  raise ValueError(f'Unknown cross_attention {kind!r}; expected one of {CROSS_ATTENTION_TYPES}.')
