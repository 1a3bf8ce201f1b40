"""Audio-guided visual spatial attention (docs/DESIGN.md §3.4).

Per (batch, clip): additive attention over the P = h*w positions of the visual map whose query is the
audio clip feature, softmax over positions, weighted sum of the map, Dense.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.models.kernels import XLA, Kernels

Dtype = Any


def torch_quirk_layout(visual_map: jnp.ndarray) -> jnp.ndarray:
  """The authors' view of the map: flatten channel-major, then cut into rows of C (no transpose).

  (..., P, C) in true (positions, channels) layout -> (..., P, C) whose rows are consecutive chunks of
  the channel-major vector (index = channel * P + position), as their `view(-1, 49, 512)` does.
  """
  *lead, positions, channels = visual_map.shape
  channel_major = jnp.swapaxes(visual_map, -1, -2).reshape(*lead, positions * channels)
  return channel_major.reshape(*lead, positions, channels)


class AudioGuidedSpatialAttention(nn.Module):
  """Attends over visual positions with the audio feature as query.

  Inputs: visual (B, L, h, w, C) maps, audio (B, L, D_a). Returns ((B, L, features), attention
  (B, L, P)). With `torch_layout=True` the map is viewed as the authors' code views it (docs/DESIGN.md §3.4).
  Parameter names follow the authors' module (`affine_audio`, `affine_video`, `affine_v`, `affine_g`,
  `affine_h`, `affine_feat`).
  """

  features: int = 512
  torch_layout: bool = False
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, visual: jnp.ndarray, audio: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    values = einops.rearrange(visual, 'b l h w c -> b l (h w) c')
    if self.torch_layout:
      values = torch_quirk_layout(values)
    positions, channels = values.shape[-2:]
    dense = lambda n, name, bias=True: self.kernels.dense(n, use_bias=bias, dtype=self.dtype, name=name)
    video_proj = nn.relu(dense(channels, 'affine_video')(values))  # (B, L, P, C)
    audio_proj = nn.relu(dense(channels, 'affine_audio')(audio))  # (B, L, C)
    content = dense(positions, 'affine_v', bias=False)(video_proj)  # (B, L, P, P)
    content = content + dense(positions, 'affine_g', bias=False)(audio_proj)[..., :, None]
    scores = dense(1, 'affine_h', bias=False)(jnp.tanh(content))[..., 0]  # (B, L, P)
    attention = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    attended = jnp.einsum('blp,blpc->blc', attention.astype(values.dtype), values)
    return dense(self.features, 'affine_feat')(attended), attention
