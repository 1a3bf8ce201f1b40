"""The feature cache holds every window of every split, with its labels; float16 storage."""

import numpy as np
from tensorflow_datasets.core import example_parser, example_serializer

from iaca_jax import feature_cache, input_pipeline


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


def test_float16_storage_halves_the_bytes_and_reads_back_the_rounded_features(tiny):
  source = input_pipeline.get_builder('synthetic_av', tiny.data_dir)
  rng = np.random.default_rng(0)
  video, audio = rng.normal(size=(16, 7, 7, 64)), rng.normal(size=(16, 64))
  window = next(
    iter(
      input_pipeline.create_eval_dataset(
        'synthetic_av',
        tiny.data_dir,
        global_batch_size=1,
        split='test',
        process_index=0,
        process_count=1,
        features=list(feature_cache.PASSTHROUGH),
      )
    )
  )
  example = {name: window[name][0] for name in feature_cache.PASSTHROUGH}
  sizes = {}
  for dtype in (np.float32, np.float16):
    spec = feature_cache._feature_spec(video, audio, source, dtype)
    info = spec.get_serialized_info()
    encoded = spec.encode_example(
      dict(example, video_features=video.astype(dtype), audio_features=audio.astype(dtype))
    )
    serialized = example_serializer.ExampleSerializer(info).serialize_example(encoded)
    sizes[dtype] = len(serialized)
    decoded = spec.decode_example_np(example_parser.ExampleParserNp(info).parse_example(serialized))
    np.testing.assert_array_equal(decoded['video_features'], video.astype(dtype))
    np.testing.assert_array_equal(decoded['audio_features'], audio.astype(dtype))
  assert sizes[np.float16] < 0.55 * sizes[np.float32], sizes
