"""Train state, the data-parallel train and eval steps, and the training loop.

Data parallelism: one `data` mesh axis over every device of every host; the batch is sharded on its
leading axis, the state replicated, and `jax.jit` compiles the step once for the global batch. The
CCC loss is computed on the global batch, so it is exact across devices. Frozen encoders live in
`frozen_params`, outside the optimised tree: no gradients and no optimizer state.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iaca_jax import distributed, inference, losses, metrics, pretrained
from iaca_jax.checkpoints import Checkpoints
from iaca_jax.data_source import DataSource
from iaca_jax.fileio import atomic_write
from iaca_jax.input_pipeline import DEVICE_KEYS, MODEL_INPUT_KEYS
from iaca_jax.models import IACAModel, build_model, init_variables
from iaca_jax.writers import create_metric_writer

RUN_CONFIG_FILE = 'config.json'  # the run's config, in its workdir: what predict.py builds the model from


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


def create_mesh(devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, ('data',))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Constant, then x`lr_decay` every `lr_decay_every_epochs` epochs from `lr_decay_start_epoch` on."""
  decay = optax.exponential_decay(
    config.learning_rate * config.lr_decay,
    transition_steps=config.lr_decay_every_epochs * steps_per_epoch,
    decay_rate=config.lr_decay,
    staircase=True,
  )
  return optax.join_schedules(
    [optax.constant_schedule(config.learning_rate), decay], [config.lr_decay_start_epoch * steps_per_epoch]
  )


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  return optax.adamw(learning_rate_schedule(config, steps_per_epoch), weight_decay=config.weight_decay)


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


def _model_inputs(batch: Mapping[str, jnp.ndarray]) -> dict:
  return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def _global_norm(tree) -> jnp.ndarray:
  return optax.tree.norm(tree) if jax.tree.leaves(tree) else jnp.zeros(())


def train_step(
  state: TrainState, batch: Mapping[str, jnp.ndarray], rng: jax.Array, *, model: IACAModel
) -> tuple[TrainState, dict]:
  """One AdamW step on the global batch. A non-finite loss or gradient leaves the state unchanged
  (the host stops at the next check with the last good checkpoint intact)."""
  rng = jax.random.fold_in(rng, state.step)
  mutable = ['batch_stats'] if state.batch_stats and not model.freeze_encoders else False

  def loss_fn(params):
    variables = state.replace(params=params).variables()
    outputs = model.apply(variables, _model_inputs(batch), train=True, rngs={'dropout': rng}, mutable=mutable)
    (predictions, _), updates = outputs if mutable else (outputs, {})
    loss, aux = losses.ccc_loss(predictions, batch['labels'], batch['mask'])
    return loss, (aux, updates)

  (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, param_updates),
    opt_state=opt_state,
    batch_stats=updates.get('batch_stats', state.batch_stats),
  )
  grad_norm, update_norm = _global_norm(grads), _global_norm(param_updates)
  # The model must not be trusted to turn a non-finite input into a non-finite loss: check the inputs.
  inputs_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in _model_inputs(batch).values()]))
  finite = (
    jnp.isfinite(loss)
    & jnp.isfinite(grad_norm)
    & jnp.isfinite(update_norm)
    & jnp.isfinite(_global_norm(new_state.params))
    & inputs_finite
  )
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics_ = {
    'loss': loss,
    'ccc_valence': aux['ccc_valence'],
    'ccc_arousal': aux['ccc_arousal'],
    'grad_norm': grad_norm,
    'param_norm': _global_norm(state.params),
    'update_norm': update_norm,
    'inputs_finite': inputs_finite,
    'finite': finite,
  }
  return new_state, metrics_


def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jnp.ndarray], *, model: IACAModel) -> tuple:
  """Predictions (B, L, 2) and the analysis outputs for one batch, in inference mode."""
  return model.apply(variables, _model_inputs(batch), train=False)


