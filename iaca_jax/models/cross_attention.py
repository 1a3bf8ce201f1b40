"""Cross-attention fusion blocks (docs/DESIGN.md §3.5): `none`, `ca`, `jca`, `rjca`.

Every block maps audio (B, L, d) and video (B, L, d) to an `Attended`: the attended features of the
same shapes, per-clip attention scores (B, L) for the attention figure, and the attended pair after
each iteration (what the `iteration` stage-2 gate chooses from).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.models.kernels import XLA, Kernels

Dtype = Any


class Attended(NamedTuple):
  """A cross-attention block's output."""

  audio: jax.Array  # (B, L, d)
  video: jax.Array  # (B, L, d)
  score_audio: jax.Array  # (B, L) float32
  score_video: jax.Array  # (B, L) float32
  iterations: tuple[tuple[jax.Array, jax.Array], ...]  # (audio, video) after each iteration


class NoCrossAttention(nn.Module):
  """The concatenation baseline: attended features are the inputs."""

  @nn.compact
  def __call__(self, audio: jax.Array, video: jax.Array, *, train: bool) -> Attended:
    del train
    ones = jnp.ones(audio.shape[:2], jnp.float32)
    return Attended(audio, video, ones, ones, ((audio, video),))


class CrossAttention(nn.Module):
  """CA: Z = Xa W Xv^T / sqrt(d) (L x L); each modality attends over its own time steps with the
  softmax of the cross-correlation taken the other way (Praveen et al.'s cross-attention)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio: jax.Array, video: jax.Array, *, train: bool) -> Attended:
    del train
    d = audio.shape[-1]
    w = self.param('correlation', nn.initializers.xavier_uniform(), (d, d))
    z = jnp.einsum('bid,de,bje->bij', audio, w.astype(self.dtype), video).astype(jnp.float32) / math.sqrt(d)
    attn_audio = jax.nn.softmax(jnp.swapaxes(z, 1, 2), axis=-1)  # rows: audio output step j over steps i
    attn_video = jax.nn.softmax(z, axis=-1)
    att_a = jnp.einsum('bji,bid->bjd', attn_audio.astype(audio.dtype), audio)
    att_v = jnp.einsum('bij,bjd->bid', attn_video.astype(video.dtype), video)
    return Attended(att_a, att_v, jnp.mean(z, axis=1), jnp.mean(z, axis=2), ((att_a, att_v),))


class JointCrossAttention(nn.Module):
  """JCA: J = [Xa, Xv]; C_m = tanh(X_m W_jm J^T / sqrt(d)); H_m = ReLU(X_m W_m + C_m W_cm);
  attended_m = H_m W_hm + X_m. The C_m W_cm term acts on the time axis, so L is fixed per model."""

  hidden: int | None = None  # None: d
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, audio: jax.Array, video: jax.Array, *, train: bool) -> Attended:
    del train
    d = audio.shape[-1]
    hidden_size = self.hidden or d
    joint = jnp.concatenate([audio, video], axis=-1)  # (B, L, 2d)
    outputs, scores = {}, {}
    for name, x in (('audio', audio), ('video', video)):
      dense = lambda n, suffix, name=name: self.kernels.dense(
        n, use_bias=False, dtype=self.dtype, name=f'{name}_{suffix}'
      )
      corr = jnp.einsum('bie,bje->bij', dense(2 * d, 'joint')(x), joint) / math.sqrt(d)
      corr = jnp.tanh(corr.astype(jnp.float32))  # (B, L, L)
      hidden = nn.relu(dense(hidden_size, 'input')(x) + dense(hidden_size, 'correlation')(corr))
      outputs[name] = dense(d, 'output')(hidden) + x
      scores[name] = jnp.mean(corr, axis=-1)
    attended = (outputs['audio'], outputs['video'])
    return Attended(*attended, scores['audio'], scores['video'], (attended,))


class DenseCoAttentionLayer(nn.Module):
  """One iteration of the authors' dense co-attention (docs/DESIGN.md §A, `coattn.dcn_layers.N`).

  Works on (x1, x2) = (video, audio), video first as in their code. (B, L, d) x 2 -> (B, L, d) x 2 and
  per-clip scores (B, L) x 2. Per modality i: J = query([x1, x2]) (B, L, 2d); K_i = key_i(x_i^T)
  (B, d, L); V_i = value_i(x_i) (B, L, d); H_i = relu(tanh(V_i dropout(tanh(K_i J / sqrt(2d)))))
  (B, L, 2d), the kernels' `coattention`; out_i = x_i + dropout(relu(output_i(H_i))).
  """

  dropout: float = 0.6
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x1: jax.Array, x2: jax.Array, *, train: bool):
    length, d = x1.shape[1], x1.shape[2]
    dense = lambda n, name: self.kernels.dense(n, dtype=self.dtype, name=name)
    # Named as Flax names nn.Dropout in this call order, so that the rng streams (and the results
    # trained before the kernels were separated) stay the same.
    drop = lambda n: self.kernels.dropout(self.dropout, deterministic=not train, name=f'Dropout_{n}')
    joint = dense(2 * d, 'query_linear')(jnp.concatenate([x1, x2], axis=-1))  # (B, L, 2d)
    outputs, scores = [], []
    for i, x in ((1, x1), (2, x2)):
      keys = dense(length, f'key{i}_linear')(jnp.swapaxes(x, 1, 2))  # (B, d, L)
      values = dense(d, f'value{i}_linear')(x)  # (B, L, d)
      hidden = self.kernels.coattention(keys, joint, values, drop(2 * i - 2), dtype=self.dtype)
      outputs.append(x + drop(2 * i - 1)(nn.relu(dense(d, f'output{i}_linear')(hidden))))
      scores.append(jnp.mean(hidden.astype(jnp.float32), axis=-1))
    return outputs[0], outputs[1], scores[0], scores[1]


class RecursiveJointCrossAttention(nn.Module):
  """RJCA: the dense co-attention layer applied `iterations` times with separate weights."""

  iterations: int = 2
  dropout: float = 0.6
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, audio: jax.Array, video: jax.Array, *, train: bool) -> Attended:
    steps = []
    for i in range(self.iterations):
      layer = DenseCoAttentionLayer(
        dropout=self.dropout, dtype=self.dtype, kernels=self.kernels, name=f'layer_{i}'
      )
      video, audio, score_v, score_a = layer(video, audio, train=train)
      steps.append((audio, video))
    return Attended(audio, video, score_a, score_v, tuple(steps))


CROSS_ATTENTION = {
  'none': NoCrossAttention,
  'ca': CrossAttention,
  'jca': JointCrossAttention,
  'rjca': RecursiveJointCrossAttention,
}
CROSS_ATTENTION_TYPES = tuple(CROSS_ATTENTION)


def make_cross_attention(kind: str, *, name: str = 'cross_attention', **settings: Any) -> nn.Module:
  """The block `kind` with those of `settings` that it has as fields (`iterations`, `dropout`,
  `dtype`, `kernels`)."""
  if kind not in CROSS_ATTENTION:
    raise ValueError(f'Unknown cross_attention {kind!r}; expected one of {CROSS_ATTENTION_TYPES}.')
  cls = CROSS_ATTENTION[kind]
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in settings.items() if k in fields}, name=name)
