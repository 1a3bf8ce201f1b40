"""DataSource: the run's config picks the batches (raw shards or cached features) and their jitter."""

import logging
import os

import numpy as np
import pytest
from conftest import make_config

from iaca_jax import input_pipeline
from iaca_jax.data_source import DataSource
from iaca_jax.preprocessing import DataError


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


def test_a_run_names_the_dataset_version_it_needs_and_reads(tiny, tmp_path, caplog):
  """Only an older version built: one line with the version needed, the one found and how to build it.
  The version read is logged."""
  old = tmp_path / 'tfds' / 'synthetic_av' / 'sr44100' / '0.9.0'
  old.mkdir(parents=True)
  (old / 'dataset_info.json').write_text('{}')
  with pytest.raises(DataError) as e:
    DataSource(make_config(str(tmp_path / 'tfds'))).steps_per_epoch()
  message = str(e.value)
  assert '\n' not in message and 'version 1.0.0' in message and 'found version 0.9.0' in message
  assert (
    f'python -m data.build --dataset=synthetic_av --config=sr44100 --data_dir={tmp_path / "tfds"}' in message
  )
  with caplog.at_level(logging.INFO):
    DataSource(make_config(tiny.data_dir)).steps_per_epoch()
  read = os.path.join(tiny.data_dir, 'synthetic_av', 'sr44100', '1.0.0')
  assert any(f'synthetic_av/sr44100 version 1.0.0 at {read}' in r.getMessage() for r in caplog.records)
