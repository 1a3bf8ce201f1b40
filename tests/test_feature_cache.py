"""The feature cache holds every window of every split, with its labels."""

import numpy as np

from iaca_jax import input_pipeline


def test_feature_cache_holds_every_window_with_its_labels(tiny, cached):
  source = input_pipeline.get_builder('synthetic_av', tiny.data_dir)
  features = input_pipeline.get_builder(cached.dataset.features_dir)
  for split in ('train', 'validation', 'test'):
    assert features.info.splits[split].num_examples == source.info.splits[split].num_examples

  def windows(name, data_dir=None, keys=('labels', 'end_frame', 'video_name')):
    out = {}
    for batch in input_pipeline.create_eval_dataset(
      name, data_dir, global_batch_size=4, split='validation', process_index=0, process_count=1
    ):
      for i in np.flatnonzero(batch['valid_window']):  # tfds shuffles on write: match windows by key
        out[(batch['video_name'][i], int(batch['end_frame'][i].max()))] = {k: batch[k][i] for k in batch}
    return out

  src = windows('synthetic_av', tiny.data_dir)
  out = windows(cached.dataset.features_dir)
  assert src.keys() == out.keys()
  for key, window in src.items():
    for name in (
      'labels',
      'mask',
      'end_frame',
      'frame_labels',
      'frame_mask',
      'corrupt_video',
      'corrupt_audio',
    ):
      np.testing.assert_array_equal(window[name], out[key][name])
  assert out[key]['video_features'].shape == (16, 2, 2, 32) and out[key]['audio_features'].shape == (16, 32)
