"""The train step and the loop: 8 fake CPU devices give the same parameters as one device; frozen
encoders have no optimizer state; a non-finite loss leaves the state unchanged; the learning-rate
schedule; the loss falls; a resumed run equals an uninterrupted one."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from iaca_jax import data_source, kernel_choice, models, pretrained, train_lib
from iaca_jax.checkpoints import Checkpoints
from iaca_jax.cpu_kernels import cpu_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_batch(seed=0, batch=8, clips=16, raw=False):
  rng = np.random.default_rng(seed)
  out = {
    'labels': rng.uniform(-1, 1, (batch, clips, 2)).astype(np.float32),
    'mask': rng.random((batch, clips)) > 0.2,
  }
  if raw:
    out['video'] = rng.normal(size=(batch, clips, 8, 16, 16, 3)).astype(np.float32)
    out['audio'] = rng.normal(size=(batch, clips, 64, 104)).astype(np.float32)
  else:
    out['video_features'] = rng.normal(size=(batch, clips, 3, 3, 8)).astype(np.float32)
    out['audio_features'] = rng.normal(size=(batch, clips, 8)).astype(np.float32)
  return out


def run_steps(devices, batches, config, steps=2):
  model = kernel_choice.build_model(config.model, devices)
  trainer = train_lib.Trainer(model, train_lib.create_mesh(devices))
  # Plain SGD: parameter differences stay proportional to gradient differences (Adam would blow up
  # rounding noise on near-zero gradients to a whole step), so a tight tolerance means something.
  tx = optax.sgd(0.1)
  state = trainer.replicate(train_lib.init_state(model, batches[0], jax.random.key(0), tx))
  for i in range(steps):
    state, metrics = trainer.train_step(state, trainer.shard_batch(batches[i]), jax.random.key(1))
  return jax.device_get(state), train_lib.device_get_metrics(metrics)


def test_eight_devices_match_one_device():
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 fake CPU devices'
  config = tiny.get_config()
  batches = [random_batch(s) for s in range(2)]
  one, metrics_one = run_steps(jax.devices()[:1], batches, config)
  eight, metrics_eight = run_steps(jax.devices(), batches, config)
  np.testing.assert_allclose(metrics_one['loss'], metrics_eight['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert int(eight.step) == 2


def _compiled_train_step(kernels, batch_size=16) -> str:
  config = tiny.get_config()
  mesh = train_lib.create_mesh()
  model = models.model_from_config(config.model, kernels)
  trainer = train_lib.Trainer(model, mesh)
  batch = trainer.shard_batch(random_batch(batch=batch_size))
  tx = train_lib.make_optimizer(config, 10)
  state = jax.eval_shape(lambda: train_lib.init_state(model, batch, jax.random.key(0), tx))
  state = train_lib.abstract_like(state, trainer.replicated)
  return trainer.train_step.lower(state, batch, jax.random.key(1)).compile().as_text()


@pytest.mark.parametrize('choice', ['xla', 'cpu'])
def test_the_step_on_eight_devices_gathers_no_batch(choice):
  """Data parallelism as intended: each device computes its own rows; only sums cross devices."""
  kernels = kernel_choice.select_kernels(choice, jax.devices())
  compiled = _compiled_train_step(kernels)
  assert 'all-reduce' in compiled
  for collective in ('all-gather', 'all-to-all', 'collective-permute'):
    assert collective not in compiled, (choice, collective)


def test_the_check_sees_a_gathered_batch():
  """What the test above would catch: the one-device CPU kernels chunk the co-attention's rows in a
  loop, and over 8 devices XLA gathers the batch into it (one co-attention layer's gradients here);
  the same layer with the 8-device set gathers nothing."""
  sharded = jax.sharding.NamedSharding(train_lib.create_mesh(), jax.P('data'))
  x = jax.device_put(np.ones((16, 4, 8), np.float32), sharded)

  def compiled(kernels) -> str:
    layer = models.cross_attention.DenseCoAttentionLayer(dropout=0.0, kernels=kernels)
    params = layer.init(jax.random.key(0), x, x, train=False)
    loss = lambda p, a, b: sum(jnp.sum(y) for y in layer.apply(p, a, b, train=False))
    return jax.jit(jax.grad(loss)).lower(params, x, x).compile().as_text()

  assert 'all-gather' in compiled(cpu_kernels(1))
  assert 'all-gather' not in compiled(cpu_kernels(8))


def test_frozen_encoders_get_no_optimizer_state_and_stay_fixed():
  config = tiny.get_config()
  config.model.face_size = None
  batch = random_batch(raw=True, batch=8, clips=2)
  model = kernel_choice.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  state = train_lib.init_state(model, batch, jax.random.key(0), train_lib.make_optimizer(config, 10))
  assert 'encoders' in state.frozen_params and 'encoders' not in state.params
  opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
  encoder_shapes = {x.shape for x in jax.tree.leaves(state.frozen_params)}
  assert not any(len(s) >= 4 for s in opt_shapes) and any(len(s) >= 4 for s in encoder_shapes)
  before = jax.device_get(state.frozen_params)
  state, _ = trainer.train_step(trainer.replicate(state), trainer.shard_batch(batch), jax.random.key(1))
  after = jax.device_get(state.frozen_params)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_leaves_state_unchanged_and_is_reported():
  config = tiny.get_config()
  batch = random_batch()
  model = kernel_choice.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  state = trainer.replicate(
    train_lib.init_state(model, batch, jax.random.key(0), train_lib.make_optimizer(config, 10))
  )
  before = jax.device_get(state.params)
  bad = dict(batch, audio_features=np.full_like(batch['audio_features'], np.nan))
  state, metrics = trainer.train_step(state, trainer.shard_batch(bad), jax.random.key(1))
  metrics = train_lib.device_get_metrics(metrics)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FloatingPointError, match='Non-finite'):
    train_lib.check_finite(metrics, step=1)


def test_guard_covers_inputs_outside_the_loss_and_infinite_updates():
  config = tiny.get_config()
  batch = random_batch()
  model = kernel_choice.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  # One NaN in a clip that the loss masks out: the loss may stay finite, the step must not be taken.
  bad = {k: v.copy() for k, v in batch.items()}
  bad['mask'][0, 0] = False
  bad['video_features'][0, 0, 0, 0, 0] = np.nan
  for tx, data, cause in (
    (optax.sgd(0.1), bad, 'input batch'),
    (optax.scale(np.inf), batch, 'learning rate'),
  ):
    state = trainer.replicate(train_lib.init_state(model, batch, jax.random.key(0), tx))
    before = jax.device_get(state.params)
    state, metrics = trainer.train_step(state, trainer.shard_batch(data), jax.random.key(1))
    metrics = train_lib.device_get_metrics(metrics)
    assert not metrics['finite']
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
      np.testing.assert_array_equal(a, b)
    with pytest.raises(FloatingPointError, match=cause):
      train_lib.check_finite(metrics, step=1)


def test_learning_rate_schedule_follows_the_paper():
  config = tiny.get_config()
  config.optimizer.learning_rate, config.schedule.decay_start_epoch = 1e-3, 5
  schedule = train_lib.learning_rate_schedule(config, steps_per_epoch=10)
  expected = {0: 1e-3, 49: 1e-3, 50: 8e-4, 69: 8e-4, 70: 6.4e-4, 90: 5.12e-4}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)


def test_loss_falls_on_the_tiny_set(cached):
  config = cached
  config.optimizer.learning_rate = 3e-3
  data = data_source.DataSource(config)
  model = kernel_choice.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  steps = data.steps_per_epoch()
  state = train_lib.create_train_state(config, model, data, trainer, train_lib.make_optimizer(config, steps))
  losses = []
  for epoch in range(6):
    for batch in data.train_batches(epoch=epoch):
      state, metrics = trainer.train_step(state, trainer.shard_batch(batch), jax.random.key(0))
      losses.append(float(metrics['loss']))
  first, last = np.mean(losses[:steps]), np.mean(losses[-steps:])
  assert np.isfinite(losses).all()
  assert last < first - 0.1, (first, last)


def final_params(workdir):
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  step = checkpoints.latest_step()
  args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  restored = checkpoints.latest.restore(step, args=args)
  checkpoints.close()
  return step, jax.tree.map(np.asarray, restored['state']['params'])


@pytest.mark.heavy
def test_resumed_run_equals_uninterrupted_run(one_epoch_run, tmp_path):
  config = one_epoch_run.config.copy_and_resolve_references()
  config.training.checkpoint_every_steps = 5  # the checkpoints of the two runs need not be at the same steps
  straight = one_epoch_run.workdir
  resumed = str(tmp_path / 'resumed')
  config.training.max_steps = 5  # mid-epoch: the resumed run must skip the batches already seen
  train_lib.train_and_evaluate(config, resumed)
  assert final_params(resumed)[0] == 5
  config.training.max_steps = None
  result = train_lib.train_and_evaluate(config, resumed)
  step_a, params_a = final_params(straight)
  step_b, params_b = final_params(resumed)
  assert step_a == step_b == result['steps'] == data_source.DataSource(config).steps_per_epoch()
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  assert os.path.isfile(os.path.join(resumed, 'train_result.json'))
  with open(os.path.join(resumed, train_lib.RUN_CONFIG_FILE)) as f:  # what predict.py builds from
    assert json.load(f) == json.loads(config.to_json())
  assert any(f.startswith('events') for f in os.listdir(os.path.join(resumed, 'tensorboard')))


def test_host_waits_only_for_steps_beyond_the_limit_in_flight():
  waited = []

  class Dispatched:
    def __init__(self, step):
      self.step = step

    def block_until_ready(self):
      waited.append(self.step)

  in_flight = collections.deque()
  for step in range(6):
    train_lib.wait_for_steps_in_flight(in_flight, Dispatched(step), limit=2)
    assert waited == list(range(step - 1)), step  # step n waits for n - 2 and keeps 2 queued
  unbounded = collections.deque()
  for step in range(6):
    train_lib.wait_for_steps_in_flight(unbounded, Dispatched(step), limit=0)
  assert waited == [0, 1, 2, 3] and not unbounded


def test_user_mistakes_end_in_one_line_before_any_work(tmp_path):
  not_a_dir = tmp_path / 'file'
  not_a_dir.write_text('x')
  runs = {
    'no_such_key': ['--workdir', str(tmp_path / 'run'), '--config.model.no_such_key=1'],
    'is not a directory': ['--workdir', str(not_a_dir)],
  }
  for expected, args in runs.items():
    cmd = [sys.executable, 'train.py', '--config', 'configs/tiny.py', *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'run').exists()  # nothing written for a bad config


# Unknown `--config.` fields, with and without --config (ml_collections reads the default file when the
# flag is defined, at import), each parsed as train.py parses its command line.
UNKNOWN_FIELDS = r"""
import sys
from absl import flags
cases = [
  [],
  ['--config=configs/tiny.py', '--config.nosuch=1'],
  ['--config=configs/tiny.py', '--config.nosuch.deeper=1'],
  ['--config=configs/tiny.py', '--config.model.gating=none'],
]
sys.argv = ['train.py', '--workdir=/nonexistent', '--config.model.gatin=1']
import train
from iaca_jax import cli
for args in cases:
  argv = sys.argv = sys.argv[:2] + args if args else sys.argv
  try:
    cli.parse_flags(argv)
    print('parsed: gating', flags.FLAGS.config.model.gating, file=sys.stderr, flush=True)
  except SystemExit as e:
    print('exit', e.code, file=sys.stderr, flush=True)
  flags.FLAGS.unparse_flags()
"""


def test_an_unknown_config_field_is_one_clean_line_naming_it():
  run = subprocess.run(
    [sys.executable, '-c', UNKNOWN_FIELDS], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  lines = [line for line in run.stderr.splitlines() if line.startswith(('error:', 'exit', 'parsed'))]
  assert lines == [
    "error: unknown config field 'model.gatin'; did you mean 'model.gating'? (see --helpfull)",
    'exit 2',
    "error: unknown config field 'nosuch' (see --helpfull)",
    'exit 2',
    "error: unknown config field 'nosuch.deeper': there is no 'nosuch' (see --helpfull)",
    'exit 2',
    'parsed: gating none',  # 'none' is a value of gating, not an unset optional field
  ], run.stderr[-3000:]


def converted_weights_for_other_settings(path) -> str:
  """A converted-weights directory whose conversion.json asks for features=999."""
  weights = {'params': {'joint_temporal': {'linear': {'kernel': np.ones((2, 2), np.float32)}}}}
  return pretrained.save_converted(weights, str(path), metadata={'model_config': {'features': 999}})


def test_a_run_refused_for_its_converted_weights_leaves_nothing_behind(cached, tmp_path):
  converted = converted_weights_for_other_settings(tmp_path / 'converted')
  workdir = tmp_path / 'new_run'
  cmd = [sys.executable, 'train.py', '--config', 'configs/tiny.py', '--workdir', str(workdir)]
  cmd += [f'--config.dataset.{k}={cached.dataset[k]}' for k in ('data_dir', 'features_dir')]
  run = subprocess.run([*cmd, f'--config.pretrained={converted}'], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 1, run.stderr[-2000:]
  assert (
    run.stderr.strip()
    .splitlines()[-1]
    .startswith(
      f'error: The converted weights in {converted} were made for other model settings: features=16'
    )
  ), run.stderr[-2000:]
  assert not workdir.exists()  # train.py made it, and removed it again
  mine = tmp_path / 'my_run'  # a folder the user had: kept as it was
  mine.mkdir()
  (mine / 'notes.txt').write_text('mine')
  config = cached
  config.pretrained = converted
  with pytest.raises(pretrained.ConversionError, match='other model settings'):
    train_lib.train_and_evaluate(config, str(mine))
  assert os.listdir(mine) == ['notes.txt']


STOPPED_RUN = """
import sys
import numpy as np
from configs import tiny
from iaca_jax import train_lib

config = tiny.get_config()
config.dataset.data_dir, config.dataset.features_dir, workdir = sys.argv[1:4]
config.training.log_every_steps, config.training.checkpoint_every_steps = 1, 2
prefetch_to_devices = train_lib.prefetch_to_devices

def with_nan_in_third_batch(batches, *args):
  def batches_():
    for i, batch in enumerate(batches):
      yield dict(batch, audio_features=batch['audio_features'] * np.nan) if i == 2 else batch
  return prefetch_to_devices(batches_(), *args)

train_lib.prefetch_to_devices = with_nan_in_third_batch
train_lib.train_and_evaluate(config, workdir)  # raises at step 3, its process then exits
"""


@pytest.mark.heavy
def test_a_run_stopped_by_a_bad_step_keeps_the_checkpoint_saved_before_it(cached, tmp_path):
  # The save of step 2 is still in flight when step 3 fails and the interpreter shuts down.
  workdir = str(tmp_path / 'run')
  config = cached
  args = [sys.executable, '-c', STOPPED_RUN, config.dataset.data_dir, config.dataset.features_dir, workdir]
  run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0 and 'Non-finite step 3' in run.stderr, run.stderr[-2000:]
  assert f'the last complete checkpoint is step 2 (workdir {workdir})' in run.stderr, run.stderr[-2000:]
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  assert sorted(os.listdir(latest)) == ['2'], os.listdir(latest)  # complete, nothing temporary
  step, params = final_params(workdir)
  assert step == 2 and all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_a_non_finite_first_step_says_that_no_checkpoint_was_written(cached, tmp_path, monkeypatch):
  config = cached
  config.training.max_steps = 2
  prefetch_to_devices = train_lib.prefetch_to_devices

  def with_nan_in_first_batch(batches, *args):
    batches = (
      dict(b, audio_features=b['audio_features'] * np.nan) if i == 0 else b for i, b in enumerate(batches)
    )
    return prefetch_to_devices(batches, *args)

  monkeypatch.setattr(train_lib, 'prefetch_to_devices', with_nan_in_first_batch)
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError) as stopped:
    train_lib.train_and_evaluate(config, workdir)
  assert 'Non-finite step 1' in str(stopped.value)
  assert str(stopped.value).endswith(f'Training stopped; no checkpoint was written (workdir {workdir}).')
  assert not os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))


def completed_steps(workdir):
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  return sorted(int(d) for d in os.listdir(latest) if d.isdigit()) if os.path.isdir(latest) else []


@pytest.mark.heavy
def test_ctrl_c_stops_training_after_the_step_and_saves_it(cached, tmp_path):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, 'train.py', '--config', 'configs/tiny.py', '--workdir', workdir]
  cmd += [f'--config.dataset.{k}={cached.dataset[k]}' for k in ('data_dir', 'features_dir')]
  cmd += ['--config.training.num_epochs=100', '--config.training.checkpoint_every_steps=2']
  log_path = tmp_path / 'train.log'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 300
    while not completed_steps(workdir):  # it is stepping
      assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
  finally:
    proc.kill()
  output = log_path.read_text()
  assert proc.returncode == 130, output[-3000:]
  assert 'Traceback' not in output and 'Exception ignored' not in output, output[-3000:]
  last = output.strip().splitlines()[-1]
  stopped = re.fullmatch(
    r'interrupted \(SIGINT\) at step (\d+); the last complete checkpoint is step (\d+) '
    rf'\(workdir {re.escape(workdir)}\)\. Rerun the same command to continue\.',
    last,
  )
  assert stopped, output[-3000:]
  step = int(stopped.group(1))
  assert int(stopped.group(2)) == step == max(completed_steps(workdir))  # saved where it stopped
  assert not [d for d in os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) if not d.isdigit()]
  restored, params = final_params(workdir)  # what a rerun resumes from (test_resumed_run_equals_...)
  assert restored == step and all(np.isfinite(p).all() for p in jax.tree.leaves(params))
