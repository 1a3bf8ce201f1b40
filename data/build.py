r"""Builds the TFRecord shards of a dataset (the Python entry point; no tfds CLI needed).

    python -m data.build --dataset=synthetic_av --manual_dir=/tmp/synthetic_av_raw \
        --data_dir=/tmp/tfds [--config=sr44100 | --sample_rate=16000] [--overwrite]
    python -m data.build --dataset=aff_wild2 --manual_dir=/path/to/Aff-Wild2 --data_dir=/tmp/tfds \
        [--num_workers=8 | --beam_pipeline_options=runner=DataflowRunner,...]
    python -m data.build --dataset=aff_wild2 --manual_dir=/path/to/my_videos --data_dir=/tmp/tfds \
        --crops=detect [--detector=mtcnn|haar] [--detect_every=5]

The shards land in <data_dir>/<dataset>/<config>/1.0.0/. For synthetic_av a
missing or empty manual directory is first filled by the generator (seed 0,
default size) unless --nogenerate_if_missing. --crops=detect first makes the face crops of a dataset
that ships raw videos only (annotations and raw_videos/), with predict.py's detector and alignment,
into <manual_dir>/cropped_aligned/ (iaca_jax/preprocessing/detect_crops.py).
--num_workers=N makes the windows in N worker processes (the same shards); --beam_pipeline_options
with Apache Beam (a cluster); `tfds build data/<dataset>` runs the same builders and takes the same
Beam options (docs/DATA.md). A complete version folder already there is left as it is (--overwrite
rebuilds it); user errors end the build with one `error: ...` line.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import shutil
import time

import tensorflow_datasets as tfds
from absl import app, flags, logging

from data.synthetic_av import generate
from iaca_jax import cli, faces, prepared
from iaca_jax.preprocessing import detect_crops, generation
from iaca_jax.preprocessing.errors import DataError

DATASETS = ('synthetic_av', 'aff_wild2')
CROPS = ('given', 'detect')


def builder_class(dataset: str):
  """The tfds builder class of `dataset` (importing registers it with tfds)."""
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')
  module = importlib.import_module(f'data.{dataset}.{dataset}_dataset_builder')
  return module.Builder


def make_builder(
  dataset: str,
  data_dir: str,
  *,
  config: str | None = None,
  sample_rate: int | None = None,
  min_valid_clips: int | None = None,
):
  """A builder of `dataset` writing TFRecords under `data_dir`.

  Args:
    dataset: 'synthetic_av' or 'aff_wild2'.
    data_dir: tfds data dir.
    config: a predefined config name ('sr44100' (default) or 'sr16000').
    sample_rate, min_valid_clips: build a custom config instead (named
      `sr<rate>` or `sr<rate>_keep<n>`).
  """
  cls = builder_class(dataset)
  configs = {c.name: c for c in cls.BUILDER_CONFIGS}
  if config is not None and config not in configs:
    raise ValueError(
      f'unknown config {config!r} of {dataset}; expected one of {", ".join(configs)} '
      '(or --sample_rate / --min_valid_clips for a custom one)'
    )
  base = configs[config or cls.BUILDER_CONFIGS[0].name]
  if sample_rate is None and min_valid_clips is None:
    cfg = base
  else:
    sr = sample_rate or base.sample_rate
    keep = base.min_valid_clips if min_valid_clips is None else min_valid_clips
    name = f'sr{sr}' + ('' if keep == base.min_valid_clips else f'_keep{keep}')
    cfg = configs.get(name) or dataclasses.replace(
      base, name=name, sample_rate=sr, min_valid_clips=keep, description=f'custom: {sr} Hz, keep {keep}'
    )
  return cls(data_dir=data_dir, config=cfg, file_format='tfrecord')


def build(
  dataset: str,
  manual_dir: str,
  data_dir: str,
  *,
  config: str | None = None,
  sample_rate: int | None = None,
  min_valid_clips: int | None = None,
  overwrite: bool = False,
  num_shards: int | None = None,
  crops: str = 'given',
  detector: str = faces.DEFAULT_DETECTOR,
  detect_every: int = faces.DEFAULT_DETECT_EVERY,
  beam_pipeline_options: str | None = None,
  num_workers: int = 1,
):
  """Prepares the dataset (no-op if already built, unless `overwrite`: `builder.reused` says which);
  returns the builder.

  `num_shards` fixes the number of TFRecord files per split (default: tfds picks by size).
  `crops='detect'` first writes the missing crop folders from the raw videos
  (`detect_crops.detect_crops` with `detector` on every `detect_every`-th frame).
  `num_workers` > 1 makes the windows in that many worker processes (the shards are those of the
  one-process build, byte for byte). `beam_pipeline_options` ('runner=DataflowRunner,...', as
  `tfds build` takes them) makes them in an Apache Beam pipeline instead (docs/DATA.md).

  Raises:
    iaca_jax.preprocessing.DataError on input that cannot be used, an incomplete dataset folder in
    the way (unless `overwrite`), or a build of the same version that finished first in another
    process; nothing complete-looking is left under `data_dir` then.
  """
  if num_workers < 1:
    raise ValueError(f'num_workers must be >= 1, got {num_workers}')
  if num_workers > 1 and beam_pipeline_options:
    raise ValueError('give num_workers or beam_pipeline_options, not both (Beam has its own workers)')
  if crops not in CROPS:
    raise ValueError(f'crops must be one of {CROPS}, got {crops!r}')
  builder = make_builder(
    dataset, data_dir, config=config, sample_rate=sample_rate, min_valid_clips=min_valid_clips
  )
  builder.reused = not overwrite and builder.data_path.exists()
  if builder.reused:
    problem = prepared.incomplete_reason(builder.data_path)
    if problem:
      raise DataError(
        f'{builder.data_dir} exists but holds no complete dataset ({problem}): build with --overwrite '
        'to replace it'
      )
    return builder
  check_manual_dir(manual_dir)
  mode = (
    tfds.download.GenerateMode.FORCE_REDOWNLOAD
    if overwrite
    else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  if crops == 'detect':
    stats = detect_crops.detect_crops(manual_dir, detector=detector, detect_every=detect_every)
    logging.info('%s crops: %s', dataset, stats.summary())
    builder.missing_crop_reasons = stats.skipped
  started = time.time()
  download_config = tfds.download.DownloadConfig(
    manual_dir=os.path.abspath(manual_dir),
    download_mode=mode,
    num_shards=num_shards,
    beam_options=beam_options(beam_pipeline_options),
  )
  builder.num_workers = num_workers
  try:
    builder.download_and_prepare(download_config=download_config)
  except DataError:
    raise
  except FileExistsError:  # tfds renames its finished build into place; another build got there first
    if not builder.data_path.exists():
      raise
    raise DataError(finished_elsewhere_message(builder)) from None
  except Exception as e:  # pylint: disable=broad-except  (Beam re-raises a worker's error wrapped)
    cause = worker_data_error(e)
    empty = re.search(r'generated examples is 0 for split (\w+)', str(e))
    if cause is None and empty:  # tfds's Beam writer stops a split without a window
      cause = generation.no_window_error(
        builder.generation_settings(empty.group(1), os.path.abspath(manual_dir))
      )
    if cause is None:
      raise
    raise cause from None
  remove_stale_partial_builds(builder.data_dir, older_than=started)
  for split, stats in getattr(builder, 'build_stats', {}).items():
    logging.info('%s %s: %s', dataset, split, stats.summary())
  return builder


def check_manual_dir(manual_dir: str) -> None:
  """DataError unless `manual_dir` is a folder with something in it (tfds would raise an
  AssertionError several lines long)."""
  if not os.path.isdir(manual_dir):
    raise DataError(f'manual directory {manual_dir} does not exist (docs/DATA.md: the raw layout)')
  if not os.listdir(manual_dir):
    raise DataError(f'manual directory {manual_dir} is empty (docs/DATA.md: the raw layout)')


def reused_message(builder) -> str:
  """What `python -m data.build` says when the version it would build is there and complete."""
  return (
    f'{prepared.describe(builder)} already exists and is complete: nothing to do '
    '(--overwrite rebuilds it from --manual_dir)'
  )


def finished_elsewhere_message(builder) -> str:
  """What to say when another process built the same version while this build ran."""
  problem = prepared.incomplete_reason(builder.data_path)
  state = (
    f'incomplete: {problem}'
    if problem
    else f'complete: {prepared.windows(prepared.open_builder(builder.data_path))}'
  )
  then = (
    'build again with --overwrite to replace it'
    if problem
    else 'nothing to do if both builds read the same raw files, else build again with --overwrite'
  )
  return (
    f'{builder.data_dir} was written by another build while this one ran ({state}); this build '
    f'was discarded: {then}'
  )


def beam_options(text: str | None):
  """Beam's PipelineOptions from `key=value,key=value` (the syntax of `tfds build
  --beam_pipeline_options`), or None."""
  if not text:
    return None
  beam = tfds.core.lazy_imports.apache_beam
  return beam.options.pipeline_options.PipelineOptions(
    [f'--{option}' for option in text.split(',') if option]
  )


def worker_data_error(error: BaseException) -> DataError | None:
  """The DataError a Beam worker raised, from the error the runner re-raised in this process (its
  text holds the worker's traceback); None when there was none."""
  match = re.search(r'DataError: (.+)', str(error))
  return DataError(match.group(1).strip()) if match else None


def remove_stale_partial_builds(version_dir: str, *, older_than: float) -> list[str]:
  """Deletes what interrupted builds left beside a finished version folder: tfds's
  `incomplete.<random>_<version>` folders last changed before `older_than` (a build running now in
  another process keeps its own). Returns the folders removed."""
  parent, version = os.path.split(os.path.normpath(str(version_dir)))
  removed = []
  for path in glob.glob(os.path.join(parent, f'incomplete.*_{version}')):
    if os.path.isdir(path) and os.path.getmtime(path) < older_than:
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
      logging.warning('removed %s, left by an interrupted build', path)
  return removed


def _define_flags():
  flags.DEFINE_enum('dataset', 'synthetic_av', DATASETS, 'Dataset to build.')
  flags.DEFINE_string('manual_dir', None, 'Raw data in the Aff-Wild2 layout.', required=True)
  flags.DEFINE_string(
    'data_dir', os.path.expanduser('~/tensorflow_datasets'), 'tfds data dir the shards are written under.'
  )
  flags.DEFINE_string('config', None, 'Builder config (sr44100 = default, sr16000).')
  flags.DEFINE_integer('sample_rate', None, 'Custom audio sample rate (builds config sr<rate>).')
  flags.DEFINE_integer('min_valid_clips', None, 'Custom keep rule for training windows.')
  flags.DEFINE_bool('overwrite', False, 'Rebuild even if the dataset exists.')
  flags.DEFINE_integer('num_shards', None, 'TFRecord files per split (default: from the split size).')
  flags.DEFINE_bool(
    'generate_if_missing', True, 'synthetic_av only: generate the raw set into an empty/missing manual_dir.'
  )
  flags.DEFINE_integer('synthetic_seed', 0, 'Seed when generating the synthetic set.')
  flags.DEFINE_enum(
    'crops', 'given', CROPS, "detect: make the missing face crops from raw_videos/ (predict.py's aligner)."
  )
  flags.DEFINE_enum('detector', faces.DEFAULT_DETECTOR, faces.DETECTORS, 'Face detector of --crops=detect.')
  flags.DEFINE_integer('detect_every', faces.DEFAULT_DETECT_EVERY, '--crops=detect: detector every N frames.')
  flags.DEFINE_integer('num_workers', 1, 'Worker processes that make the windows (e.g. the core count).')
  flags.DEFINE_string(
    'beam_pipeline_options',
    None,
    'Make the windows with Apache Beam, e.g. runner=DataflowRunner,project=P,... (docs/DATA.md).',
  )
  flags.DEFINE_enum('synthetic_size', 'default', ['default', 'tiny'], 'Size preset when generating.')


def main(argv):
  del argv
  f = flags.FLAGS
  start = time.time()
  builder = cli.run_reporting_user_errors(lambda: _build_from_flags(f))
  if builder.reused:
    print(reused_message(builder))
    return
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f'{f.dataset}: {splits} windows in {builder.data_dir} ({time.time() - start:.1f} s)')


def _build_from_flags(f):
  if (
    f.dataset == 'synthetic_av'
    and f.generate_if_missing
    and (not os.path.isdir(f.manual_dir) or not os.listdir(f.manual_dir))
    and (f.overwrite or not _built_already(f))
  ):
    logging.info('generating the synthetic set into %s', f.manual_dir)
    generate.generate(f.manual_dir, generate.SIZES[f.synthetic_size], f.synthetic_seed, overwrite=True)
  return build(
    f.dataset,
    f.manual_dir,
    f.data_dir,
    config=f.config,
    sample_rate=f.sample_rate,
    min_valid_clips=f.min_valid_clips,
    overwrite=f.overwrite,
    num_shards=f.num_shards,
    crops=f.crops,
    detector=f.detector,
    detect_every=f.detect_every,
    beam_pipeline_options=f.beam_pipeline_options,
    num_workers=f.num_workers,
  )


def _built_already(f) -> bool:
  builder = make_builder(
    f.dataset, f.data_dir, config=f.config, sample_rate=f.sample_rate, min_valid_clips=f.min_valid_clips
  )
  return builder.data_path.exists()


if __name__ == '__main__':
  _define_flags()
  app.run(main)
