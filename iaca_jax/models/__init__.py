"""The IACA model family: encoders, temporal blocks, attention, cross-attention, gates, full model.

Plain Flax throughout; how the recurring pieces are computed comes in as a `Kernels` field
(models/kernels.py: `XLA` by default; `iaca_jax.cpu_kernels` for XLA:CPU).
"""

from iaca_jax.models.attention import AudioGuidedSpatialAttention
from iaca_jax.models.cross_attention import (
  CROSS_ATTENTION,
  CROSS_ATTENTION_TYPES,
  Attended,
  make_cross_attention,
)
from iaca_jax.models.encoders import R2Plus1D18, ResNet18
from iaca_jax.models.factory import init_variables, model_from_config
from iaca_jax.models.gates import GATE_TYPES, GATES, STAGE2_TYPES, make_gate
from iaca_jax.models.iaca import AudioVisualEncoders, IACAModel, RegressionHead
from iaca_jax.models.kernels import XLA, Kernels
from iaca_jax.models.temporal import BLSTM, LSTMLayer, ResidualBLSTM, l2_normalize

__all__ = [
  'Attended',
  'AudioGuidedSpatialAttention',
  'AudioVisualEncoders',
  'BLSTM',
  'CROSS_ATTENTION',
  'CROSS_ATTENTION_TYPES',
  'GATES',
  'GATE_TYPES',
  'IACAModel',
  'Kernels',
  'LSTMLayer',
  'R2Plus1D18',
  'RegressionHead',
  'ResNet18',
  'ResidualBLSTM',
  'STAGE2_TYPES',
  'XLA',
  'init_variables',
  'l2_normalize',
  'make_cross_attention',
  'make_gate',
  'model_from_config',
]
