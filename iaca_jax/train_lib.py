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
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from iaca_jax import convert_torch, input_pipeline, losses
from iaca_jax.models import IACAModel

DEVICE_KEYS = ('video', 'audio', 'video_features', 'audio_features', 'labels', 'mask')


class TrainState(flax.struct.PyTreeNode):
  step: jnp.ndarray
  params: Any                 # optimised parameters
  frozen_params: Any          # frozen encoder parameters ({} when none)
  batch_stats: Any            # BatchNorm running statistics ({} when none)
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def variables(self) -> dict:
    variables = {'params': {**self.params, **self.frozen_params}}
    if self.batch_stats:
      variables['batch_stats'] = self.batch_stats
    return variables


def create_mesh(devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, ('data',))


def build_model(model_config: Mapping[str, Any]) -> IACAModel:
  kwargs = dict(model_config)
  kwargs['dtype'] = jnp.dtype(kwargs.get('dtype', 'float32'))
  return IACAModel(**kwargs)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """Constant, then x`lr_decay` every `lr_decay_every_epochs` epochs from `lr_decay_start_epoch` on."""
  def schedule(step):
    epoch = step // steps_per_epoch
    decays = jnp.where(epoch >= config.lr_decay_start_epoch,
                       (epoch - config.lr_decay_start_epoch) // config.lr_decay_every_epochs + 1, 0)
    return config.learning_rate * config.lr_decay ** decays
  return schedule


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  return optax.adamw(learning_rate_schedule(config, steps_per_epoch), weight_decay=config.weight_decay)


def init_variables(model: nn.Module, inputs: Mapping[str, jnp.ndarray], rng: jax.Array) -> dict:
  """`model.init` under jit. The non-partitionable threefry keeps XLA's compile of the many random
  initialisers short (31 s -> 3 s for the tiny R(2+1)D on a CPU); parameters are replicated anyway."""
  with jax.threefry_partitionable(False):
    return jax.jit(lambda r: model.init({'params': r}, inputs, train=False))(rng)


def _split_frozen(params: dict, frozen: bool) -> tuple[dict, dict]:
  if frozen and 'encoders' in params:
    return {k: v for k, v in params.items() if k != 'encoders'}, {'encoders': params['encoders']}
  return dict(params), {}


def init_state(model: IACAModel, example_batch: Mapping[str, np.ndarray], rng: jax.Array,
               tx: optax.GradientTransformation, pretrained: Mapping[str, Any] | None = None) -> TrainState:
  """Initialises the model on a (small) example batch; `pretrained` variables replace matching ones."""
  inputs = {k: jnp.asarray(v[:1]) for k, v in example_batch.items() if k in DEVICE_KEYS}
  variables = flax.core.unfreeze(init_variables(model, inputs, rng))
  if pretrained:
    variables = convert_torch.merge_pretrained(variables, pretrained)
  params, frozen = _split_frozen(variables['params'], model.freeze_encoders)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen_params=frozen,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), tx=tx)


def _model_inputs(batch: Mapping[str, jnp.ndarray]) -> dict:
  return {k: batch[k] for k in ('video', 'audio', 'video_features', 'audio_features') if k in batch}


def _global_norm(tree) -> jnp.ndarray:
  return optax.tree.norm(tree) if jax.tree.leaves(tree) else jnp.zeros(())


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], rng: jax.Array, *,
               model: IACAModel) -> tuple[TrainState, dict]:
  """One AdamW step on the global batch. A non-finite loss or gradient leaves the state unchanged
  (the host stops at the next check with the last good checkpoint intact)."""
  rng = jax.random.fold_in(rng, state.step)
  mutable = ['batch_stats'] if state.batch_stats and not model.freeze_encoders else False

  def loss_fn(params):
    variables = state.replace(params=params).variables()
    outputs = model.apply(variables, _model_inputs(batch), train=True, rngs={'dropout': rng},
                          mutable=mutable)
    (predictions, _), updates = outputs if mutable else (outputs, {})
    loss, aux = losses.ccc_loss(predictions, batch['labels'], batch['mask'])
    return loss, (aux, updates)

  (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                            opt_state=opt_state,
                            batch_stats=updates.get('batch_stats', state.batch_stats))
  grad_norm = _global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {'loss': loss, 'ccc_valence': aux['ccc_valence'], 'ccc_arousal': aux['ccc_arousal'],
             'grad_norm': grad_norm, 'param_norm': _global_norm(state.params),
             'update_norm': _global_norm(param_updates), 'finite': finite}
  return new_state, metrics


