"""DataSource: the run's config picks the batches (raw shards or cached features) and their jitter."""

import numpy as np
from conftest import make_config

from iaca_jax import input_pipeline
from iaca_jax.data_source import DataSource


def test_config_jitter_reaches_the_training_batches(tiny):
  config = make_config(tiny.data_dir)
  plain = next(
    iter(
      input_pipeline.create_train_dataset(
        'synthetic_av',
        tiny.data_dir,
        global_batch_size=config.dataset.batch_size,
        seed=config.seed,
        features=DataSource(config).train_keys,
        jitter=None,
        shuffle_buffer=config.dataset.shuffle_buffer,
      )
    )
  )
  jittered = next(iter(DataSource(config).train_batches(epoch=0)))
  config.dataset.jitter = ()
  off = next(iter(DataSource(config).train_batches(epoch=0)))
  np.testing.assert_array_equal(off['video'], plain['video'])
  assert not np.array_equal(jittered['video'], plain['video'])
  np.testing.assert_array_equal(jittered['labels'], plain['labels'])  # the same windows


def test_input_shapes_come_from_the_element_spec(tiny, cached):
  raw = DataSource(make_config(tiny.data_dir)).input_shapes()
  assert {k: v.shape[1:] for k, v in raw.items()} == {'video': (16, 8, 112, 112, 3), 'audio': (16, 64, 104)}
  features = DataSource(cached).input_shapes()
  assert {k: v.shape[1:] for k, v in features.items()} == {
    'video_features': (16, 2, 2, 32),
    'audio_features': (16, 32),
  }
