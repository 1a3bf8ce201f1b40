"""tf.data input pipeline over the TFRecord shards written by the tfds builders in data/.

Each process reads its own contiguous slice of a split, decodes the face
JPEGs, normalises them with the Kinetics mean/std (docs/DESIGN.md §2) and, in training,
applies per-clip brightness and contrast jitter. Batches are numpy dicts of
the process's share of the global batch (per-host batch B):

    video          float32 (B, 16, 8, 112, 112, 3)  normalised faces
    audio          float32 (B, 16, 64, 104)         log-mel, time last
    labels         float32 (B, 16, 2)               [valence, arousal], 0 where invalid
    mask           bool    (B, 16)                  clip valid for the loss
    frame_labels   float32 (B, 16, 2)               labels of each clip's end frame
    frame_mask     bool    (B, 16)                  end frame real and validly labelled
    end_frame      int32   (B, 16)                  1-based end frame, 0 for padding clips
    video_name     object  (B,)                     bytes; host only, never send to a device
    corrupt_video  bool    (B, 16)                  synthetic set only (False for Aff-Wild2)
    corrupt_audio  bool    (B, 16)
    valid_window   bool    (B,)                     False for eval padding windows

Any other feature a dataset holds (e.g. precomputed encoder features) is
passed through, floating types cast to float32; `features=` selects a subset.

Training order is a pure function of (seed, epoch): the shuffles are seeded
with a seed derived from both and never reshuffle, the jitter uses stateless
random numbers keyed by the example's position in the epoch, so a run resumed
with `start_batch=k` sees exactly the batches k, k+1, ... of an uninterrupted
run. The global training batches do not depend on the number of processes:
every process reads the same shuffled stream of the whole split (floor(N / B)
global batches of B, the rest dropped) and decodes only its rows of each
batch (process p: rows [p B/P, (p+1) B/P)), so P processes train exactly as one
does. Evaluation reads a contiguous share of the split per process, padded
with invalid windows to the same number of batches on every process, and
visits every window exactly once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from iaca_jax import prepared
from iaca_jax.data_checks import checked_finite, damaged_shard_message, non_finite_feature, non_finite_message
from iaca_jax.preprocessing.errors import DataError

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
JITTER_RANGE = (0.8, 1.2)
CLIPS = 16
FRAMES_PER_CLIP = 8
FACE_SIZE = 112
DEFAULT_SHUFFLE_BUFFER = 256

# The batch keys (one home for every module that selects from a batch).
MODEL_INPUT_KEYS = ('video', 'audio', 'video_features', 'audio_features')
DEVICE_KEYS = MODEL_INPUT_KEYS + ('labels', 'mask')  # numeric keys that go to the devices
RAW_TRAIN_KEYS = ('video', 'audio', 'labels', 'mask')
CACHED_TRAIN_KEYS = ('video_features', 'audio_features', 'labels', 'mask')
CLIP_KEYS = ('end_frame', 'frame_labels', 'frame_mask', 'corrupt_video', 'corrupt_audio')
SILENT_AUDIO_FILE = 'silent_audio.npz'  # in a cached-feature dataset: the inputs of silence


def _hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow (used only for tf.data) off every accelerator: JAX owns them."""
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass


_hide_accelerators_from_tf()


def get_builder(dataset: str, data_dir: str | None = None):
  """The tfds builder of a prepared dataset; no builder code is needed.

  Args:
    dataset: 'synthetic_av', 'synthetic_av/sr16000', 'aff_wild2:1.0.0', ... (tfds names; the
      default config, and the version this code reads unless one is named), or the path of a
      prepared version folder (the one holding dataset_info.json).
    data_dir: tfds data dir holding the dataset (ignored for a path).

  Raises:
    DataError naming what the data dir holds instead, and how to build what is missing.
  """
  if prepared.is_path(dataset):
    return prepared.open_builder(os.path.expanduser(dataset))
  return prepared.open_builder(prepared.version_dir(dataset, data_dir))


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size {global_batch_size} must be a positive multiple of the '
      f'process count {process_count}'
    )
  return global_batch_size // process_count


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle/jitter seed of one epoch: a pure function of (seed, epoch)."""
  return int(np.random.SeedSequence([seed, epoch, 0x1ACA]).generate_state(1)[0] & 0x7FFFFFFF)


def eval_slice(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of a process's evaluation windows: together they cover all N once."""
  return (num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count)