def eval_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *, model: IACAModel) -> tuple:
  """Predictions (B, L, 2) and the analysis outputs for one batch, in inference mode."""
  return model.apply(state.variables(), _model_inputs(batch), train=False)


class Trainer:
  """Compiled, sharded steps for one model and mesh."""

  def __init__(self, model: IACAModel, mesh: Mesh):
    self.model, self.mesh = model, mesh
    self.data_sharding = NamedSharding(mesh, P('data'))
    self.replicated = NamedSharding(mesh, P())
    self.train_step = jax.jit(functools.partial(train_step, model=model), donate_argnums=(0,),
                              out_shardings=(self.replicated, self.replicated))
    self.eval_step = jax.jit(functools.partial(eval_step, model=model), out_shardings=self.replicated)

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Host-local numeric arrays -> global arrays sharded on the batch axis (multi-host ready)."""
    return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
            for k, v in local_batch.items() if k in DEVICE_KEYS}


def prefetch_to_devices(batches: Iterable[Mapping[str, np.ndarray]], shard: Callable, depth: int = 2
                        ) -> Iterator[tuple[dict, Mapping[str, np.ndarray]]]:
  """Yields (device batch, host batch) with `depth` batches already transferred (async dispatch)."""
  queue = []
  for batch in batches:
    queue.append((shard(batch), batch))
    if len(queue) > depth:
      yield queue.pop(0)
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


def device_get_metrics(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_finite(metrics: dict, step: int) -> None:
  if not metrics.get('finite', 1.0) or not np.isfinite(metrics['loss']):
    raise FloatingPointError(
        f'Non-finite loss or gradient at step {step} (loss={metrics["loss"]}, grad_norm='
        f'{metrics.get("grad_norm")}). Training stopped; the last good checkpoint is intact. Lower the '
        'learning rate or check the input data.')


# ---------------------------------------------------------------------------------------------
# The loop.

RAW_KEYS = ('video', 'audio', 'labels', 'mask')
CACHED_KEYS = ('video_features', 'audio_features', 'labels', 'mask')


class DataConfig:
  """Where the windows come from: the shards themselves, or the cached-feature dataset."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.cached = bool(config.dataset.features_dir)
    if self.cached:
      self.name, self.data_dir = os.path.abspath(config.dataset.features_dir), None
    else:
      self.name, self.data_dir = config.dataset.name, config.dataset.data_dir
    self.train_keys = CACHED_KEYS if self.cached else RAW_KEYS

  def silent_audio(self) -> dict:
    from iaca_jax import feature_cache
    if self.cached:
      with np.load(os.path.join(self.name, 'silent_audio.npz')) as f:
        return {'audio_features': f['audio_features']}
    builder = input_pipeline.get_builder(self.name, self.data_dir)
    return {'audio': feature_cache.silent_log_mel(feature_cache.source_sample_rate(builder))}

  def train_batches(self, config, *, epoch: int, start_batch: int = 0):
    return input_pipeline.create_train_dataset(
        self.name, self.data_dir, global_batch_size=config.batch_size, seed=config.seed, epoch=epoch,
        start_batch=start_batch, split=config.dataset.train_split, features=self.train_keys,
        jitter=not self.cached, shuffle_buffer=config.dataset.shuffle_buffer)

  def eval_batches(self, config, split: str):
    """Every window of `split`, global batches on every host (each feeds its own rows)."""
    return input_pipeline.create_eval_dataset(self.name, self.data_dir, global_batch_size=config.batch_size,
                                              split=split, process_index=0, process_count=1)

  def steps_per_epoch(self, config) -> int:
    return input_pipeline.num_train_batches(self.name, self.data_dir, global_batch_size=config.batch_size,
                                            split=config.dataset.train_split)


