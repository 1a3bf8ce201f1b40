"""Checks on what the input pipeline reads: a damaged shard named, non-finite values stopped."""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from iaca_jax.preprocessing import windows

NON_FINITE = 'non-finite values in feature'
_NON_FINITE_FEATURE = re.compile(NON_FINITE + r" '(\w+)'")


def checked_finite(name: str, value):
  """`value`, after an assertion that it holds no NaN or infinity. The assertion names the feature
  only: a window may be read without its name and frames, so `non_finite_message` finds it."""
  check = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(value)), [f'{NON_FINITE} {name!r}'])
  with tf.control_dependencies([check]):
    return tf.identity(value)


def non_finite_feature(error_message: str) -> str | None:
  """The feature a failed `checked_finite` assertion names, or None for another error."""
  match = _NON_FINITE_FEATURE.search(error_message)
  return match.group(1) if match else None


def non_finite_message(builder, split: str, feature: str) -> str:
  """Names the windows of `split` whose `feature` holds NaN or infinity (read again, on error only,
  without the faces): how many, and the first one's video, frames, clip and shard file."""
  features = builder.info.features
  keys = [k for k in (feature, 'video_name', 'end_frame') if k in features]
  parse = tfds.decode.PartialDecoding(dict.fromkeys(keys, True)).extract_features(features)
  found, first = 0, None
  for path in builder.info.splits[split].filepaths:
    records = tf.data.TFRecordDataset(str(path)).map(parse.deserialize_example)
    for index, window in enumerate(tfds.as_numpy(records)):
      value = np.asarray(window[feature], np.float64)
      if np.isfinite(value).all():
        continue
      found += 1
      first = first or _window_place(window, value, index, str(path))
  where = f' in {found} window{"s" if found > 1 else ""}; the first: {first}' if found else ''
  return (
    f'{split} split of {builder.name}: {NON_FINITE} {feature!r} (NaN or infinity){where}. Rebuild the '
    'shards or the cached features from finite inputs.'
  )


def _window_place(window: dict, value: np.ndarray, index: int, path: str) -> str:
  """'video V, frames a-b (the clip ending at frame k), record i of shard P' (what the window holds)."""
  parts = []
  if window.get('video_name'):
    parts.append(f'video {window["video_name"].decode()}')
  ends = window.get('end_frame')
  if ends is not None and (ends > 0).any():
    first, last = windows.window_frames(ends)
    parts.append(f'frames {first}-{last}')
    if value.ndim and len(value) == len(ends):
      bad = np.flatnonzero(~np.isfinite(value.reshape(len(value), -1)).all(axis=1))
      parts[-1] += f' (the clip ending at frame {int(ends[bad[0]])})'
  parts.append(f'record {index} of shard {path}')
  return ', '.join(parts)


def damaged_shard_message(builder, split: str, reason: str) -> str:
  """Names the shard files of `split` that fail TFRecord's checks (read again, on error only)."""
  damaged = []
  for path in builder.info.splits[split].filepaths:
    try:
      for _ in tf.data.TFRecordDataset(str(path)):
        pass
    except tf.errors.DataLossError:
      damaged.append(str(path))
  where = ', '.join(damaged) if damaged else f'one of the {split} shards in {builder.data_dir}'
  return (
    f'damaged TFRecord shard in the {split} split of {builder.name}: {where} ({reason}). Rebuild the '
    'dataset (python -m data.build ... --overwrite) or restore the file.'
  )