class Batches:
  """An iterable of numpy batch dicts; each iteration replays the same batches.

  Attributes:
    num_batches: batches per iteration (the same on every process).
    num_windows: real windows in them on this process.
    first_window: split position of the first of them (evaluation: its contiguous share).
    batch_size: per-process batch size.
    element_spec: the tf.data element spec of a batch.
  """

  def __init__(
    self,
    make_dataset: Callable[[], Any],
    num_batches: int,
    num_windows: int,
    batch_size: int,
    source: tuple[Any, str] | None = None,
    first_window: int = 0,
  ):
    self._make_dataset = make_dataset
    self.num_batches = num_batches
    self.num_windows = num_windows
    self.batch_size = batch_size
    self._source = source  # (builder, split): to name a damaged shard
    self.first_window = first_window

  def __len__(self) -> int:
    return self.num_batches

  @property
  def element_spec(self):
    return self._make_dataset().element_spec

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    try:
      yield from tfds.as_numpy(self._make_dataset())
    except tf.errors.DataLossError as e:
      if self._source is None:
        raise
      builder, split = self._source
      raise DataError(damaged_shard_message(builder, split, e.message)) from None
    except tf.errors.InvalidArgumentError as e:
      feature = non_finite_feature(e.message.replace("\\'", "'"))
      if feature is None or self._source is None:
        raise
      raise DataError(non_finite_message(*self._source, feature)) from None


def _decoders(builder, features: Sequence[str] | None):
  names = list(builder.info.features.keys())
  if features is None:
    features = names
  missing = sorted(set(features) - set(names))
  if missing:
    raise ValueError(f'{builder.name} has no feature {missing}; it has {names}')
  skip = {'video': tfds.decode.SkipDecoding()} if 'video' in features else None
  if set(features) == set(names):
    return skip
  return tfds.decode.PartialDecoding({k: True for k in features}, decoders=skip)


def _read(builder, split: str, start: int, end: int, *, shuffle_seed: int | None, decoders):
  """Windows [start, end) of a split; without a shuffle seed in file order (shards one after the
  other, not interleaved), so that the slices of the processes put together are the whole split."""
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(
    shuffle_seed=shuffle_seed,
    shuffle_reshuffle_each_iteration=False,
    options=options,
    try_autocache=False,
    **({} if shuffle_seed is not None else {'interleave_cycle_length': 1}),
  )
  return builder.as_dataset(
    split=f'{split}[{start}:{end}]',
    shuffle_files=shuffle_seed is not None,
    read_config=read_config,
    decoders=decoders,
  )


def _decode_video(jpegs):
  """(128,) JPEG strings -> float32 (16, 8, 112, 112, 3) in [0, 1]."""
  frames = tf.map_fn(
    lambda b: tf.io.decode_jpeg(b, channels=3, dct_method='INTEGER_ACCURATE'),
    jpegs,
    fn_output_signature=tf.TensorSpec((FACE_SIZE, FACE_SIZE, 3), tf.uint8),
    parallel_iterations=16,
  )
  frames = tf.reshape(frames, (CLIPS, FRAMES_PER_CLIP, FACE_SIZE, FACE_SIZE, 3))
  return tf.cast(frames, tf.float32) * (1.0 / 255.0)


def jitter_clips(video, seed, jitter_range: Sequence[float] = JITTER_RANGE):
  """Per-clip brightness then contrast factors in `jitter_range` (stateless, keyed by `seed`).

  One brightness and one contrast factor per clip, applied to its 8 frames as
  torchvision does to an image: brightness scales the pixels, contrast blends
  each frame with its own mean grey level (so an all-zero "no face" frame stays
  zero). Input and output in [0, 1], shape (16, 8, H, W, 3).
  """
  lo, hi = jitter_range
  f = tf.random.stateless_uniform((CLIPS, 2), seed=seed, minval=lo, maxval=hi)
  b = tf.reshape(f[:, 0], (CLIPS, 1, 1, 1, 1))
  c = tf.reshape(f[:, 1], (CLIPS, 1, 1, 1, 1))
  video = tf.minimum(video * b, 1.0)  # inputs are >= 0
  # Mean grey level of each frame (grey is linear in RGB: average the channels first).
  channel_mean = tf.reduce_mean(video, axis=[2, 3])  # (16, 8, 3)
  grey = tf.linalg.matvec(channel_mean, tf.constant([0.299, 0.587, 0.114]))  # (16, 8)
  mean = tf.reshape(grey, (CLIPS, -1, 1, 1, 1))
  return tf.clip_by_value(video * c + mean * (1.0 - c), 0.0, 1.0)  # (x - m) c + m


def _normalise(video):
  """(x - Kinetics mean) / std, with per-pixel constants (much faster than a (3,) broadcast)."""
  scale = tf.constant(np.tile(1.0 / np.asarray(KINETICS_STD, np.float32), (FACE_SIZE, FACE_SIZE, 1)))
  offset = tf.constant(
    np.tile(
      -np.asarray(KINETICS_MEAN, np.float32) / np.asarray(KINETICS_STD, np.float32), (FACE_SIZE, FACE_SIZE, 1)
    )
  )
  return video * scale + offset


def _prepare(example, *, jitter_seed=None, jitter_range: Sequence[float] | None = None):
  """One decoded window: faces decoded, jittered (given a seed and a range) and normalised."""
  out = {}
  for name, value in example.items():
    if name == 'video':
      video = _decode_video(value)
      if jitter_seed is not None and jitter_range:
        video = jitter_clips(video, jitter_seed, jitter_range)
      value = _normalise(video)
    elif value.dtype.is_floating:
      value = checked_finite(name, tf.cast(value, tf.float32))
    out[name] = value
  out['valid_window'] = tf.constant(True)
  return out


