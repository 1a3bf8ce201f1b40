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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iaca_jax import distributed, interrupts, losses, pretrained, validation
from iaca_jax import replicas as replicas_lib
from iaca_jax.checkpoints import Checkpoints
from iaca_jax.data_source import DataSource
from iaca_jax.fileio import atomic_write
from iaca_jax.input_pipeline import DEVICE_KEYS, MODEL_INPUT_KEYS
from iaca_jax.kernel_choice import build_model
from iaca_jax.models import IACAModel
from iaca_jax.train_state import (  # noqa: F401 (part of this module's interface)
  TrainState,
  dropout_keys,
  fresh_model_state,
  fresh_state,
  init_keys,
  init_model_state,
  init_replica_model_state,
  init_replica_state,
  init_state,
  model_variables,
)
from iaca_jax.writers import create_metric_writer

RUN_CONFIG_FILE = 'config.json'  # the run's config, in its workdir: what predict.py builds the model from


def create_mesh(devices=None, replica_groups: int = 1) -> Mesh:
  """The ('data',) mesh over `devices` (default all), or with `replica_groups` > 1 the
  ('replica', 'data') mesh of that many device groups, each holding its share of the replicas."""
  devices = jax.devices() if devices is None else devices
  # Process-major, so that each process holds one block of the 'data' axis (`batch_share`).
  devices = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)))
  if replica_groups == 1:
    return Mesh(devices, ('data',))
  return Mesh(devices.reshape(replica_groups, -1), ('replica', 'data'))


def create_trainer(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Trainer:
  """The run's mesh, model (kernels chosen for its devices) and compiled steps over `devices`: every
  device of every process by default, or the devices of a TPU topology (`iaca_jax.topology`) to
  compile for a slice this host does not have."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = create_mesh(devices, replica_groups=replicas_lib.device_groups(config, len(devices)))
  model = build_model(config.model, mesh.devices.flat)
  return Trainer(model, mesh, config.replicas.count)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Constant `optimizer.learning_rate`, then x`schedule.decay` every `schedule.decay_every_epochs`
  epochs from `schedule.decay_start_epoch` on."""
  learning_rate, schedule = config.optimizer.learning_rate, config.schedule
  decay = optax.exponential_decay(
    learning_rate * schedule.decay,
    transition_steps=schedule.decay_every_epochs * steps_per_epoch,
    decay_rate=schedule.decay,
    staircase=True,
  )
  return optax.join_schedules(
    [optax.constant_schedule(learning_rate), decay], [schedule.decay_start_epoch * steps_per_epoch]
  )


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  return optax.adamw(
    learning_rate_schedule(config, steps_per_epoch), weight_decay=config.optimizer.weight_decay
  )


def _model_inputs(batch: Mapping[str, jnp.ndarray]) -> dict:
  return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def train_step(
  state: TrainState, batch: Mapping[str, jnp.ndarray], rng: jax.Array, *, model: IACAModel
) -> tuple[TrainState, dict]:
  """One AdamW step on the global batch. A non-finite loss or gradient leaves the state unchanged
  (the host stops at the next check, before any checkpoint of a later state)."""
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
  kernels = model.kernels
  grad_norm, update_norm = kernels.global_norm(grads), kernels.global_norm(param_updates)
  # The model must not be trusted to turn a non-finite input into a non-finite loss: check the inputs.
  inputs_finite = jnp.all(jnp.stack([kernels.all_finite(x) for x in _model_inputs(batch).values()]))
  finite = (
    jnp.isfinite(loss)
    & jnp.isfinite(grad_norm)
    & jnp.isfinite(update_norm)
    & jnp.isfinite(kernels.global_norm(new_state.params))
    & inputs_finite
  )
  # Only the fields a step changes: the shared ones (frozen encoders) must stay unbatched under vmap.
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = new_state.replace(
    step=keep(new_state.step, state.step),
    params=keep(new_state.params, state.params),
    opt_state=keep(new_state.opt_state, state.opt_state),
    batch_stats=keep(new_state.batch_stats, state.batch_stats) if mutable else state.batch_stats,
  )
  metrics_ = {
    'loss': loss,
    'ccc_valence': aux['ccc_valence'],
    'ccc_arousal': aux['ccc_arousal'],
    'grad_norm': grad_norm,
    'param_norm': kernels.global_norm(state.params),
    'update_norm': update_norm,
    'inputs_finite': inputs_finite,
    'finite': finite,
  }
  return new_state, metrics_


def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jnp.ndarray], *, model: IACAModel) -> tuple:
  """Predictions (B, L, 2) and the analysis outputs for one batch, in inference mode."""
  return model.apply(variables, _model_inputs(batch), train=False)