def abstract_like(state: TrainState, sharding: NamedSharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def create_train_state(config, model, data: DataConfig, trainer: Trainer, tx) -> TrainState:
  example = next(iter(data.eval_batches(config, config.dataset.eval_split)))
  pretrained = convert_torch.load_converted(config.pretrained) if config.pretrained else None
  state = init_state(model, example, jax.random.key(config.seed), tx, pretrained)
  return trainer.replicate(state)


class MetricWriter:
  """TensorBoard event files and a plain log line (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.writer = None
    self.log_path = os.path.join(workdir, 'log.txt')
    if self.enabled:
      tf = input_pipeline._tf()
      self.writer = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
      self._tf = tf

  def write(self, step: int, scalars: Mapping[str, float], prefix: str) -> None:
    if not self.enabled:
      return
    with self.writer.as_default():
      for name, value in scalars.items():
        self._tf.summary.scalar(f'{prefix}/{name}', value, step=step)
    self.writer.flush()
    line = f'[{prefix}] step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in scalars.items())
    tqdm.tqdm.write(line)
    with open(self.log_path, 'a') as f:
      f.write(line + '\n')


def evaluate_state(config, trainer: Trainer, state: TrainState, data: DataConfig, split: str, **kwargs) -> dict:
  from iaca_jax import evaluation
  clips = evaluation.predict_split(trainer, state, data.eval_batches(config, split), **kwargs)
  return evaluation.score(clips)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with periodic validation and checkpoints; resumes from `workdir` if it holds a run.

  Returns the best validation metrics and where the best checkpoint is.
  """
  from iaca_jax.checkpoints import Checkpoints

  if config.distributed:
    jax.distributed.initialize()
  os.makedirs(workdir, exist_ok=True)
  model = build_model(config.model)
  trainer = Trainer(model, create_mesh())
  data = DataConfig(config)
  steps_per_epoch = data.steps_per_epoch(config)
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  tx = make_optimizer(config, steps_per_epoch)
  state = create_train_state(config, model, data, trainer, tx)
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  meta = {'best_score': -np.inf, 'best_step': -1, 'best_metrics': {}}
  restored = checkpoints.restore(abstract_like(state, trainer.replicated))
  if restored is not None:
    state, meta = restored
    logging.warning('Resumed from step %d in %s.', int(state.step), workdir)
  writer = MetricWriter(workdir)
  step = int(jax.device_get(state.step))
  base_rng = trainer.replicate(jax.random.key(config.seed + 1))
  in_flight = collections.deque()   # losses of the steps dispatched and maybe not yet done
  progress = tqdm.tqdm(total=total_steps, initial=step, disable=jax.process_index() != 0,
                       desc='train', dynamic_ncols=True)
  pending, interval_start = [], time.time()

  def flush(step_now: int) -> None:
    nonlocal pending, interval_start
    if not pending:
      return
    host = [device_get_metrics(m) for m in pending]
    for i, m in enumerate(host):
      check_finite(m, step_now - len(host) + i + 1)
    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != 'finite'}
    elapsed = time.time() - interval_start
    scalars['sequences_per_second'] = len(host) * config.batch_size / max(elapsed, 1e-9)
    scalars['learning_rate'] = float(learning_rate_schedule(config, steps_per_epoch)(step_now - 1))
    writer.write(step_now, scalars, 'train')
    progress.set_postfix(loss=f'{scalars["loss"]:.4f}', seq_s=f'{scalars["sequences_per_second"]:.1f}')
    pending, interval_start = [], time.time()

  def save(step_now: int, *, best: bool = False) -> None:
    if checkpoints.latest_step(best=best) == step_now:
      return
    flush(step_now)   # never checkpoint a state that went through a non-finite step
    checkpoints.save(step_now, state, meta, best=best)

  while step < total_steps:
    epoch, offset = divmod(step, steps_per_epoch)
    batches = data.train_batches(config, epoch=epoch, start_batch=offset)
    for device_batch, _ in prefetch_to_devices(batches, trainer.shard_batch, config.prefetch_batches):
      with jax.transfer_guard('disallow'):   # an implicit transfer here would be a hidden sync
        state, step_metrics = trainer.train_step(state, device_batch, base_rng)
      pending.append(step_metrics)
      wait_for_steps_in_flight(in_flight, step_metrics['loss'], config.max_steps_in_flight)
      step += 1
      progress.update(1)
      if step % config.log_every_steps == 0:
        flush(step)
      if step % config.checkpoint_every_steps == 0:
        save(step)
      if step >= total_steps:
        break
    epoch_done = step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.eval_every_epochs == 0
    if epoch_done or step >= total_steps:
      flush(step)
      scores = evaluate_state(config, trainer, state, data, config.dataset.eval_split)
      writer.write(step, scores, 'validation')
      score = scores['ccc_valence'] + scores['ccc_arousal']
      if np.isfinite(score) and score > meta['best_score']:
        meta.update(best_score=float(score), best_step=step, best_metrics=scores)
        save(step, best=True)
      save(step)
  progress.close()
  checkpoints.wait()
  checkpoints.close()
  result = dict(meta, steps=step, workdir=workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'train_result.json'), 'w') as f:
      json.dump(result, f, indent=1, default=float)
  return result
