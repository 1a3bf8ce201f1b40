"""IACA gating (docs/DESIGN.md §3.6).

Stage 1 (per modality, per time step): g = softmax(Dense_2(X_att) / T); X_gated = ReLU(g0 X + g1 X_att).
Stage 2 (across modalities), one of:
  `modality`  softmax gate over the two modalities from [Xg_a, Xg_v]; each modality is scaled by its
              weight before the concatenation (the default: down-weights a corrupted modality);
  `sum`       the same weights, but a weighted sum instead of a concatenation (output d, not 2d);
  `iteration` per modality, a softmax gate over [X, X_att after iteration 1, ..., N] (no stage 1);
  `raw`       per modality, a softmax gate choosing between the stage-1 output and the raw input.
Fused output: video first, then audio, as in the authors' code: (B, L, 2d) (or (B, L, d) for `sum`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.models.dense import Dense

Dtype = Any
GATE_TYPES = ('none', 'stage1', 'iaca')
STAGE2_TYPES = ('modality', 'sum', 'iteration', 'raw')


def gate_weights(logits: jnp.ndarray, temperature: float) -> jnp.ndarray:
  """Softmax over the last axis of logits / temperature, in float32."""
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)


class AttentionGate(nn.Module):
  """Stage 1: choose per time step between the unattended and the cross-attended features.

  (B, L, d) x 2 -> gated (B, L, d), weights (B, L, 2) = [unattended, attended].
  """

  temperature: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, attended: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    w = gate_weights(Dense(2, dtype=self.dtype, name='fc')(attended), self.temperature)
    gated = nn.relu(w[..., :1] * x + w[..., 1:] * attended)
    return gated.astype(x.dtype), w


class CandidateGate(nn.Module):
  """Softmax gate over K candidate features per time step, computed from their concatenation.

  candidates: K arrays (B, L, d) -> combined (B, L, d), weights (B, L, K).
  """

  temperature: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, candidates: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    logits = Dense(len(candidates), dtype=self.dtype, name='fc')(jnp.concatenate(candidates, axis=-1))
    w = gate_weights(logits, self.temperature)
    combined = sum(w[..., k : k + 1] * c for k, c in enumerate(candidates))
    return combined.astype(candidates[0].dtype), w


class FusionGate(nn.Module):
  """Stage 1 and/or stage 2 on top of any cross-attention block. Returns (fused, gate values)."""

  gating: str = 'iaca'
  stage2: str = 'modality'
  temperature: float = 0.1
  stage2_temperature: float | None = None  # None: the same as stage 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio, video, att_audio, att_video, iterations):
    if self.gating not in GATE_TYPES:
      raise ValueError(f'Unknown gating {self.gating!r}; expected one of {GATE_TYPES}.')
    if self.stage2 not in STAGE2_TYPES:
      raise ValueError(f'Unknown stage2 {self.stage2!r}; expected one of {STAGE2_TYPES}.')
    gates = {}
    if self.gating == 'none':
      return jnp.concatenate([att_video, att_audio], axis=-1), gates
    if self.gating == 'iaca' and self.stage2 == 'iteration':
      gated_a, gates['audio_iteration'] = CandidateGate(
        self.temperature, self.dtype, name='audio_iteration_gate'
      )([audio] + [a for a, _ in iterations])
      gated_v, gates['video_iteration'] = CandidateGate(
        self.temperature, self.dtype, name='video_iteration_gate'
      )([video] + [v for _, v in iterations])
      return jnp.concatenate([gated_v, gated_a], axis=-1), gates
    stage1 = lambda name: AttentionGate(self.temperature, self.dtype, name=name)
    gated_v, gates['video'] = stage1('video_gate')(video, att_video)
    gated_a, gates['audio'] = stage1('audio_gate')(audio, att_audio)
    if self.gating == 'stage1':
      return jnp.concatenate([gated_v, gated_a], axis=-1), gates
    if self.stage2 == 'raw':
      gated_a, gates['audio_raw'] = CandidateGate(self.temperature, self.dtype, name='audio_raw_gate')(
        [gated_a, audio]
      )
      gated_v, gates['video_raw'] = CandidateGate(self.temperature, self.dtype, name='video_raw_gate')(
        [gated_v, video]
      )
      return jnp.concatenate([gated_v, gated_a], axis=-1), gates
    logits = Dense(2, dtype=self.dtype, name='modality_gate')(jnp.concatenate([gated_a, gated_v], axis=-1))
    w = gate_weights(logits, self.stage2_temperature or self.temperature)  # (B, L, 2) = [audio, video]
    gates['modality'] = w
    scaled_a, scaled_v = w[..., :1] * gated_a, w[..., 1:] * gated_v
    if self.stage2 == 'sum':
      return (scaled_a + scaled_v).astype(audio.dtype), gates
    return jnp.concatenate([scaled_v, scaled_a], axis=-1).astype(audio.dtype), gates