class Trainer:
  """Compiled, sharded steps for one model and mesh; with `replicas` > 1 the steps run K models at
  once (`iaca_jax.replicas`): states and variables with a leading (K,) axis, outputs (K, ...)."""

  def __init__(self, model: IACAModel, mesh: Mesh, replicas: int = 1):
    self.model, self.mesh, self.replicas = model, mesh, replicas
    self.data_sharding = NamedSharding(mesh, P('data'))
    self.replicated = NamedSharding(mesh, P())
    groups = mesh.shape.get('replica', 1)
    if replicas % groups:
      raise ValueError(f'{replicas} replicas cannot be split over {groups} device groups.')
    per_replica = NamedSharding(mesh, P('replica')) if groups > 1 else self.replicated
    self.layout = replicas_lib.Layout(per_replica, self.replicated)
    self.share = batch_share(mesh, jax.process_index())
    key = (model, tuple(mesh.devices.flat), mesh.devices.shape, mesh.axis_names, replicas)
    self.train_step, self.eval_step, self.select_replicas = _jitted_steps(key, self.layout)

  def replicate(self, tree):
    return distributed.replicate(tree, self.replicated)

  def place_state(self, state: TrainState) -> TrainState:
    """A host state on the devices: replicated, or each replica on its device group."""
    if not self.layout.sharded:
      return self.replicate(state)
    return jax.device_put(state, self.state_shardings(state))

  def state_shardings(self, state: TrainState) -> TrainState:
    """The sharding of every leaf of a (replica) state under this trainer's layout."""
    axes = replicas_lib.state_axes(state, not self.model.freeze_encoders)
    return replicas_lib.shardings(state, axes, self.layout.per_replica, self.replicated)

  def batch_share(self) -> tuple[int, int]:
    """(index, count): this process feeds rows [index B/count, (index + 1) B/count) of each global
    batch of B (`batch_share`); the `share` of its `DataSource`."""
    return self.share

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict:
    """This process's rows (its `batch_share`) -> global arrays sharded on the batch axis."""
    count = self.share[1]

    def to_global(rows):
      rows = np.asarray(rows)
      global_shape = (rows.shape[0] * count,) + rows.shape[1:]
      return jax.make_array_from_process_local_data(self.data_sharding, rows, global_shape)

    return {k: to_global(v) for k, v in local_batch.items() if k in DEVICE_KEYS}


def batch_share(mesh: Mesh, process_index: int) -> tuple[int, int]:
  """(index, count): the rows of a global batch that `process_index`'s devices hold, as the
  share [index B/count, (index + 1) B/count) of its B rows, the batch being sharded over the mesh's
  'data' axis. Processes whose devices sit at the same 'data' positions (in other replica groups)
  get the same share, so they read the same windows."""
  data_axis = mesh.axis_names.index('data')
  positions = sorted(
    {
      index[data_axis]
      for index, device in np.ndenumerate(mesh.devices)
      if device.process_index == process_index
    }
  )
  if not positions:
    raise ValueError(f'Process {process_index} has no device in the mesh {dict(mesh.shape)}.')
  first, held, size = positions[0], len(positions), mesh.shape['data']
  if positions != list(range(first, first + held)) or size % held or first % held:
    raise ValueError(
      f"Process {process_index} holds the 'data' positions {positions} of {size}: not one aligned block, "
      'so it cannot feed a contiguous share of the batch. Order the devices by process.'
    )
  return first // held, size // held


def forget_compiled_steps() -> None:
  """Drops the cached steps of `_jitted_steps`, for an analysis that traces the model under
  `flax.linen.intercept_methods` (the cached steps were traced without it)."""
  _jitted_steps.cache_clear()


