"""K replicas in one step: replica k equals a plain run with replica k's seeds; 8 fake devices equal
one; a replica run resumes exactly, keeps each replica's best state and is scored replica by replica."""

import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from iaca_jax import evaluate_lib, inference, kernel_choice, metrics, train_lib
from iaca_jax import replicas as replicas_lib
from iaca_jax.checkpoints import Checkpoints
from tests.test_train_lib import random_batch

K, STEPS = 3, 5


def train_replicas(devices, batches, replicas=K, shard_replicas=False, on_device=None):
  """`replicas` replicas (seeds 0, 1, ...) over `batches` with plain SGD on `devices`;
  `on_device(state)` sees the last state before it leaves the devices."""
  config = tiny.get_config()
  config.replicas.count, config.replicas.shard = replicas, shard_replicas
  model = kernel_choice.build_model(config.model)
  mesh = train_lib.create_mesh(devices, replicas_lib.device_groups(config, len(devices)))
  trainer = train_lib.Trainer(model, mesh, replicas)
  # Plain SGD: Adam would blow up rounding noise on near-zero gradients to a whole step.
  state = trainer.place_state(train_lib.fresh_state(config, model, batches[0], optax.sgd(0.1)))
  rngs = trainer.replicate(train_lib.dropout_keys(config))
  for batch in batches:
    state, step_metrics = trainer.train_step(state, trainer.shard_batch(batch), rngs)
  if on_device:
    on_device(state)
  return jax.device_get(state), train_lib.device_get_metrics(step_metrics)


@pytest.fixture(scope='module')
def batches():
  return [random_batch(s) for s in range(STEPS)]


@pytest.fixture(scope='module')
def one_device_replicas(batches):
  return train_replicas(jax.devices()[:1], batches)


@pytest.mark.xdist_group('one_device_replicas')  # one fixture build
def test_replica_k_equals_a_plain_run_with_its_seeds(batches, one_device_replicas):
  replicas, replica_metrics = one_device_replicas
  config = tiny.get_config()
  model = kernel_choice.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh(jax.devices()[:1]))
  for k in range(K):
    # Replica k initialises from seed 2k and draws dropout from seed 2k + 1 (config.seed = 0).
    state = train_lib.init_state(model, batches[0], jax.random.key(2 * k), optax.sgd(0.1))
    state = trainer.replicate(state)
    for batch in batches:
      state, step_metrics = trainer.train_step(state, trainer.shard_batch(batch), jax.random.key(2 * k + 1))
    plain = jax.device_get(state)
    assert int(replicas.step[k]) == int(plain.step) == STEPS
    np.testing.assert_allclose(replica_metrics['loss'][k], float(step_metrics['loss']), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(replicas.params), jax.tree.leaves(plain.params), strict=True):
      np.testing.assert_allclose(a[k], b, atol=1e-5)
  first = jax.tree.leaves(replicas.params)[0]
  assert np.abs(first[0] - first[1]).max() > 1e-3  # the replicas are different models


