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

import json
import os
import shutil
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from iaca_jax import data_source, input_pipeline, pretrained
from iaca_jax.models import IACAModel, build_model, init_variables
from iaca_jax.preprocessing import mel

PASSTHROUGH = ('labels', 'mask', 'video_name') + input_pipeline.CLIP_KEYS  # copied from the source
VERSION = '1.0.0'


def encoder_variables(config: ml_collections.ConfigDict, model: IACAModel, example: dict) -> dict:
  """Encoder variables: converted pretrained weights when configured, else a seeded initialisation."""
  inputs = {k: example[k] for k in ('video', 'audio')}
  variables = init_variables(model, inputs, jax.random.key(config.seed))
  if config.pretrained:
    variables = pretrained.merge_pretrained(
      variables, pretrained.load_for_model(config.pretrained, config.model)
    )
  return variables


class _Encoder:
  def __init__(self, model: IACAModel, variables: dict):
    self.variables = variables
    self.apply = jax.jit(
      lambda v, video, audio: model.apply(v, {'video': video, 'audio': audio}, method=IACAModel.encode)
    )

  def __call__(self, video: np.ndarray, audio: np.ndarray):
    return jax.device_get(self.apply(self.variables, video, audio))


def _feature_spec(example_video: np.ndarray, example_audio: np.ndarray, source) -> tfds.features.FeaturesDict:
  spec = {
    'video_features': tfds.features.Tensor(shape=example_video.shape, dtype=np.float32),
    'audio_features': tfds.features.Tensor(shape=example_audio.shape, dtype=np.float32),
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
    return tfds.core.DatasetInfo(builder=self, features=self._features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return dict(self._generators)

  def _generate_examples(self, examples):  # pragma: no cover (generators are passed in directly)
    yield from examples


def _examples(encoder: _Encoder, batches) -> Iterator[tuple[str, dict]]:
  index = 0
  for batch in batches:
    video_features, audio_features = encoder(batch['video'], batch['audio'])
    for i in np.flatnonzero(batch['valid_window']):
      example = {name: batch[name][i] for name in PASSTHROUGH}
      example.update(video_features=video_features[i], audio_features=audio_features[i])
      yield f'{index:09d}', example
      index += 1


def cache_features(config: ml_collections.ConfigDict, *, batch_size: int = 8) -> str:
  """Writes the cached-feature dataset; returns its directory. Nothing is left half-written."""
  if not config.model.freeze_encoders:
    raise ValueError('Feature caching needs frozen encoders (config.model.freeze_encoders=True).')
  out_dir = os.path.abspath(config.dataset.features_dir)
  source = input_pipeline.get_builder(config.dataset.name, config.dataset.data_dir)
  splits = list(source.info.splits.keys())
  model = build_model(config.model)
  eval_batches = lambda split: input_pipeline.create_eval_dataset(
    config.dataset.name,
    config.dataset.data_dir,
    global_batch_size=batch_size,
    split=split,
    process_index=0,
    process_count=1,
  )
  first = next(iter(eval_batches(splits[0])))
  encoder = _Encoder(model, encoder_variables(config, model, first))
  silent_mel = mel.silent_log_mel(data_source.source_sample_rate(source))
  video_f, audio_f = encoder(first['video'][:1], np.broadcast_to(silent_mel, first['audio'][:1].shape))
  features = _feature_spec(video_f[0], audio_f[0], source)
  tmp_dir = out_dir + '.partial'
  shutil.rmtree(tmp_dir, ignore_errors=True)
  generators = {s: _examples(encoder, eval_batches(s)) for s in splits}
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
  return out_dir
