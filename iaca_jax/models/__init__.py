"""The IACA model family: encoders, temporal blocks, attention, cross-attention, gates, full model."""

from iaca_jax.models.attention import AudioGuidedSpatialAttention
from iaca_jax.models.cross_attention import CROSS_ATTENTION_TYPES, make_cross_attention
from iaca_jax.models.encoders import R2Plus1D18, ResNet18
from iaca_jax.models.factory import build_model, init_variables
from iaca_jax.models.gates import GATE_TYPES, STAGE2_TYPES, FusionGate
from iaca_jax.models.iaca import AudioVisualEncoders, IACAModel, RegressionHead
from iaca_jax.models.temporal import BLSTM, LSTMLayer, ResidualBLSTM, l2_normalize

__all__ = [
  'AudioGuidedSpatialAttention',
  'AudioVisualEncoders',
  'BLSTM',
  'CROSS_ATTENTION_TYPES',
  'FusionGate',
  'GATE_TYPES',
  'IACAModel',
  'LSTMLayer',
  'R2Plus1D18',
  'RegressionHead',
  'ResNet18',
  'ResidualBLSTM',
  'STAGE2_TYPES',
  'build_model',
  'init_variables',
  'l2_normalize',
  'make_cross_attention',
]