@functools.lru_cache(maxsize=16)
def _jitted_steps(key: tuple, layout: replicas_lib.Layout) -> tuple[Callable, Callable, Callable | None]:
  """The jitted steps of (model, mesh devices, replicas): one per process, so that every Trainer of
  the same model (a resumed run, the evaluator after training) reuses the compiled executables."""
  model, replicas = key[0], key[-1]
  replicated = layout.shared
  step = functools.partial(train_step, model=model)
  evaluate = functools.partial(eval_step, model=model)
  select = None
  if replicas > 1:
    # The layout's constraints are no-ops unless the replicas are sharded over device groups.
    stats_per_replica = not model.freeze_encoders
    step = replicas_lib.vmap_train_step(step, stats_per_replica, layout)
    evaluate = replicas_lib.vmap_eval_step(evaluate, model.freeze_encoders, layout)
    select = functools.partial(
      replicas_lib.select_replicas, stats_per_replica=stats_per_replica, layout=layout
    )
    select = jax.jit(select) if layout.sharded else jax.jit(select, out_shardings=replicated)
  if layout.sharded:  # the step's constraints place its outputs (the state stays sharded)
    return jax.jit(step, donate_argnums=(0,)), jax.jit(evaluate, out_shardings=replicated), select
  return (
    jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated)),
    jax.jit(evaluate, out_shardings=replicated),
    select,
  )


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
  """Step metrics on the host: floats, or (K,) float arrays from a replica step."""
  host = distributed.fetch(step_metrics)
  return {k: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64) for k, v in host.items()}


def check_finite(step_metrics: dict, step: int) -> None:
  """Raises FloatingPointError naming what was not finite when a step was rejected (state unchanged)."""
  finite = np.asarray(step_metrics.get('finite', 1.0), bool) & np.isfinite(step_metrics['loss'])
  if finite.all():
    return
  if not np.all(step_metrics.get('inputs_finite', 1.0)):
    cause = 'a NaN or infinite value in the input batch (check the shards or the cached features)'
  else:
    cause = 'a non-finite loss, gradient, update or parameter (lower the learning rate)'
  norms = ', '.join(f'{k}={step_metrics.get(k)}' for k in ('loss', 'grad_norm', 'update_norm'))
  where = f' in replica(s) {np.flatnonzero(~finite).tolist()}' if finite.ndim else ''
  raise FloatingPointError(f'Non-finite step {step}{where}: {cause} ({norms}). Training stopped')


def checkpoint_note(step: int | None, workdir: str) -> str:
  """What a stopped run leaves: its newest complete checkpoint, or none."""
  if step is None:
    return f'no checkpoint was written (workdir {workdir})'
  return f'the last complete checkpoint is step {step} (workdir {workdir})'


