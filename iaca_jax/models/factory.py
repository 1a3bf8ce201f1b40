"""The model from its config, and its variables initialised from input shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from iaca_jax.models.iaca import IACAModel
from iaca_jax.models.kernels import XLA, Kernels

ShapeLike = Any  # an array or a jax.ShapeDtypeStruct (anything with .shape and .dtype)
# Settings of run configs and conversions written before the kernels were chosen by `kernels`: they
# chose how the co-attention was computed, not what (the same values), and are dropped.
_RETIRED = ('fused_dropout', 'blocked_coattention')


def _from_older_config(kwargs: dict) -> dict:
  """Older configs' sentinels (0 for unset) and their stage2 beside a gating that has none, as today's
  settings."""
  for name in ('face_size', 'stage2_temperature'):
    if kwargs.get(name) == 0:
      kwargs[name] = None
  if kwargs.get('gating', 'iaca') != 'iaca' and kwargs.get('stage2') == 'modality':
    kwargs['stage2'] = None  # the old default, which those gatings ignored
  return {k: v for k, v in kwargs.items() if k not in _RETIRED}


def model_from_config(model_config: Mapping[str, Any], kernels: Kernels = XLA) -> IACAModel:
  """`IACAModel` from `config.model` (a ConfigDict or dict; `dtype` by name) computing with `kernels`.

  Runs choose the kernels from their devices with `iaca_jax.kernel_choice.build_model`.
  """
  kwargs = _from_older_config({k: v for k, v in dict(model_config).items() if k != 'kernels'})
  kwargs['dtype'] = jnp.dtype(kwargs.get('dtype', 'float32'))
  return IACAModel(**kwargs, kernels=kernels)


def example_inputs(shapes: Mapping[str, ShapeLike]) -> dict[str, jnp.ndarray]:
  """Zero inputs of batch size 1 with the per-example shapes of `shapes` ((B, ...) -> (1, ...))."""
  return {k: jnp.zeros((1,) + tuple(v.shape[1:]), v.dtype) for k, v in shapes.items()}


def init_variables(model: IACAModel, shapes: Mapping[str, ShapeLike], rng: jax.Array) -> dict:
  """`model.init` under jit on zero inputs shaped like `shapes` (a batch or its element spec).

  Initial values depend on the shapes only, never on input values. The non-partitionable threefry
  keeps XLA's compile of the many random initialisers short (31 s -> 3 s for the tiny R(2+1)D on a
  CPU); parameters are replicated anyway.
  """
  inputs = example_inputs(shapes)
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda r: model.init({'params': r}, inputs, train=False))(rng)
  return flax.core.unfreeze(variables)
