r"""The feature-caching stage: runs the frozen encoders once over every window of every split and
writes the features, with the labels, as a tfds dataset that the fusion model trains on directly.

    python cache_features.py --config configs/synthetic_demo.py

reads config.dataset.{name,data_dir}, builds (or loads, from config.pretrained) the encoders of
config.model, and writes <config.dataset.features_dir>/ (a tfds version folder holding
dataset_info.json and the TFRecord shards, plus silent_audio.npz: the inputs and the encoder
feature of silence, for the missing-audio evaluation). The encoders must be frozen: caching is only
valid when they do not train.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iaca_jax import data_source, distributed, inference, input_pipeline, prepared, pretrained
from iaca_jax.kernel_choice import build_model
from iaca_jax.models import IACAModel, init_variables
from iaca_jax.preprocessing import mel, tfds_builder

PASSTHROUGH = ('labels', 'mask', 'video_name') + input_pipeline.CLIP_KEYS  # copied from the source
VERSION = '1.0.0'
STORAGE_DTYPES = {'float32': np.float32, 'float16': np.float16}


def encoder_variables(config: ml_collections.ConfigDict, model: IACAModel, example: dict) -> dict:
  """Encoder variables: converted pretrained weights when configured, else a seeded initialisation."""
  inputs = {k: example[k] for k in ('video', 'audio')}
  variables = init_variables(model, inputs, jax.random.key(config.seed))
  if config.pretrained is not None:
    variables = pretrained.merge_pretrained(
      variables, pretrained.load_for_model(config.pretrained, config.model)
    )
  return variables


def _encode(model: IACAModel, variables, video, audio):
  return model.apply(variables, {'video': video, 'audio': audio}, method=IACAModel.encode)


class _Encoder:
  """The encoders over every device of every process: this process's rows in, every process's
  feature rows (and host arrays, through `gather`) out, on every process."""

  def __init__(self, model: IACAModel, variables: dict):
    mesh = Mesh(np.asarray(jax.devices()), ('data',))
    self.data_sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    self.variables = distributed.replicate(variables, replicated)
    self.apply = jax.jit(functools.partial(_encode, model), out_shardings=replicated)
    self.gather = inference.RowGatherer(self.data_sharding, replicated)

  def __call__(self, video: np.ndarray, audio: np.ndarray):
    video, audio = (jax.make_array_from_process_local_data(self.data_sharding, x) for x in (video, audio))
    return jax.device_get(self.apply(self.variables, video, audio))


def storage_dtype(config: ml_collections.ConfigDict) -> type:
  """The stored type of the features: float32, or float16 (half the disk; docs/SCALING.md)."""
  name = config.dataset.get('features_dtype', 'float32')
  if name not in STORAGE_DTYPES:
    raise ValueError(f'config.dataset.features_dtype={name!r}; expected one of {sorted(STORAGE_DTYPES)}')
  return STORAGE_DTYPES[name]


def _feature_spec(
  example_video: np.ndarray, example_audio: np.ndarray, source, dtype: type = np.float32
) -> tfds.features.FeaturesDict:
  # float32 as tf.Example floats (4 bytes each); float16 as raw bytes (2 bytes each), which tfds
  # decodes back to float16 and the input pipeline casts to float32.
  encoding = tfds.features.Encoding.NONE if dtype == np.float32 else tfds.features.Encoding.BYTES
  spec = {
    'video_features': tfds.features.Tensor(shape=example_video.shape, dtype=dtype, encoding=encoding),
    'audio_features': tfds.features.Tensor(shape=example_audio.shape, dtype=dtype, encoding=encoding),
  }
  for name in PASSTHROUGH:
    spec[name] = source.info.features[name]
  return tfds.features.FeaturesDict(spec)


class CachedFeatures(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset of encoder features; written once by `cache_features`, read by path."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, features: tfds.features.FeaturesDict, generators: dict, **kwargs):
    self._features, self._generators = features, generators
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds_builder.LocalDatasetInfo(builder=self, features=self._features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return dict(self._generators)

  def _generate_examples(self, examples):  # pragma: no cover (generators are passed in directly)
    yield from examples


def _examples(encoder: _Encoder, batches, dtype: type = np.float32) -> Iterator[tuple[str, dict]]:
  """(key, example) of every window of the split on every process (key: its split position), from
  this process's share `batches`."""
  first = batches.first_window
  for batch in batches:
    video_features, audio_features = encoder(batch['video'], batch['audio'])
    index = inference.window_indices(batch, first)
    first += int(np.sum(batch['valid_window']))
    rows = encoder.gather({**{name: batch[name] for name in PASSTHROUGH}, 'window_index': index})
    for i in np.flatnonzero(rows['window_index'] >= 0):
      example = {name: rows[name][i] for name in PASSTHROUGH}
      example.update(
        video_features=video_features[i].astype(dtype), audio_features=audio_features[i].astype(dtype)
      )
      yield f'{rows["window_index"][i]:09d}', example


