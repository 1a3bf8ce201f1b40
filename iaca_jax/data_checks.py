"""Checks on what the input pipeline reads: a damaged shard named, non-finite values stopped."""

from __future__ import annotations

import tensorflow as tf

NON_FINITE = 'non-finite values in feature'


def checked_finite(name: str, value, example):
  """`value`, after an assertion that it holds no NaN or infinity (the error names the window)."""
  where = [f'{NON_FINITE} {name!r} of the window of']
  if 'video_name' in example:
    where.append(example['video_name'])
  if 'end_frame' in example:
    where += ['ending at frame', tf.reduce_max(example['end_frame'])]
  check = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(value)), where, summarize=4)
  with tf.control_dependencies([check]):
    return tf.identity(value)


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
