"""Compiled steps keep non-finite values non-finite (iaca_jax/compile_options.py): a NaN in one clip's
log-mel gives NaN predictions for its sequence under jit, as NumPy and eager execution give."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from iaca_jax import models, train_lib
from iaca_jax.compile_options import compiler_options


def test_reduction_over_a_relu_keeps_nan():
  # A ReLU before a global average pool: the pattern that XLA:CPU's YNNPACK fusion got wrong.
  x = np.random.default_rng(0).normal(size=(16, 32, 52, 4)).astype(np.float32)
  x[1, 0, 0, 0] = np.nan
  expected = np.sum(np.maximum(x, 0), axis=(1, 2))
  pool = jax.jit(lambda x: jnp.sum(jnp.maximum(x, 0.0), axis=(1, 2)), compiler_options=compiler_options())
  got = np.asarray(pool(x))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
  np.testing.assert_allclose(got[~np.isnan(expected)], expected[~np.isnan(expected)], rtol=1e-5)


def test_eval_step_gives_nan_for_the_sequence_with_a_nan_log_mel():
  config = tiny.get_config()
  model = models.build_model(config.model)
  rng = np.random.default_rng(0)
  size = config.model.face_size
  batch = {  # 2 x 16 clips: from 16 clips a batch on the fused reduction dropped the NaN
    'video': rng.normal(size=(2, 16, 8, size, size, 3)).astype(np.float32),
    'audio': rng.normal(size=(2, 16, 64, 104)).astype(np.float32),
  }
  variables = models.init_variables(model, batch, jax.random.key(0))
  batch['audio'][1, 3, 10, 20] = np.nan
  trainer = train_lib.Trainer(model, train_lib.create_mesh(jax.devices()[:1]))
  predictions, _ = jax.device_get(trainer.eval_step(variables, trainer.shard_batch(batch)))
  assert np.isfinite(predictions[0]).all()
  assert np.isnan(predictions[1]).any(axis=-1).all()  # the BLSTMs spread the NaN over the sequence