class Trainer:
  """Compiled, sharded steps for one model and mesh."""

  def __init__(self, model: IACAModel, mesh: Mesh):
    self.model, self.mesh = model, mesh
    self.data_sharding = NamedSharding(mesh, P('data'))
    self.replicated = NamedSharding(mesh, P())
    self.train_step = jax.jit(
      functools.partial(train_step, model=model),
      donate_argnums=(0,),
      out_shardings=(self.replicated, self.replicated),
    )
    self.eval_step = jax.jit(functools.partial(eval_step, model=model), out_shardings=self.replicated)

  def replicate(self, tree):
    return distributed.replicate(tree, self.replicated)

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Host-local numeric arrays -> global arrays sharded on the batch axis (multi-host ready)."""
    return {
      k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
      for k, v in local_batch.items()
      if k in DEVICE_KEYS
    }


def prefetch_to_devices(
  batches: Iterable[Mapping[str, np.ndarray]], shard: Callable, depth: int = 2
) -> Iterator[dict]:
  """Yields `shard(batch)` with `depth` batches already transferred (asynchronous dispatch).

  Not flax.jax_utils.prefetch_to_device: that one is written for pmap's per-device arrays.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(shard(batch))
    if len(queue) > depth:
      yield queue.popleft()
  yield from queue


def wait_for_steps_in_flight(in_flight: collections.deque, newest: jax.Array, limit: int) -> None:
  """Keeps at most `limit` dispatched steps unfinished: waits (no transfer) for older ones.

  With an input faster than the step, asynchronous dispatch would otherwise let the host queue
  steps, each holding its device batch, until the next metrics flush. Waiting for step n - limit
  keeps `limit` steps queued, so the device never idles for it. limit <= 0: no bound.
  """
  if limit <= 0:
    return
  in_flight.append(newest)
  while len(in_flight) > limit:
    in_flight.popleft().block_until_ready()


def device_get_metrics(step_metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(step_metrics).items()}


def check_finite(step_metrics: dict, step: int) -> None:
  """Raises FloatingPointError naming what was not finite when a step was rejected (state unchanged)."""
  if step_metrics.get('finite', 1.0) and np.isfinite(step_metrics['loss']):
    return
  if not step_metrics.get('inputs_finite', 1.0):
    cause = 'a NaN or infinite value in the input batch (check the shards or the cached features)'
  else:
    cause = 'a non-finite loss, gradient, update or parameter (lower the learning rate)'
  norms = ', '.join(f'{k}={step_metrics.get(k)}' for k in ('loss', 'grad_norm', 'update_norm'))
  raise FloatingPointError(
    f'Non-finite step {step}: {cause} ({norms}). Training stopped; the last good checkpoint is intact.'
  )