def abstract_like(tree, sharding: NamedSharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_train_state(config, trainer: Trainer, shapes: Mapping[str, Any], tx) -> TrainState:
  """The state's shapes, dtypes and shardings (nothing is computed): the target of a restore, or of a
  compile (`iaca_jax.compile_report`). `shapes`: the model inputs, `DataSource.input_shapes()`."""
  abstract = jax.eval_shape(lambda: fresh_state(config, trainer.model, shapes, tx))
  return jax.tree.map(
    lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    abstract,
    trainer.state_shardings(abstract),
  )


def abstract_model_state(config, model: IACAModel, data: DataSource, trainer: Trainer) -> dict[str, Any]:
  """`init_model_state`'s shapes, dtypes and shardings: what evaluation restores (no optimizer)."""
  shapes = data.input_shapes()
  return abstract_like(jax.eval_shape(lambda: fresh_model_state(config, model, shapes)), trainer.replicated)


def create_train_state(config, model: IACAModel, data: DataSource, trainer: Trainer, tx) -> TrainState:
  """A fresh state on the devices; converted weights from `config.pretrained` put in place."""
  path = config.pretrained  # None: no converted weights
  converted = None if path is None else pretrained.load_for_model(path, config.model)
  return trainer.place_state(fresh_state(config, model, data.input_shapes(), tx, converted))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with periodic validation and checkpoints; resumes from `workdir` if it holds a run.

  Nothing is written to `workdir` before the run is set up (data opened, converted weights checked,
  state built): a refused run leaves nothing behind. Ctrl-C or SIGTERM stop it after the current
  step, saved (`iaca_jax.interrupts`), with `interrupts.Interrupted`.

  Returns the best validation metrics and where the best checkpoint is.
  """
  with interrupts.StopRequest() as stop:
    return _train(config, workdir, stop)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: interrupts.StopRequest) -> dict:
  distributed.initialize(config)  # the entry points have done it already
  trainer = create_trainer(config)
  model = trainer.model
  data = DataSource(config, trainer.batch_share())
  steps_per_epoch = data.steps_per_epoch()
  training = config.training
  total_steps = training.num_epochs * steps_per_epoch
  if training.max_steps is not None:
    total_steps = min(total_steps, training.max_steps)
  tx = make_optimizer(config, steps_per_epoch)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  # Opened only if there: Orbax creates the folders, which a new run makes once its state exists.
  checkpoints = (
    Checkpoints(checkpoint_dir, training.keep_checkpoints) if os.path.isdir(checkpoint_dir) else None
  )
  meta = validation.initial_meta(config.replicas.count)
  restored = best_state = None  # best_state: each replica at its best validation (replicas only)
  if checkpoints is not None and checkpoints.latest_step() is not None:
    abstract = abstract_train_state(config, trainer, data.input_shapes(), tx)
    restored = checkpoints.restore(abstract)
    if config.replicas.count > 1 and checkpoints.latest_step(best=True) is not None:
      best_state = checkpoints.restore(abstract, best=True)[0]
  if restored is not None:
    state, meta = restored
    logging.warning('Resumed from step %d in %s.', int(np.max(state.step)), workdir)
  else:
    state = create_train_state(config, model, data, trainer, tx)
    checkpoints = checkpoints or Checkpoints(checkpoint_dir, training.keep_checkpoints)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, RUN_CONFIG_FILE), config.to_json(indent=1))
  writer = create_metric_writer(workdir)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  step = first_step = int(np.max(distributed.fetch(state.step)))
  base_rng = trainer.replicate(dropout_keys(config))
  in_flight = collections.deque()  # losses of the steps dispatched and maybe not yet done
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_steps=training.log_every_steps, every_secs=None
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
    scalars = {  # mean over the steps (and the replicas)
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
    checkpoints.save(step_now, best_state if best and best_state is not None else state, meta, best=best)

  stopping = False
  try:
    while step < total_steps and not stopping:
      if stop.pending():  # a request that came before this epoch's first step (setup, validation)
        stopping = True
        break
      epoch, offset = divmod(step, steps_per_epoch)
      batches = data.train_batches(epoch=epoch, start_batch=offset)
      for device_batch in prefetch_to_devices(batches, trainer.shard_batch, config.dataset.prefetch_batches):
        with jax.transfer_guard('disallow'):  # an implicit transfer here would be a hidden sync
          state, step_metrics = trainer.train_step(state, device_batch, base_rng)
        pending.append(step_metrics)
        wait_for_steps_in_flight(in_flight, step_metrics['loss'], training.max_steps_in_flight)
        step += 1
        progress.update(1)
        report_progress(step)
        if step % training.log_every_steps == 0:
          flush(step)
        if step % training.checkpoint_every_steps == 0:
          save(step)
        if step >= total_steps:
          break
        if stop.after_step(step):
          stopping = True
          break
      epoch_done = (
        step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.evaluation.every_epochs == 0
      )
      if epoch_done or step >= total_steps:  # also when stopping here: a resumed run would skip it
        flush(step)
        scores = validation.evaluate_state(trainer, state, data, config.dataset.eval_split)
        writer.write_scalars(step, validation.scalars(scores))
        writer.flush()
        improved = validation.improved_replicas(meta, scores, step)
        if improved.any():
          if config.replicas.count > 1:
            old = state if best_state is None else best_state
            best_state = trainer.select_replicas(improved, state, old)
          save(step, best=True)
        save(step)
    if stopping and step > first_step:
      save(step)
  except FloatingPointError as e:  # a rejected step: say what the run leaves, once the saves are done
    checkpoints.wait()
    raise FloatingPointError(f'{e}; {checkpoint_note(checkpoints.latest_step(), workdir)}.') from None
  finally:  # also when a step fails: a save in flight completes (its state passed the check)
    progress.close()
    checkpoints.wait()
    last_checkpoint = checkpoints.latest_step()
    checkpoints.close()
    writer.close()
  if stopping:
    raise interrupts.Interrupted(
      f'{stop.reason()} at step {step}; {checkpoint_note(last_checkpoint, workdir)}. '
      'Rerun the same command to continue.',
      stop.exit_status(),
    )
  result = dict(meta, steps=step, workdir=workdir, replicas=config.replicas.count)
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, 'train_result.json'), json.dumps(result, indent=1, default=float))
  return result
