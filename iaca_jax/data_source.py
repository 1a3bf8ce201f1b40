"""Where a run's windows come from: the TFRecord shards (raw faces and log-mels) or the cached-feature
dataset, chosen by `config.dataset.features_dir`; the batches, shapes and silence of that source."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from iaca_jax import prepared
from iaca_jax.input_pipeline import (
  CACHED_TRAIN_KEYS,
  CLIPS,
  FACE_SIZE,
  FRAMES_PER_CLIP,
  MODEL_INPUT_KEYS,
  RAW_TRAIN_KEYS,
  SILENT_AUDIO_FILE,
  Batches,
  create_eval_dataset,
  create_train_dataset,
  get_builder,
  num_train_batches,
)
from iaca_jax.preprocessing import mel


def source_sample_rate(builder) -> int:
  """The audio sample rate a prepared dataset's log-mels were made at (44.1 kHz if unrecorded)."""
  metadata = builder.info.metadata or {}
  return int(metadata.get('sample_rate', mel.REFERENCE_SAMPLE_RATE))


class DataSource:
  """Where a run's windows come from: the shards themselves (raw faces and log-mels), or the
  cached-feature dataset (`config.dataset.features_dir`, written by `feature_cache`)."""

  def __init__(self, config: ml_collections.ConfigDict, share: tuple[int, int] | None = None):
    """`share`: (index, count), this process reads rows [index B/count, (index + 1) B/count) of every
    global batch of B and that share of each evaluation split (`Trainer.batch_share()`; default
    (process index, process count))."""
    self.config = config
    self.share = (jax.process_index(), jax.process_count()) if share is None else tuple(share)
    self.cached = config.dataset.features_dir is not None
    if self.cached:
      self.name, self.data_dir = os.path.abspath(config.dataset.features_dir), None
    else:
      self.name, self.data_dir = config.dataset.name, config.dataset.data_dir
    self.train_keys = CACHED_TRAIN_KEYS if self.cached else RAW_TRAIN_KEYS
    self._builder = None

  def open(self):
    """The prepared dataset's builder, opened once, on first use (after the entry point's own checks,
    before any batch): a missing or older version stops the run with one line, and the log says which
    version the run reads (a warning: the entry points show warnings only)."""
    if self._builder is None:
      self._builder = get_builder(self.name, self.data_dir)
      kind = 'cached features: ' if self.cached else ''
      logging.warning('reading %s%s', kind, prepared.describe(self._builder))
    return self._builder

  def silent_audio(self) -> dict[str, np.ndarray]:
    """The model input of a silent clip: {'audio': (64, frames)} or {'audio_features': (C,)}."""
    if self.cached:
      with np.load(os.path.join(self.name, SILENT_AUDIO_FILE)) as f:
        return {'audio_features': f['audio_features']}
    return {'audio': mel.silent_log_mel(source_sample_rate(self.open()))}

  def train_batches(self, *, epoch: int, start_batch: int = 0) -> Batches:
    """One epoch of training batches from `start_batch` on; faces jittered (raw inputs only)."""
    config = self.config
    self.open()
    return create_train_dataset(
      self.name,
      self.data_dir,
      global_batch_size=config.dataset.batch_size,
      seed=config.seed,
      epoch=epoch,
      start_batch=start_batch,
      split=config.dataset.train_split,
      features=self.train_keys,
      jitter=None if self.cached else tuple(config.dataset.jitter),
      shuffle_buffer=config.dataset.shuffle_buffer,
      process_index=self.share[0],
      process_count=self.share[1],
    )

  def eval_batches(self, split: str) -> Batches:
    """This process's share of every window of `split` (the same number of batches on every
    process, padded with invalid windows)."""
    self.open()
    return create_eval_dataset(
      self.name,
      self.data_dir,
      global_batch_size=self.config.dataset.batch_size,
      split=split,
      process_index=self.share[0],
      process_count=self.share[1],
    )

  def steps_per_epoch(self) -> int:
    self.open()
    return num_train_batches(
      self.name,
      self.data_dir,
      global_batch_size=self.config.dataset.batch_size,
      split=self.config.dataset.train_split,
      process_count=self.share[1],
    )

  def input_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the model inputs of a training batch, from the pipeline's element spec (nothing is
    read or decoded): e.g. {'video_features': (B, 16, 7, 7, 512), 'audio_features': (B, 16, 512)}."""
    spec = self.train_batches(epoch=0).element_spec
    return {
      k: jax.ShapeDtypeStruct(tuple(spec[k].shape), spec[k].dtype.as_numpy_dtype)
      for k in MODEL_INPUT_KEYS
      if k in spec
    }


def nominal_input_shapes(config: ml_collections.ConfigDict, model: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The model inputs of a global training batch of `config` as the pipeline delivers them, from the
  config alone (no data read; what `DataSource.input_shapes()` reads from a prepared dataset, with the
  global batch): raw faces (B, 16, 8, 112, 112, 3) and log-mels (B, 16, 64, 104), or with
  `dataset.features_dir` the features `model`'s encoders give for them, e.g. (B, 16, 7, 7, 512) and
  (B, 16, 512). Everything float32, as the pipeline casts."""
  batch = config.dataset.batch_size
  raw = {
    'video': jax.ShapeDtypeStruct((batch, CLIPS, FRAMES_PER_CLIP, FACE_SIZE, FACE_SIZE, 3), np.float32),
    'audio': jax.ShapeDtypeStruct((batch, CLIPS) + mel.silent_log_mel().shape, np.float32),
  }
  if config.dataset.features_dir is None:
    return raw
  one = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in raw.items()}
  video, audio = jax.eval_shape(
    lambda r, x: model.init_with_output(r, x, method=type(model).encode)[0], jax.random.key(0), one
  )
  return {
    'video_features': jax.ShapeDtypeStruct((batch,) + video.shape[1:], np.float32),
    'audio_features': jax.ShapeDtypeStruct((batch,) + audio.shape[1:], np.float32),
  }