def abstract_like(tree, sharding: NamedSharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_train_state(config, model: IACAModel, data: DataSource, trainer: Trainer, tx) -> TrainState:
  """The state's shapes, dtypes and shardings (nothing is computed): the target of a restore."""
  shapes = data.input_shapes()
  state = jax.eval_shape(lambda rng: init_state(model, shapes, rng, tx), jax.random.key(config.seed))
  return abstract_like(state, trainer.replicated)


def abstract_model_state(config, model: IACAModel, data: DataSource, trainer: Trainer) -> dict[str, Any]:
  """`init_model_state`'s shapes, dtypes and shardings: what evaluation restores (no optimizer)."""
  shapes = data.input_shapes()
  parts = jax.eval_shape(lambda rng: init_model_state(model, shapes, rng), jax.random.key(config.seed))
  return abstract_like(parts, trainer.replicated)


def create_train_state(config, model: IACAModel, data: DataSource, trainer: Trainer, tx) -> TrainState:
  """A fresh, replicated state; converted weights from `config.pretrained` put in place."""
  converted = pretrained.load_for_model(config.pretrained, config.model) if config.pretrained else None
  state = init_state(model, data.input_shapes(), jax.random.key(config.seed), tx, converted)
  return trainer.replicate(state)


def evaluate_state(trainer: Trainer, state: TrainState, data: DataSource, split: str) -> dict:
  """Validation metrics, computed on every process from the predictions of all; checked equal
  across processes (they decide which checkpoints every process saves)."""
  clips = inference.predict_split(trainer, state.variables(), data.eval_batches(split))
  scores = metrics.score_clips(clips)
  if jax.process_count() > 1:
    bits = np.array([scores[k] for k in sorted(scores)], np.float64).view(np.uint32)  # exact, no x64
    multihost_utils.assert_equal(bits, f'validation metrics differ across processes: {scores}')
  return scores


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with periodic validation and checkpoints; resumes from `workdir` if it holds a run.

  Returns the best validation metrics and where the best checkpoint is.
  """
  distributed.initialize(config)  # the entry points have done it already
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, RUN_CONFIG_FILE), config.to_json(indent=1))
  model = build_model(config.model)
  trainer = Trainer(model, create_mesh())
  data = DataSource(config)
  steps_per_epoch = data.steps_per_epoch()
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  tx = make_optimizer(config, steps_per_epoch)
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  meta = {'best_score': -np.inf, 'best_step': -1, 'best_metrics': {}}
  restored = None
  if checkpoints.latest_step() is not None:
    restored = checkpoints.restore(abstract_train_state(config, model, data, trainer, tx))
  if restored is not None:
    state, meta = restored
    logging.warning('Resumed from step %d in %s.', int(state.step), workdir)
  else:
    state = create_train_state(config, model, data, trainer, tx)
  writer = create_metric_writer(workdir)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  step = int(jax.device_get(state.step))
  base_rng = trainer.replicate(jax.random.key(config.seed + 1))
  in_flight = collections.deque()  # losses of the steps dispatched and maybe not yet done
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps, every_secs=None
  )
  progress = tqdm.tqdm(
    total=total_steps, initial=step, disable=jax.process_index() != 0, desc='train', dynamic_ncols=True
  )
  pending = []

  def flush(step_now: int) -> None:
    nonlocal pending
    if not pending:
      return
    host = [device_get_metrics(m) for m in pending]
    for i, m in enumerate(host):
      check_finite(m, step_now - len(host) + i + 1)
    scalars = {
      f'train/{k}': float(np.mean([m[k] for m in host]))
      for k in host[0]
      if k not in ('finite', 'inputs_finite')
    }
    scalars['train/learning_rate'] = float(schedule(step_now - 1))
    writer.write_scalars(step_now, scalars)
    writer.flush()
    progress.set_postfix(loss=f'{scalars["train/loss"]:.4f}')
    pending = []

  def save(step_now: int, *, best: bool = False) -> None:
    if checkpoints.latest_step(best=best) == step_now:
      return
    flush(step_now)  # never checkpoint a state that went through a non-finite step
    checkpoints.save(step_now, state, meta, best=best)

  try:
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      batches = data.train_batches(epoch=epoch, start_batch=offset)
      for device_batch in prefetch_to_devices(batches, trainer.shard_batch, config.prefetch_batches):
        with jax.transfer_guard('disallow'):  # an implicit transfer here would be a hidden sync
          state, step_metrics = trainer.train_step(state, device_batch, base_rng)
        pending.append(step_metrics)
        wait_for_steps_in_flight(in_flight, step_metrics['loss'], config.max_steps_in_flight)
        step += 1
        progress.update(1)
        report_progress(step)
        if step % config.log_every_steps == 0:
          flush(step)
        if step % config.checkpoint_every_steps == 0:
          save(step)
        if step >= total_steps:
          break
      epoch_done = step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.eval_every_epochs == 0
      if epoch_done or step >= total_steps:
        flush(step)
        scores = evaluate_state(trainer, state, data, config.dataset.eval_split)
        writer.write_scalars(step, {f'validation/{k}': v for k, v in scores.items()})
        writer.flush()
        score = scores['ccc_valence'] + scores['ccc_arousal']
        if np.isfinite(score) and score > meta['best_score']:
          meta.update(best_score=float(score), best_step=step, best_metrics=scores)
          save(step, best=True)
        save(step)
  finally:  # also when a step fails: a save in flight completes (its state passed the check)
    progress.close()
    checkpoints.wait()
    checkpoints.close()
    writer.close()
  result = dict(meta, steps=step, workdir=workdir)
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, 'train_result.json'), json.dumps(result, indent=1, default=float))
  return result
