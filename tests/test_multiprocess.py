"""Two real processes (4 fake CPU devices each, the coordinator on 127.0.0.1, gloo collectives):
train.py trains exactly as one process on 8 devices and reports the same validation metrics; when
one process dies (process 1, or process 0, the coordinator) the other ends by itself with one line and
exit status 1; rerunning the same commands after the kills resumes to the same parameters;
cache_features.py writes the same features as one process."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from iaca_jax import input_pipeline
from iaca_jax.checkpoints import Checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 20  # config.cluster.timeout_s of the processes: a dead peer is noticed by then
RUN_TIMEOUT_S = 600  # the most one launch may take on a busy 2-core machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(args, log_prefix, *, by_env=False):
  """The same command as 2 processes; the coordinator and ids by flags or (by_env) environment."""
  address = f'127.0.0.1:{free_port()}'
  procs = []
  for i in range(2):
    # 4 devices each, LLVM's optimisations off as in the suite's process (tests/conftest.py).
    flags = '--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0'
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
    cmd = [
      sys.executable,
      *args,
      '--config.cluster.distributed=True',
      f'--config.cluster.timeout_s={HEARTBEAT_S}',
    ]
    if by_env:
      env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i))
    else:
      cmd += [
        f'--config.cluster.coordinator_address={address}',
        '--config.cluster.num_processes=2',
        f'--config.cluster.process_id={i}',
      ]
    with open(f'{log_prefix}.{i}.log', 'w') as log:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def tail(log_prefix, i, chars=3000):
  with open(f'{log_prefix}.{i}.log') as f:
    text = f.read()
  return text[-chars:] if chars else text


def wait_all(procs, log_prefix, timeout=RUN_TIMEOUT_S):
  deadline = time.monotonic() + timeout
  for i, proc in enumerate(procs):
    try:
      proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail(f'process {i} did not end within {timeout} s:\n{tail(log_prefix, i)}')
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f'process {i} failed:\n{tail(log_prefix, i)}'


def completed_checkpoints(workdir):
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  return sorted(int(d) for d in os.listdir(latest) if d.isdigit()) if os.path.isdir(latest) else []


def final_params(workdir):
  """The newest checkpoint's parameters, whatever the topology that saved them."""
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  step = checkpoints.latest_step()
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state_dir = os.path.join(workdir, 'checkpoints', 'latest', str(step), 'state')
  metadata = ocp.StandardCheckpointer().metadata(state_dir).item_metadata['params']
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), metadata)
  params, _ = checkpoints.restore_part({'params': target}, step=step)
  checkpoints.close()
  return step, jax.tree.map(np.asarray, params['params'])


def survivor_ends(proc, log_prefix, i):
  """Process `i`, whose peer was killed, ends by itself soon: one line, exit status 1."""
  killed_at = time.monotonic()
  try:
    proc.wait(timeout=3 * HEARTBEAT_S + 60)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f'process {i} still runs long after the other one died:\n{tail(log_prefix, i)}')
  print(f'process {i} ended {time.monotonic() - killed_at:.1f} s after the other one died')
  log = tail(log_prefix, i, chars=None)
  assert proc.returncode == 1, log[-3000:]  # not killed by SIGABRT (-6)
  assert log.strip().splitlines()[-1].startswith('error: '), log[-3000:]
  assert log.strip().endswith('Rerun every process to resume from the last complete checkpoint.'), log[-3000:]
  assert 'Fatal Python error' not in log and 'Traceback' not in log, log[-3000:]


