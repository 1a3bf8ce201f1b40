"""The train state: its parts, a fresh one for one model or for K replicas (`iaca_jax.replicas`),
and the seeds each replica's initialisation and dropout come from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from iaca_jax import pretrained
from iaca_jax import replicas as replicas_lib
from iaca_jax.input_pipeline import MODEL_INPUT_KEYS
from iaca_jax.models import IACAModel, init_variables


class TrainState(flax.struct.PyTreeNode):
  step: jnp.ndarray
  params: Any  # optimised parameters
  frozen_params: Any  # frozen encoder parameters ({} when none)
  batch_stats: Any  # BatchNorm running statistics ({} when none)
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def variables(self) -> dict:
    return model_variables(self.params, self.frozen_params, self.batch_stats)


def model_variables(params: Mapping, frozen_params: Mapping, batch_stats: Mapping) -> dict:
  """The `model.apply` variables of a state's parts."""
  variables = {'params': {**params, **frozen_params}}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return variables


def _split_frozen(params: dict, frozen: bool) -> tuple[dict, dict]:
  if frozen and 'encoders' in params:
    return {k: v for k, v in params.items() if k != 'encoders'}, {'encoders': params['encoders']}
  return dict(params), {}


def init_model_state(
  model: IACAModel, shapes: Mapping[str, Any], rng: jax.Array, converted: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """{'step', 'params', 'frozen_params', 'batch_stats'} of a fresh model for inputs shaped like
  `shapes` (a batch or its element spec; only the model inputs count); `converted` weights (see
  `iaca_jax.pretrained`) replace matching variables. Everything of a state but the optimizer."""
  variables = init_variables(model, {k: shapes[k] for k in MODEL_INPUT_KEYS if k in shapes}, rng)
  if converted:
    variables = pretrained.merge_pretrained(variables, converted)
  params, frozen = _split_frozen(variables['params'], model.freeze_encoders)
  return {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'frozen_params': frozen,
    'batch_stats': variables.get('batch_stats', {}),
  }


def init_state(
  model: IACAModel,
  shapes: Mapping[str, Any],
  rng: jax.Array,
  tx: optax.GradientTransformation,
  converted: Mapping[str, Any] | None = None,
) -> TrainState:
  """A fresh train state (see `init_model_state`) with `tx`'s initial optimizer state."""
  parts = init_model_state(model, shapes, rng, converted)
  return TrainState(**parts, opt_state=tx.init(parts['params']), tx=tx)


def init_replica_model_state(
  model: IACAModel, shapes: Mapping[str, Any], rngs: jax.Array, converted: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """`init_model_state` of K replicas, keys `rngs` (K,): every part with a leading (K,) axis but the
  frozen encoders (and their statistics), taken from replica 0."""
  parts = jax.vmap(lambda rng: init_model_state(model, shapes, rng, converted))(rngs)
  if model.freeze_encoders:
    parts['frozen_params'] = replicas_lib.unstack(parts['frozen_params'], 0)
    parts['batch_stats'] = replicas_lib.unstack(parts['batch_stats'], 0)
  return parts


def init_replica_state(
  model: IACAModel,
  shapes: Mapping[str, Any],
  rngs: jax.Array,
  tx: optax.GradientTransformation,
  converted: Mapping[str, Any] | None = None,
) -> TrainState:
  """`init_state` of K replicas (see `init_replica_model_state`); per-replica optimizer states."""
  parts = init_replica_model_state(model, shapes, rngs, converted)
  return TrainState(**parts, opt_state=jax.vmap(tx.init)(parts['params']), tx=tx)


def init_keys(config: ml_collections.ConfigDict) -> jax.Array:
  """The initialisation key of the run: one key, or (K,) keys with `config.replicas.count` = K > 1."""
  return _seed_keys(config, 0)


def dropout_keys(config: ml_collections.ConfigDict) -> jax.Array:
  """The dropout key of the run (the step folds in the step number): one key, or (K,) keys."""
  return _seed_keys(config, 1)


def _seed_keys(config: ml_collections.ConfigDict, which: int) -> jax.Array:
  seeds = replicas_lib.replica_seeds(config.seed, config.replicas.first, config.replicas.count)
  if config.replicas.count == 1:
    return jax.random.key(seeds[0][which])
  return jnp.stack([jax.random.key(pair[which]) for pair in seeds])


def fresh_state(config, model: IACAModel, shapes, tx, converted=None) -> TrainState:
  """A fresh (unplaced) state of the run: one model, or `config.replicas.count` of them."""
  if config.replicas.count == 1:
    return init_state(model, shapes, init_keys(config), tx, converted)
  return init_replica_state(model, shapes, init_keys(config), tx, converted)


def fresh_model_state(config, model: IACAModel, shapes) -> dict[str, Any]:
  """`init_model_state` (or its replica form) of the run."""
  if config.replicas.count == 1:
    return init_model_state(model, shapes, init_keys(config))
  return init_replica_model_state(model, shapes, init_keys(config))
