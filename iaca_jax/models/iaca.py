"""The full audio-visual model (docs/DESIGN.md §3): encoders -> temporal blocks -> audio-guided spatial attention
-> cross-attention -> gates -> joint BLSTM -> valence and arousal heads.

Input: a dict of modalities, either raw
  'video' (B, L, T, H, W, 3) normalised face clips and 'audio' (B, L, mels, frames) log-mels,
or precomputed (cached) encoder features
  'video_features' (B, L, h, w, C) layer-4 maps and 'audio_features' (B, L, C).
Output: (predictions (B, L, 2) = [valence, arousal], aux) in every mode; aux holds the spatial
attention, the cross-attention scores and the gate values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.models.attention import AudioGuidedSpatialAttention
from iaca_jax.models.cross_attention import make_cross_attention
from iaca_jax.models.encoders import R2Plus1D18, ResNet18
from iaca_jax.models.gates import make_gate
from iaca_jax.models.kernels import XLA, Kernels
from iaca_jax.models.temporal import ResidualBLSTM, l2_normalize

Dtype = Any


class RegressionHead(nn.Module):
  """Dense(hidden), ReLU, dropout, Dense(1); Xavier-uniform weights, zero biases. (B, L, F) -> (B, L)."""

  hidden: int = 128
  dropout: float = 0.6
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    dense = lambda n, name: self.kernels.dense(
      n,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.zeros_init(),
      name=name,
    )
    x = nn.relu(dense(self.hidden, 'hidden')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(1, 'output')(x)[..., 0].astype(jnp.float32)


class AudioVisualEncoders(nn.Module):
  """Both encoders applied clip-wise (clips folded into the batch).

  video (B, L, T, H, W, 3) -> (B, L, h, w, C_v); audio (B, L, mels, frames) -> (B, L, C_a).
  Frozen encoders run BatchNorm on running averages and pass no gradient.
  """

  width: float = 1.0
  blocks_per_stage: int = 2
  frozen: bool = False
  face_size: int | None = None  # resize faces to (face_size, face_size) first; None keeps them (112)
  dtype: Dtype = jnp.float32

  def setup(self):
    kwargs = dict(
      width=self.width, blocks_per_stage=self.blocks_per_stage, frozen_bn=self.frozen, dtype=self.dtype
    )
    self.video_encoder = R2Plus1D18(**kwargs)
    self.audio_encoder = ResNet18(**kwargs)

  def encode_video(self, video: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    b = video.shape[0]
    if self.face_size and video.shape[-2] != self.face_size:
      shape = video.shape[:3] + (self.face_size, self.face_size, video.shape[-1])
      video = jax.image.resize(video, shape, 'linear', antialias=True)
    maps = self.video_encoder(einops.rearrange(video, 'b l t h w c -> (b l) t h w c'), train=train)
    maps = einops.rearrange(jnp.mean(maps, axis=1), '(b l) h w c -> b l h w c', b=b)  # time is 1 at 8 frames
    return jax.lax.stop_gradient(maps) if self.frozen else maps

  def encode_audio(self, audio: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    b = audio.shape[0]
    feats = self.audio_encoder(einops.rearrange(audio, 'b l m t -> (b l) m t 1'), train=train)
    feats = einops.rearrange(feats, '(b l) c -> b l c', b=b)
    return jax.lax.stop_gradient(feats) if self.frozen else feats

  def __call__(self, video, audio, *, train: bool):
    return self.encode_video(video, train=train), self.encode_audio(audio, train=train)


class IACAModel(nn.Module):
  """Audio-visual fusion with (recursive) joint cross-attention and inconsistency-aware gating."""

  # Encoders (ignored when the batch carries precomputed features).
  encoder_width: float = 1.0
  encoder_blocks_per_stage: int = 2
  freeze_encoders: bool = True
  face_size: int | None = None  # None: faces as given (112); a CPU demo uses 56 (a 4x4 visual map)
  # Fusion model.
  features: int = 512
  lstm_hidden: int = 256
  temporal_dropout: float = 0.1
  cross_attention: str = 'rjca'
  rjca_iterations: int = 2
  cross_attention_dropout: float = 0.6
  gating: str = 'iaca'
  stage2: str | None = None  # gating='iaca' only; None: 'modality'
  gate_temperature: float = 0.1
  stage2_temperature: float | None = None  # None: gate_temperature
  head_hidden: int = 128
  head_dropout: float = 0.6
  torch_layout: bool = False
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA  # how the pieces are computed (iaca_jax/kernel_choice.py); same values

  def setup(self):
    common = dict(dtype=self.dtype, kernels=self.kernels)
    self.encoders = AudioVisualEncoders(
      width=self.encoder_width,
      blocks_per_stage=self.encoder_blocks_per_stage,
      frozen=self.freeze_encoders,
      face_size=self.face_size,
      dtype=self.dtype,
    )
    temporal = lambda dropout: ResidualBLSTM(
      features=self.features, hidden=self.lstm_hidden, num_layers=2, dropout=dropout, **common
    )
    self.audio_temporal = temporal(self.temporal_dropout)
    self.video_temporal = temporal(self.temporal_dropout)
    self.joint_temporal = temporal(0.0)
    self.spatial_attention = AudioGuidedSpatialAttention(
      features=self.features, torch_layout=self.torch_layout, **common
    )
    self.fusion = make_cross_attention(
      self.cross_attention, iterations=self.rjca_iterations, dropout=self.cross_attention_dropout, **common
    )
    self.gate = make_gate(
      self.gating,
      self.stage2,
      temperature=self.gate_temperature,
      stage2_temperature=self.stage2_temperature,
      **common,
    )
    head = lambda: RegressionHead(hidden=self.head_hidden, dropout=self.head_dropout, **common)
    self.valence_head = head()
    self.arousal_head = head()

  def encode(self, inputs: Mapping[str, jnp.ndarray], *, train: bool = False):
    """Encoder features (B, L, h, w, C_v) and (B, L, C_a), from raw inputs or as given."""
    if 'video_features' in inputs and 'audio_features' in inputs:
      return inputs['video_features'], inputs['audio_features']
    if 'video' in inputs and 'audio' in inputs:
      return self.encoders(inputs['video'], inputs['audio'], train=train)
    raise KeyError(
      f"The model needs 'video' and 'audio', or 'video_features' and 'audio_features'; got {sorted(inputs)}."
    )

  def __call__(self, inputs: Mapping[str, jnp.ndarray], *, train: bool = False):
    visual_map, audio = self.encode(inputs, train=train)
    visual_map = l2_normalize(visual_map.astype(self.dtype), axis=(-3, -2, -1), kernels=self.kernels)
    audio = l2_normalize(audio.astype(self.dtype), kernels=self.kernels)
    audio = self.audio_temporal(audio, train=train)
    video, spatial = self.spatial_attention(visual_map, audio)
    video = self.video_temporal(video, train=train)
    attended = self.fusion(audio, video, train=train)
    fused, gates = self.gate(audio, video, attended)
    joint = self.joint_temporal(fused, train=train)
    predictions = jnp.stack(
      [self.valence_head(joint, train=train), self.arousal_head(joint, train=train)], axis=-1
    )
    aux = {
      'spatial_attention': spatial,
      'score_audio': attended.score_audio,
      'score_video': attended.score_video,
      'gates': gates,
    }
    return predictions, aux
