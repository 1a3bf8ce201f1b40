"""Building the model from its config and initialising its variables from input shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from iaca_jax.models.iaca import IACAModel

ShapeLike = Any  # an array or a jax.ShapeDtypeStruct (anything with .shape and .dtype)


def build_model(model_config: Mapping[str, Any]) -> IACAModel:
  """`IACAModel` from `config.model` (a ConfigDict or dict; `dtype` given by name)."""
  kwargs = dict(model_config)
  kwargs['dtype'] = jnp.dtype(kwargs.get('dtype', 'float32'))
  return IACAModel(**kwargs)


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
