"""IACA gating (docs/DESIGN.md §3.6): one small module per variant, chosen by `make_gate`.

Stage 1 (per modality, per time step): g = softmax(Dense_2(X_att) / T); X_gated = ReLU(g0 X + g1 X_att).
Stage 2 (across modalities, `gating='iaca'`), one of:
  `modality`  softmax gate over the two modalities from [Xg_a, Xg_v]; each modality is scaled by its
              weight before the concatenation (the default: down-weights a corrupted modality);
  `sum`       the same weights, but a weighted sum instead of a concatenation (output d, not 2d);
  `iteration` per modality, a softmax gate over [X, X_att after iteration 1, ..., N] (no stage 1);
  `raw`       per modality, a softmax gate choosing between the stage-1 output and the raw input;
  `mlp`       as `modality`, with the weights from a one-hidden-layer MLP over [Xg_a, Xg_v]: it can
              compare the modalities (ReLU(u.a - w.v) + ReLU(w.v - u.a) measures their disagreement),
              which the linear `modality` gate, a sum of a part of audio and a part of video, cannot.
Every variant maps (audio (B, L, d), video (B, L, d), the cross-attention's `Attended`) to
(fused features, gate values): video first, then audio, as in the authors' code: (B, L, 2d) (or
(B, L, d) for `sum`); gate values (B, L, K) by name. A new variant is a module here and an entry of
`GATES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.models.cross_attention import Attended
from iaca_jax.models.kernels import XLA, Kernels

Dtype = Any
Gated = tuple[jax.Array, dict[str, jax.Array]]  # (fused features, gate values by name)


def gate_weights(logits: jnp.ndarray, temperature: float) -> jnp.ndarray:
  """Softmax over the last axis of logits / temperature, in float32."""
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)


class AttentionGate(nn.Module):
  """Stage 1: choose per time step between the unattended and the cross-attended features.

  (B, L, d) x 2 -> gated (B, L, d), weights (B, L, 2) = [unattended, attended].
  """

  temperature: float = 0.1
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x: jnp.ndarray, attended: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    w = gate_weights(self.kernels.dense(2, dtype=self.dtype, name='fc')(attended), self.temperature)
    gated = nn.relu(w[..., :1] * x + w[..., 1:] * attended)
    return gated.astype(x.dtype), w


class CandidateGate(nn.Module):
  """Softmax gate over K candidate features per time step, computed from their concatenation.

  candidates: K arrays (B, L, d) -> combined (B, L, d), weights (B, L, K).
  """

  temperature: float = 0.1
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, candidates: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    dense = self.kernels.dense(len(candidates), dtype=self.dtype, name='fc')
    w = gate_weights(dense(jnp.concatenate(candidates, axis=-1)), self.temperature)
    combined = sum(w[..., k : k + 1] * c for k, c in enumerate(candidates))
    return combined.astype(candidates[0].dtype), w


class _Gate(nn.Module):
  """The fields every variant has."""

  temperature: float = 0.1
  stage2_temperature: float | None = None  # None: `temperature`
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  def stage1(self, audio, video, attended: Attended) -> tuple[jax.Array, jax.Array, dict]:
    """Both stage-1 gates: (gated audio, gated video, their weights)."""
    gate = lambda name: AttentionGate(self.temperature, self.dtype, self.kernels, name=name)
    gated_v, weights_v = gate('video_gate')(video, attended.video)
    gated_a, weights_a = gate('audio_gate')(audio, attended.audio)
    return gated_a, gated_v, {'video': weights_v, 'audio': weights_a}

  def modality_weights(self, gated_a, gated_v, hidden: int = 0) -> jax.Array:
    """Stage 2's softmax over the modalities, (B, L, 2) = [audio, video]; its logits linear in
    [gated_a, gated_v], or with `hidden` > 0 from a ReLU layer of that width."""
    features = jnp.concatenate([gated_a, gated_v], axis=-1)
    if hidden:
      features = nn.relu(self.kernels.dense(hidden, dtype=self.dtype, name='modality_hidden')(features))
    logits = self.kernels.dense(2, dtype=self.dtype, name='modality_gate')(features)
    return gate_weights(logits, self.stage2_temperature or self.temperature)

  def candidates(self, name: str, candidates: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    return CandidateGate(self.temperature, self.dtype, self.kernels, name=name)(candidates)


class NoGate(_Gate):
  """The cross-attended features, concatenated."""

  @nn.compact
  def __call__(self, audio, video, attended: Attended) -> Gated:
    return jnp.concatenate([attended.video, attended.audio], axis=-1), {}


class Stage1Gate(_Gate):
  """Stage 1 only (the authors' DCA gate)."""

  @nn.compact
  def __call__(self, audio, video, attended: Attended) -> Gated:
    gated_a, gated_v, gates = self.stage1(audio, video, attended)
    return jnp.concatenate([gated_v, gated_a], axis=-1), gates


class ModalityGate(_Gate):
  """IACA: stage 1, then each modality scaled by its stage-2 weight and concatenated."""

  hidden_layer: ClassVar[bool] = False  # stage 2's logits through a ReLU layer as wide as a modality

  @nn.compact
  def __call__(self, audio, video, attended: Attended) -> Gated:
    gated_a, gated_v, gates = self.stage1(audio, video, attended)
    hidden = audio.shape[-1] if self.hidden_layer else 0
    w = gates['modality'] = self.modality_weights(gated_a, gated_v, hidden)
    fused = jnp.concatenate([w[..., 1:] * gated_v, w[..., :1] * gated_a], axis=-1)
    return fused.astype(audio.dtype), gates


class MLPGate(ModalityGate):
  """IACA as `ModalityGate`, its stage-2 weights from a hidden ReLU layer as wide as a modality."""

  hidden_layer: ClassVar[bool] = True


class SumGate(_Gate):
  """IACA with stage 2's weighted sum of the modalities instead of their concatenation."""

  @nn.compact
  def __call__(self, audio, video, attended: Attended) -> Gated:
    gated_a, gated_v, gates = self.stage1(audio, video, attended)
    w = gates['modality'] = self.modality_weights(gated_a, gated_v)
    return (w[..., :1] * gated_a + w[..., 1:] * gated_v).astype(audio.dtype), gates


class IterationGate(_Gate):
  """Per modality, a gate over the unattended input and the attended one after every iteration."""

  @nn.compact
  def __call__(self, audio, video, attended: Attended) -> Gated:
    gates = {}
    gated_a, gates['audio_iteration'] = self.candidates(
      'audio_iteration_gate', [audio] + [a for a, _ in attended.iterations]
    )
    gated_v, gates['video_iteration'] = self.candidates(
      'video_iteration_gate', [video] + [v for _, v in attended.iterations]
    )
    return jnp.concatenate([gated_v, gated_a], axis=-1), gates


class RawGate(_Gate):
  """Stage 1, then per modality a gate between its stage-1 output and its raw input."""

  @nn.compact
  def __call__(self, audio, video, attended: Attended) -> Gated:
    gated_a, gated_v, gates = self.stage1(audio, video, attended)
    gated_a, gates['audio_raw'] = self.candidates('audio_raw_gate', [gated_a, audio])
    gated_v, gates['video_raw'] = self.candidates('video_raw_gate', [gated_v, video])
    return jnp.concatenate([gated_v, gated_a], axis=-1), gates


# (gating, stage2) -> variant; stage 2 applies to gating='iaca' only.
GATES = {
  ('none', None): NoGate,
  ('stage1', None): Stage1Gate,
  ('iaca', 'modality'): ModalityGate,
  ('iaca', 'sum'): SumGate,
  ('iaca', 'iteration'): IterationGate,
  ('iaca', 'raw'): RawGate,
  ('iaca', 'mlp'): MLPGate,
}
GATE_TYPES = ('none', 'stage1', 'iaca')
STAGE2_TYPES = tuple(stage2 for _, stage2 in GATES if stage2)
DEFAULT_STAGE2 = 'modality'


def make_gate(gating: str, stage2: str | None = None, *, name: str = 'gate', **settings: Any) -> _Gate:
  """The variant for `gating` and `stage2` (None: `modality` under `iaca`) with `settings`
  (`temperature`, `stage2_temperature`, `dtype`, `kernels`)."""
  if gating not in GATE_TYPES:
    raise ValueError(f'Unknown gating {gating!r}; expected one of {GATE_TYPES}.')
  if gating == 'iaca':
    stage2 = stage2 or DEFAULT_STAGE2
    if stage2 not in STAGE2_TYPES:
      raise ValueError(f'Unknown stage2 {stage2!r}; expected one of {STAGE2_TYPES}.')
  elif stage2 is not None:
    raise ValueError(f"stage2={stage2!r} applies to gating='iaca' only; got gating={gating!r}.")
  return GATES[gating, stage2](**settings, name=name)
