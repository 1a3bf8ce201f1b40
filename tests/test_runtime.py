"""The process settings (iaca_jax/runtime.py): non-finite values stay non-finite under jit (a NaN in one
clip's log-mel gives NaN predictions for its sequence, as NumPy gives NaN for the same reduction), set
by one explicit call and not by importing the package."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from iaca_jax import kernel_choice, models, runtime, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relu_then_pool(x):  # a ReLU before a global average pool: what XLA:CPU's YNNPACK fusion got wrong
  return jnp.sum(jnp.maximum(x, 0.0), axis=(1, 2))


def nan_input():
  x = np.random.default_rng(0).normal(size=(16, 32, 52, 4)).astype(np.float32)
  x[1, 0, 0, 0] = np.nan
  return x


def test_reduction_over_a_relu_keeps_nan():
  x = nan_input()
  expected = np.sum(np.maximum(x, 0), axis=(1, 2))
  got = np.asarray(jax.jit(relu_then_pool)(x))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
  np.testing.assert_allclose(got[~np.isnan(expected)], expected[~np.isnan(expected)], rtol=1e-5)


def test_configure_process_sets_the_flag_and_importing_sets_nothing():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', runtime.ASYNC_DISPATCH_ENV)}
  code = (
    'import os, iaca_jax.train_lib, jax; '
    "print(os.environ.get('XLA_FLAGS', '-'), jax.config.values['jax_cpu_enable_async_dispatch']); "
    'from iaca_jax import runtime; runtime.configure_process(); import numpy as np; '
    'from tests.test_runtime import nan_input, relu_then_pool; '
    "print(os.environ['XLA_FLAGS'], jax.config.values['jax_cpu_enable_async_dispatch'], "
    'int(np.isnan(np.asarray(jax.jit(relu_then_pool)(nan_input()))).sum()))'
  )
  run = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split() == ['-', 'True', runtime.FLAG, 'False', '1'], run.stdout  # one NaN in one channel


def test_eval_step_gives_nan_for_the_sequence_with_a_nan_log_mel():
  config = tiny.get_config()
  model = kernel_choice.build_model(config.model)
  rng = np.random.default_rng(0)
  size = config.model.face_size
  batch = {  # 2 x 16 clips: from 16 clips a batch on, the fused reduction dropped the NaN
    'video': rng.normal(size=(2, 16, 8, size, size, 3)).astype(np.float32),
    'audio': rng.normal(size=(2, 16, 64, 104)).astype(np.float32),
  }
  variables = models.init_variables(model, batch, jax.random.key(0))
  batch['audio'][1, 3, 10, 20] = np.nan
  trainer = train_lib.Trainer(model, train_lib.create_mesh(jax.devices()[:1]))
  predictions, _ = jax.device_get(trainer.eval_step(variables, trainer.shard_batch(batch)))
  assert np.isfinite(predictions[0]).all()
  assert np.isnan(predictions[1]).any(axis=-1).all()  # the BLSTMs spread the NaN over the sequence


def test_entry_points_keep_their_compiled_programs_between_commands(monkeypatch, tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert runtime.keep_compiled_programs() == str(tmp_path / 'iaca_jax' / 'jit')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'iaca_jax' / 'jit')
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'mine'))
    assert runtime.keep_compiled_programs() == str(tmp_path / 'mine')
    monkeypatch.setenv('IACA_JIT_CACHE', '0')
    jax.config.update('jax_compilation_cache_dir', None)
    assert runtime.keep_compiled_programs() is None and jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