@pytest.mark.xdist_group('one_device_replicas')  # one fixture build
def test_eight_devices_match_one_device_with_replicas(batches, one_device_replicas):
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 fake CPU devices'
  one, metrics_one = one_device_replicas
  eight, metrics_eight = train_replicas(jax.devices(), batches)
  np.testing.assert_allclose(metrics_one['loss'], metrics_eight['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.xdist_group('one_device_replicas')  # one fixture build
def test_replicas_sharded_over_device_groups_match_one_device(batches, one_device_replicas):
  """K = 3 on 6 devices with config.replicas.shard: 3 groups of 2 devices, each group training one
  replica on the batch split in two; the same parameters as all replicas on one device."""
  one, metrics_one = one_device_replicas

  def one_replica_per_group(state):
    params = jax.tree.leaves(state.params)[0]
    assert params.sharding.spec[0] == 'replica'
    assert {shard.data.shape[0] for shard in params.addressable_shards} == {1}

  sharded, metrics_sharded = train_replicas(
    jax.devices()[:6], batches, shard_replicas=True, on_device=one_replica_per_group
  )
  np.testing.assert_allclose(metrics_one['loss'], metrics_sharded['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(sharded.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def latest_states(workdir):
  """{step: params} of every latest checkpoint and (best step, best params, meta)."""
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  latest = {
    step: jax.tree.map(np.asarray, checkpoints.latest.restore(step, args=args)['state']['params'])
    for step in checkpoints.latest.all_steps()
  }
  best = checkpoints.best.restore(checkpoints.best.latest_step(), args=args)
  checkpoints.close()
  return latest, jax.tree.map(np.asarray, best['state']['params']), best['meta']


@pytest.mark.heavy
def test_replica_run_resumes_exactly_keeps_each_best_and_is_scored_per_replica(cached, tmp_path):
  config = cached
  config.replicas.count, config.training.num_epochs, config.training.keep_checkpoints = 2, 2, 20
  config.training.checkpoint_every_steps, config.training.log_every_steps = 5, 5
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  result = train_lib.train_and_evaluate(config, straight)
  config.training.max_steps = 5
  train_lib.train_and_evaluate(config, resumed)
  config.training.max_steps = None
  train_lib.train_and_evaluate(config, resumed)
  latest, best, meta = latest_states(straight)
  latest_resumed, _, _ = latest_states(resumed)
  final = max(latest)
  assert final == result['steps'] and len(result['best_step']) == 2
  for a, b in zip(jax.tree.leaves(latest[final]), jax.tree.leaves(latest_resumed[final]), strict=True):
    np.testing.assert_array_equal(a, b)
  for k, step in enumerate(meta['best_step']):  # replica k's best state is its state at its best step
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(latest[step]), strict=True):
      np.testing.assert_array_equal(a[k], b[k])

  evaluator = evaluate_lib.Evaluator(config, straight)
  scores = evaluate_lib.score_split(evaluator, 'validation', str(tmp_path / 'eval'))
  # Each replica alone, through the plain (one-model) step, as a one-model evaluation would run it.
  plain = train_lib.Trainer(evaluator.model, train_lib.create_mesh())
  for k in range(2):
    variables = jax.tree.map(lambda x, k=k: x[k], evaluator.variables)
    clips = inference.predict_split(plain, variables, evaluator.data.eval_batches('validation'))
    expected = metrics.score_clips(clips)
    assert scores['replicas'][k]['ccc_mean'] == pytest.approx(expected['ccc_mean'], abs=1e-5)
    assert meta['best_metrics'][k]['ccc_mean'] == pytest.approx(expected['ccc_mean'], abs=1e-5)
  assert scores['ccc_mean'] == pytest.approx(np.mean([s['ccc_mean'] for s in scores['replicas']]))
  table = open(tmp_path / 'eval' / 'metrics_validation.md').read()
  assert '95% t-interval over 2 replicas' in table and table.count('\n| ') == 4


def test_a_run_with_replicas_sharded_over_devices_resumes_and_validates_as_the_default_layout(
  cached, tmp_path
):
  """The loop with config.replicas.shard (2 replicas, 8 devices: 2 groups of 4): it restores a
  checkpoint into the sharded layout and resumes, and its validation during training gives each
  replica the scores the default-layout evaluator gives the saved best state."""
  config = cached
  config.replicas.count, config.replicas.shard, config.training.max_steps = 2, True, 2
  config.training.checkpoint_every_steps, config.evaluation.every_epochs = 2, 1
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(config, workdir)
  config.training.max_steps = 4
  result = train_lib.train_and_evaluate(config, workdir)
  assert result['steps'] == 4 and len(result['best_step']) == 2
  evaluator = evaluate_lib.Evaluator(config, workdir)  # the default layout: every replica everywhere
  assert 'replica' not in evaluator.trainer.mesh.axis_names
  for k, scores in enumerate(evaluator.score_each('validation')):
    assert result['best_metrics'][k]['ccc_mean'] == pytest.approx(scores['ccc_mean'], abs=1e-5)
