"""Orbax checkpoints: a saved train state restores bit for bit."""

import jax
import numpy as np

from iaca_jax import data_source, kernel_choice, train_lib
from iaca_jax.checkpoints import Checkpoints


def test_checkpoint_restores_bit_exactly(cached, tmp_path):
  config = cached
  data = data_source.DataSource(config)
  model = kernel_choice.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  state = train_lib.create_train_state(config, model, data, trainer, train_lib.make_optimizer(config, 9))
  batch = next(iter(data.train_batches(epoch=0)))
  state, _ = trainer.train_step(state, trainer.shard_batch(batch), jax.random.key(0))
  expected = jax.device_get(state)
  checkpoints = Checkpoints(str(tmp_path / 'ckpt'))
  checkpoints.save(1, state, {'note': 'x'})
  checkpoints.wait()
  restored, meta = checkpoints.restore(train_lib.abstract_like(state, trainer.replicated))
  checkpoints.close()
  assert meta == {'note': 'x'}
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