def cache_features(config: ml_collections.ConfigDict, *, batch_size: int = 8) -> str:
  """Writes the cached-feature dataset; returns its directory. Nothing is left half-written.

  Every process encodes its share of each split (`batch_size` windows per device-count multiple
  of a global batch); process 0 receives all the features and writes the dataset.
  """
  if not config.model.freeze_encoders:
    raise ValueError('Feature caching needs frozen encoders (config.model.freeze_encoders=True).')
  if config.dataset.features_dir is None:
    raise ValueError('Set config.dataset.features_dir: the folder the cached features are written to.')
  out_dir = os.path.abspath(config.dataset.features_dir)
  storage_dtype(config)  # a bad setting stops before any work
  source = input_pipeline.get_builder(config.dataset.name, config.dataset.data_dir)
  logging.warning('reading %s', prepared.describe(source))
  splits = list(source.info.splits.keys())
  model = build_model(config.model)
  global_batch = max(1, batch_size // jax.device_count()) * jax.device_count()
  eval_batches = lambda split: input_pipeline.create_eval_dataset(
    config.dataset.name, config.dataset.data_dir, global_batch_size=global_batch, split=split
  )
  first = next(iter(eval_batches(splits[0])))
  variables = encoder_variables(config, model, first)
  encoder = _Encoder(model, variables)
  silent_mel = mel.silent_log_mel(data_source.source_sample_rate(source))
  silent_audio = np.broadcast_to(silent_mel, first['audio'][:1].shape)
  video_f, audio_f = jax.device_get(
    jax.jit(functools.partial(_encode, model))(variables, first['video'][:1], silent_audio)
  )
  dtype = storage_dtype(config)
  features = _feature_spec(video_f[0], audio_f[0], source, dtype)
  generators = {s: _examples(encoder, eval_batches(s), dtype) for s in splits}
  if jax.process_index() > 0:  # the same encoder calls (collectives) as process 0, nothing written
    for generator in generators.values():
      collections.deque(generator, maxlen=0)
    multihost_utils.sync_global_devices('feature cache written')
    return out_dir
  tmp_dir = out_dir + '.partial'
  shutil.rmtree(tmp_dir, ignore_errors=True)
  CachedFeatures(
    features=features, generators=generators, data_dir=tmp_dir, file_format='tfrecord'
  ).download_and_prepare()
  writer_dir = os.path.join(tmp_dir, 'cached_features', VERSION)
  np.savez(
    os.path.join(writer_dir, input_pipeline.SILENT_AUDIO_FILE), audio=silent_mel, audio_features=audio_f[0, 0]
  )
  with open(os.path.join(writer_dir, 'cache_config.json'), 'w') as f:
    json.dump(
      {'source': config.dataset.name, 'model': config.model.to_dict(), 'pretrained': config.pretrained},
      f,
      indent=1,
      default=str,
    )
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(writer_dir, out_dir)
  shutil.rmtree(tmp_dir, ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('feature cache written')
  return out_dir