def num_train_batches(
  dataset: str,
  data_dir: str | None = None,
  *,
  global_batch_size: int,
  split: str = 'train',
  process_count: int | None = None,
) -> int:
  """Training batches per epoch (the same on every process)."""
  if process_count is None:
    process_count = jax.process_count()
  _local_batch(global_batch_size, process_count)
  return get_builder(dataset, data_dir).info.splits[split].num_examples // global_batch_size


def create_train_dataset(
  dataset: str,
  data_dir: str | None = None,
  *,
  global_batch_size: int,
  seed: int,
  epoch: int = 0,
  start_batch: int = 0,
  split: str = 'train',
  features: Sequence[str] | None = None,
  jitter: Sequence[float] | None = JITTER_RANGE,
  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
  process_index: int | None = None,
  process_count: int | None = None,
  prefetch: int = 2,
) -> Batches:
  """One epoch of shuffled training batches: this process's rows of each global batch.

  Args:
    dataset, data_dir: see `get_builder`.
    global_batch_size: summed over processes; must divide by the process count.
    seed, epoch: the batch order and the jitter are a pure function of both (and not of the
      process count: each process gets its rows of the same global batches).
    start_batch: skip the first `start_batch` batches of the epoch (to resume);
      skipped windows are read but not decoded.
    split: a split of the dataset.
    features: features to load (default all); e.g. leave out 'video' when a
      model uses precomputed features.
    jitter: (low, high) range of the per-clip brightness and contrast factors of the faces;
      None or () for none.
    shuffle_buffer: windows in the shuffle buffer (before JPEG decoding).
    process_index, process_count: default jax.process_index()/process_count().
    prefetch: batches prepared ahead.

  Returns:
    Batches (len = batches per epoch, minus start_batch).
  """
  pi, pc = _process(process_index, process_count)
  local = _local_batch(global_batch_size, pc)
  builder = get_builder(dataset, data_dir)
  n = builder.info.splits[split].num_examples
  num_batches = n // global_batch_size
  if num_batches == 0:
    raise ValueError(f'{split} of {builder.name} has {n} windows: not one batch of {global_batch_size}')
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f'start_batch {start_batch} not in [0, {num_batches}]')
  decoders = _decoders(builder, features)
  es = epoch_seed(seed, epoch)

  def make():
    ds = _read(builder, split, 0, n, shuffle_seed=es, decoders=decoders)
    ds = ds.shuffle(min(shuffle_buffer, n), seed=es, reshuffle_each_iteration=False)
    ds = ds.take(num_batches * global_batch_size).enumerate().skip(start_batch * global_batch_size)
    if pc > 1:  # this process's rows of each global batch, before any decoding
      ds = ds.filter(lambda i, ex: (i % global_batch_size) // local == pi)
    ds = ds.map(
      lambda i, ex: _prepare(ex, jitter_seed=tf.stack([tf.constant(es, tf.int64), i]), jitter_range=jitter),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    ds = ds.batch(local, drop_remainder=True)
    return ds.prefetch(prefetch)

  left = num_batches - start_batch
  return Batches(make, left, left * local, local, source=(builder, split))


def create_eval_dataset(
  dataset: str,
  data_dir: str | None = None,
  *,
  global_batch_size: int,
  split: str = 'validation',
  features: Sequence[str] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  prefetch: int = 2,
) -> Batches:
  """Every window of a split exactly once, in file order, for this process.

  The process's slice is padded with invalid windows (all zeros, masks False,
  valid_window False, video_name b'') to a whole number of batches, the same
  number on every process.
  """
  pi, pc = _process(process_index, process_count)
  local = _local_batch(global_batch_size, pc)
  builder = get_builder(dataset, data_dir)
  n = builder.info.splits[split].num_examples
  start, end = eval_slice(n, pi, pc)
  num_batches = math.ceil(math.ceil(n / pc) / local)
  decoders = _decoders(builder, features)

  def make():
    # The real windows (an empty slice still gives the element structure).
    if end > start:
      ds = _read(builder, split, start, end, shuffle_seed=None, decoders=decoders)
    else:
      ds = _read(builder, split, 0, 1, shuffle_seed=None, decoders=decoders).take(0)
    ds = ds.map(_prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = dict(tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec))
    pad['valid_window'] = tf.constant(False)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(num_batches * local - (end - start)))
    ds = ds.batch(local, drop_remainder=True)
    return ds.prefetch(prefetch)

  return Batches(make, num_batches, end - start, local, source=(builder, split), first_window=start)


_prepare_compiled = tf.function(_prepare)


def prepare_eval_window(example: dict[str, Any]) -> dict[str, np.ndarray]:
  """One window as the builders write it (128 face JPEGs, log-mels, clip keys; `video_name` is left
  out) -> the row `create_eval_dataset` makes of it: faces decoded and normalised, `valid_window`."""
  tensors = {k: tf.constant(v) for k, v in example.items() if k != 'video_name'}
  return {k: v.numpy() for k, v in _prepare_compiled(tensors).items()}