# Not marked heavy, although it is the longest test: it needs the shared one-epoch run, which another
# worker builds at the start, and run first its worker only waited for it (~70 s); in file order it
# starts once the run exists.
def test_two_processes_train_as_one_and_resume_after_kills(one_epoch_run, tmp_path):
  config, one, reference = one_epoch_run.config, one_epoch_run.workdir, one_epoch_run.result  # 1 process
  assert jax.device_count() == 8
  overrides = {k: config.training[k] for k in ('num_epochs', 'checkpoint_every_steps', 'log_every_steps')}
  total = reference['steps']
  assert total > 3

  two = str(tmp_path / 'two')
  args = ['train.py', '--config', 'configs/tiny.py', '--workdir', two]
  args += [f'--config.dataset.{k}={config.dataset[k]}' for k in ('data_dir', 'features_dir')]
  args += [f'--config.training.{k}={v}' for k, v in overrides.items()]
  logs = str(tmp_path / 'train')
  procs = start(args, logs)
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not completed_checkpoints(two):
    assert procs[0].poll() is None and procs[1].poll() is None, tail(logs, 0) + tail(logs, 1)
    assert time.monotonic() < deadline, 'no checkpoint written:\n' + tail(logs, 0)
    time.sleep(0.05)
  procs[1].kill()  # one process dies: the other must end by itself, with a message
  survivor_ends(procs[0], logs, 0)
  assert max(completed_checkpoints(two)) < total, 'the kill came after the end of the run'

  # The same commands resume; now the coordinator (process 0) dies, once process 0 has resumed.
  procs = start(args, str(tmp_path / 'again'))
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while 'Resumed from step' not in tail(str(tmp_path / 'again'), 0, chars=None):
    assert procs[0].poll() is None and procs[1].poll() is None, tail(str(tmp_path / 'again'), 0)
    assert time.monotonic() < deadline, 'no resume:\n' + tail(str(tmp_path / 'again'), 0)
    time.sleep(0.05)
  procs[0].kill()
  survivor_ends(procs[1], str(tmp_path / 'again'), 1)

  procs = start(args, str(tmp_path / 'rerun'))  # the same commands resume from the checkpoint
  wait_all(procs, str(tmp_path / 'rerun'))
  assert 'Resumed from step' in tail(str(tmp_path / 'rerun'), 0, chars=None)
  step_one, params_one = final_params(one)
  step_two, params_two = final_params(two)
  assert step_one == step_two == total
  # Within 1e-6, but for a few of the ~23k parameters: the cross-process all-reduce adds the
  # gradients in another order (~1e-7 relative), and Adam, dividing by sqrt(v), turns that into up to
  # ~1e-5 on a component whose gradient is near zero (2 components, 6e-6 and 2e-6, when written).
  # Different batches would move most parameters by ~lr = 2e-3.
  diffs = np.concatenate(
    [np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two))]
  )
  assert diffs.max() < 1e-4 and np.mean(diffs > 1e-6) < 1e-3, (diffs.max(), np.sum(diffs > 1e-6), diffs.size)
  # Both processes passed the same validation metrics (checked equal across them in the run);
  # process 0 reports them, and they are the 1-process ones.
  result = json.load(open(os.path.join(two, 'train_result.json')))
  assert result['best_step'] == reference['best_step']
  for key, value in reference['best_metrics'].items():
    np.testing.assert_allclose(result['best_metrics'][key], value, atol=1e-6, err_msg=key)
  assert os.path.isfile(os.path.join(two, 'log.txt'))


def test_two_processes_train_replica_groups_whose_replica_0_is_the_one_process_run(one_epoch_run, tmp_path):
  """K = 2 replicas sharded over 2 device groups of 4, one group per process: each process reads the
  whole batch and no gradient crosses processes. Replica 0 has the seeds of the plain run, so it must
  end where the 1-process plain run (8 devices) ended."""
  config, one, reference = one_epoch_run.config, one_epoch_run.workdir, one_epoch_run.result
  workdir = str(tmp_path / 'replicas')
  args = ['train.py', '--config', 'configs/tiny.py', '--workdir', workdir]
  args += [f'--config.dataset.{k}={config.dataset[k]}' for k in ('data_dir', 'features_dir')]
  args += [f'--config.training.{k}={config.training[k]}' for k in ('num_epochs', 'checkpoint_every_steps')]
  args += ['--config.replicas.count=2', '--config.replicas.shard=True']
  logs = str(tmp_path / 'replicas')
  wait_all(start(args, logs), logs)
  step_one, params_one = final_params(one)
  step_two, params_two = final_params(workdir)
  assert step_one == step_two == reference['steps']
  replica = [jax.tree.map(lambda x, k=k: x[k], params_two) for k in (0, 1)]
  diffs = np.concatenate(
    [np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(replica[0]))]
  )
  # As in the data-parallel test: 4 devices of twice the rows add the gradients in another order.
  assert diffs.max() < 1e-4 and np.mean(diffs > 1e-6) < 1e-3, (diffs.max(), np.sum(diffs > 1e-6), diffs.size)
  other = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(replica[1])))
  assert other > 1e-3  # replica 1 has its own seeds
  result = json.load(open(os.path.join(workdir, 'train_result.json')))
  assert result['replicas'] == 2
  assert result['best_step'][0] == reference['best_step']
  for key, value in reference['best_metrics'].items():
    np.testing.assert_allclose(result['best_metrics'][0][key], value, atol=1e-5, err_msg=key)


def windows(features_dir, split):
  """Every window of a cached-feature split in file order: [((name, end frames), {key: value})]."""
  out = []
  batches = input_pipeline.create_eval_dataset(
    features_dir, global_batch_size=8, split=split, process_index=0, process_count=1
  )
  for batch in batches:
    for i in np.flatnonzero(batch['valid_window']):
      out.append(((batch['video_name'][i], tuple(batch['end_frame'][i])), {k: batch[k][i] for k in batch}))
  return out


@pytest.mark.heavy
def test_two_processes_cache_the_same_features_as_one(tiny, cached, tmp_path):
  out = str(tmp_path / 'features')
  args = ['cache_features.py', '--config', 'configs/tiny.py', f'--config.dataset.data_dir={tiny.data_dir}']
  logs = str(tmp_path / 'cache')
  procs = start([*args, f'--config.dataset.features_dir={out}'], logs, by_env=True)
  wait_all(procs, logs)
  assert 'Cached encoder features written' in tail(logs, 0)
  assert 'Cached encoder features written' not in tail(logs, 1)  # process 0 alone reports
  for split in ('train', 'validation', 'test'):
    one, two = windows(cached.dataset.features_dir, split), windows(out, split)
    assert [k for k, _ in one] == [k for k, _ in two]  # the same windows in the same file order
    for (_, a), (_, b) in zip(one, two):
      for key in a:
        if key.endswith('_features'):
          np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
        else:
          np.testing.assert_array_equal(a[key], b[key], err_msg=key)
