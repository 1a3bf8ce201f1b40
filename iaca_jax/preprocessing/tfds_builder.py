"""The tfds builder shared by `data/aff_wild2` and `data/synthetic_av`.

Both read the Aff-Wild2 layout (see `layout.py`) from the manual directory and
write one example per 16-clip window (`examples.py`) as TFRecord shards. The
builders in `data/` only name the dataset and say whether a corruption sidecar
is expected.

Everything that must stop the build (malformed annotation files, a missing
validation/test crop folder, an annotation length that disagrees with the
video) is checked in `_split_generators`, before any example is written; tfds
writes into a temporary folder that is renamed only when every split is done,
so a failed build never leaves a complete-looking dataset folder.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from iaca_jax.preprocessing import (
  annotations,
  corruptions,
  examples,
  generation,
  layout,
  serialization,
  windows,
)
from iaca_jax.preprocessing import audio as audio_lib
from iaca_jax.preprocessing import mel as mel_lib
from iaca_jax.preprocessing.errors import DataError

DEFAULT_FPS = 30.0
CROP_NAMES = f'<frame number>{"|".join(layout.CROP_EXTENSIONS)}'  # for messages


@dataclasses.dataclass(eq=False)
class AvConfig(tfds.core.BuilderConfig):
  """Builder settings.

  Attributes:
    sample_rate: audio rate of the log-mels (44.1 kHz in the paper).
    min_valid_clips: keep rule for training windows.
    frame_count_tolerance: how many frames the annotation file of a video may
      differ from its raw video's frame count before the build stops.
  """

  sample_rate: int = mel_lib.REFERENCE_SAMPLE_RATE
  min_valid_clips: int = examples.DEFAULT_MIN_VALID_CLIPS
  frame_count_tolerance: int = 0


def make_configs(frame_count_tolerance: int) -> list[AvConfig]:
  return [
    AvConfig(
      name='sr44100',
      sample_rate=44_100,
      frame_count_tolerance=frame_count_tolerance,
      description='log-mels at 44.1 kHz (the paper)',
    ),
    AvConfig(
      name='sr16000',
      sample_rate=16_000,
      frame_count_tolerance=frame_count_tolerance,
      description='log-mels at 16 kHz (window/hop/clip keep their durations)',
    ),
  ]


def features_dict(mel: mel_lib.MelSettings) -> tfds.features.FeaturesDict:
  L = windows.CLIPS_PER_WINDOW
  f = tfds.features
  return f.FeaturesDict(
    {
      # 16 clips x 8 frames stored flat (nested video features do not read back in tfds 4.9.10).
      'video': f.Video(
        shape=(examples.FRAMES_PER_WINDOW, examples.FACE_SIZE, examples.FACE_SIZE, 3), encoding_format='jpeg'
      ),
      'audio': f.Tensor(shape=(L,) + mel.shape, dtype=np.float32),
      'labels': f.Tensor(shape=(L, 2), dtype=np.float32),
      'mask': f.Tensor(shape=(L,), dtype=np.bool_),
      'frame_labels': f.Tensor(shape=(L, 2), dtype=np.float32),
      'frame_mask': f.Tensor(shape=(L,), dtype=np.bool_),
      'end_frame': f.Tensor(shape=(L,), dtype=np.int32),
      'video_name': f.Text(),
      'corrupt_video': f.Tensor(shape=(L,), dtype=np.bool_),
      'corrupt_audio': f.Tensor(shape=(L,), dtype=np.bool_),
    }
  )


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """`tfds.core.DatasetInfo` of a dataset built here, never published on TFDS's bucket.

  A builder whose data directory holds no dataset yet looks for the dataset's metadata on the bucket
  (`initialize_from_bucket`). tensorflow-datasets 4.9 makes a temporary directory for it first and
  never deletes it, even with the bucket disabled: one empty /tmp/tmp*tfds per builder made. There
  is nothing to find for these datasets, so the lookup is skipped.
  """

  def initialize_from_bucket(self) -> None:
    return None


def local_dataset_info(builder: tfds.core.DatasetBuilder, **kwargs) -> LocalDatasetInfo:
  """`builder.dataset_info_from_configs(**kwargs)` as a `LocalDatasetInfo`: the description and
  citation come from the builder's README.md and CITATIONS.bib when it has them, as in tfds."""
  metadata = builder.get_metadata()
  if metadata.description:
    kwargs['description'] = metadata.description
  if metadata.citation:
    kwargs['citation'] = metadata.citation
  return LocalDatasetInfo(builder=builder, **kwargs)


class AvLayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: Aff-Wild2 layout in the manual dir -> windows as TFRecord shards."""

  VERSION = tfds.core.Version(examples.DATASET_VERSION)
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  HAS_CORRUPTIONS = False  # read `corruptions.json` and flag corrupted clips
  HOMEPAGE = ''

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.build_stats: dict[str, examples.BuildStats] = {}
    self.num_workers = 1  # worker processes of the generator path (`data.build --num_workers`)
    self.missing_crop_reasons: dict[str, str] = {}  # video -> why it has no crop folder (--crops=detect)
    self.reused = False  # `data.build.build` found this version complete and left it as it was

  @property
  def mel_settings(self) -> mel_lib.MelSettings:
    return mel_lib.mel_settings(self.builder_config.sample_rate)

  def _info(self) -> tfds.core.DatasetInfo:
    return local_dataset_info(
      self,
      features=features_dict(self.mel_settings),
      supervised_keys=None,
      homepage=self.HOMEPAGE or None,
      metadata=tfds.core.MetadataDict(
        sample_rate=self.builder_config.sample_rate,
        clips_per_window=windows.CLIPS_PER_WINDOW,
        frames_per_clip=windows.FRAMES_PER_CLIP,
        frames_per_sample=windows.FRAMES_PER_SAMPLE,
        min_valid_clips=self.builder_config.min_valid_clips,
      ),
    )

  # --------------------------------------------------------------- planning
  def _generate_splits(self, dl_manager, download_config):
    # [decision] Beam only when asked for (a runner or pipeline options, as `tfds build
    # --beam_pipeline_options=...` or `data.build --beam_pipeline_options=...` give): tfds runs a
    # Beam pipeline in-process otherwise too, slower than the plain generator on one core. tfds passes
    # the download config to no public hook; this private one is stable in the pinned 4.9.10.
    self._beam = download_config.beam_runner is not None or download_config.beam_options is not None
    with contextlib.ExitStack() as stack:
      stack.enter_context(serialization.packed_floats())  # tfds's serialization, faster
      if self.num_workers > 1 and not self._beam:  # one pool for every split: workers start once
        self._pool = stack.enter_context(generation.worker_pool(self.num_workers))
      split_infos = super()._generate_splits(dl_manager, download_config)
    if self._beam:
      check_beam_output(split_infos, self.build_stats)
    return split_infos

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    plans = plan_splits(
      root, self.builder_config, self.HAS_CORRUPTIONS, self.build_stats, self.missing_crop_reasons
    )
    settings = {split: self.generation_settings(split, root) for split in plans}
    if getattr(self, '_beam', False):
      return {split: beam_examples(plan, settings[split]) for split, plan in plans.items()}
    return {split: self._generate_examples(plan, settings[split]) for split, plan in plans.items()}

  # ------------------------------------------------------------- generation
  def generation_settings(self, split: str, root: str) -> generation.GenerationSettings:
    return generation.GenerationSettings(
      split=split,
      root=root,
      mel=self.mel_settings,
      min_valid_clips=self.builder_config.min_valid_clips,
      has_corruptions=self.HAS_CORRUPTIONS,
    )

  def _generate_examples(self, plan: list[generation.VideoPlan], settings: generation.GenerationSettings):
    """The examples of one split (tfds's generator path): made in this process, or by
    `self.num_workers` worker processes a raw file at a time, yielded in the plan's order."""
    stats = self.build_stats.setdefault(settings.split, examples.BuildStats())
    groups = generation.raw_file_groups(plan)
    bar = tqdm.tqdm(total=len(plan), desc=f'{self.name} {settings.split}', unit='video')
    if self.num_workers > 1:
      for made, counts, messages in generation.ordered_map(
        functools.partial(generation.made_in_worker, settings=settings),
        groups,
        self._pool,
        2 * self.num_workers,
      ):
        stats.counts.update(counts)
        stats.messages.extend(messages)
        bar.update(len(made))
        yield from made
    else:
      side = settings.corruptions()
      for videos in groups:
        yield from generation.group_examples(videos, settings, side, stats)
        bar.update(len(videos))
    bar.close()
    logging.info('%s %s: %s', self.name, settings.split, stats.summary())
    generation.check_windows_kept(stats, len(plan), settings)

  def _process_pipeline_result(self, pipeline_result) -> None:
    """After a Beam build: the workers' counters into `build_stats`. (A split without a window
    stops tfds's writer first: `data.build` names it as the generator path does.)"""
    for split, counts in beam_counts(pipeline_result).items():
      stats = self.build_stats.setdefault(split, examples.BuildStats())
      stats.counts.update(counts)
      logging.info('%s %s: %s', self.name, split, stats.summary())


# ------------------------------------------------------------------- Beam
BEAM_NAMESPACE = 'iaca_build'  # of the Beam counters that carry BuildStats' counts


class BeamStats(examples.BuildStats):
  """BuildStats on a Beam worker: every count is also a Beam counter (`<split>/<kind>`), which the
  runner sums over workers; warnings go to the worker's log."""

  def __init__(self, split: str):
    super().__init__()
    self.split = split

  def _counter(self, kind: str, n: int) -> None:
    beam = tfds.core.lazy_imports.apache_beam
    beam.metrics.Metrics.counter(BEAM_NAMESPACE, f'{self.split}/{kind}').inc(n)

  def warn(self, kind: str, message: str, n: int = 1):
    super().warn(kind, message, n)
    self._counter(kind, n)

  def count(self, kind: str, n: int = 1):
    super().count(kind, n)
    self._counter(kind, n)


def raw_file_examples(videos: list[generation.VideoPlan], settings: generation.GenerationSettings):
  """One `generation.raw_file_groups` group -> its examples, on a Beam worker."""
  yield from generation.group_examples(
    videos, settings, generation.corruptions_once(settings), BeamStats(settings.split)
  )


def beam_examples(plan: list[generation.VideoPlan], settings: generation.GenerationSettings):
  """The examples of one split as a Beam PTransform: the planned videos' raw-file groups (made while
  planning), each group's windows made on a worker."""
  beam = tfds.core.lazy_imports.apache_beam
  return beam.Create(generation.raw_file_groups(plan)) | 'windows' >> beam.FlatMap(
    raw_file_examples, settings
  )


def check_beam_output(split_infos, build_stats: dict[str, examples.BuildStats]) -> None:
  """DataError unless every split holds as many examples as its workers made (committed counters):
  tfds renames the dataset into place only after this, so a runner that lost examples leaves no
  complete-looking dataset."""
  for info in split_infos:
    made = build_stats.get(info.name, examples.BuildStats()).counts['windows']
    if info.num_examples != made:
      raise DataError(
        f'the Beam runner wrote {info.num_examples} examples of split {info.name} but its workers made '
        f'{made}: nothing was kept; build again, or with --num_workers instead of Beam (docs/DATA.md)'
      )


def beam_counts(pipeline_result) -> dict[str, collections.Counter]:
  """{split: counts} summed by the runner from the workers' BeamStats counters."""
  beam = tfds.core.lazy_imports.apache_beam
  query = pipeline_result.metrics().query(beam.metrics.MetricsFilter().with_namespace(BEAM_NAMESPACE))
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for counter in query['counters']:
    split, kind = counter.key.metric.name.split('/', 1)
    value = counter.committed if counter.committed is not None else counter.attempted
    counts[split][kind] += int(value)
  return counts


def plan_splits(
  root: str,
  config: AvConfig,
  has_corruptions: bool,
  build_stats: dict | None = None,
  missing_crop_reasons: dict[str, str] | None = None,
) -> dict[str, list[generation.VideoPlan]]:
  """Lists and checks the videos of every split; raises DataError on what cannot be skipped.

  Skipped (logged once, with the reason, and counted): a training video without a crop folder
  (`missing_crop_reasons` says why a folder is missing, when known) or without a face crop.
  Fatal (DataError): a malformed annotation file, an annotation length that
  differs from the raw video's frame count by more than the tolerance, a
  validation or test video without a crop folder, a test video of unknown
  length, a missing corruption sidecar when one is expected.
  """
  build_stats = build_stats if build_stats is not None else {}
  if not os.path.isdir(root):
    raise DataError(f'manual directory {root} does not exist')
  if not os.path.isdir(os.path.join(root, layout.CROPS_DIR)):
    raise DataError(f'missing crop folder {os.path.join(root, layout.CROPS_DIR)}')
  if has_corruptions:
    side_path = os.path.join(root, corruptions.FILENAME)
    if not os.path.isfile(side_path):
      raise DataError(f'missing corruption sidecar {side_path}')
    side = corruptions.read_corruptions(side_path)
  raw_index = layout.index_raw_videos(root)
  plans: dict[str, list[generation.VideoPlan]] = {}
  listed: dict[str, list[str]] = collections.defaultdict(list)  # video -> the splits that list it
  for split in ('train', 'validation'):
    stats = build_stats.setdefault(split, examples.BuildStats())
    plans[split] = []
    files = layout.split_annotation_files(root, split)
    for name, path in tqdm.tqdm(sorted(files.items()), desc=f'checking {split}', unit='video'):
      listed[name].append(split)
      labels = annotations.read_annotation(path)  # raises DataError
      plan = _plan_video(
        root,
        name,
        raw_index,
        split,
        stats,
        labels=labels,
        annotation_path=path,
        tolerance=config.frame_count_tolerance,
        missing_reason=(missing_crop_reasons or {}).get(name),
      )
      if plan is not None:
        plans[split].append(plan)
    _report_system_files(stats, split)
  test_list = layout.find_test_list(root)
  if test_list is None:
    logging.warning(
      'no test list in %s (looked for %s): no test split', root, ', '.join(layout.TEST_LIST_NAMES)
    )
  else:
    stats = build_stats.setdefault('test', examples.BuildStats())
    plans['test'] = []
    for name in annotations.read_video_list(test_list):
      listed[name].append('test')
      plans['test'].append(_plan_video(root, name, raw_index, 'test', stats))
    _report_system_files(stats, 'test')
  twice = sorted(f'{n} ({", ".join(splits)})' for n, splits in listed.items() if len(splits) > 1)
  if twice:
    raise DataError(f'videos in more than one split in {root}: {", ".join(twice)}')
  crops_root = os.path.join(root, layout.CROPS_DIR)
  # Folders of listed videos were planned or skipped (and said why) above; the rest belong to no split.
  unused = sorted(
    n for n in os.listdir(crops_root) if os.path.isdir(os.path.join(crops_root, n)) and n not in listed
  )
  if unused:  # normal for Aff-Wild2 (other tracks' videos), a lost annotation file otherwise: say it once
    build_stats.setdefault('train', examples.BuildStats()).warn(
      'crop_folders_in_no_split',
      f'{len(unused)} crop folder(s) in {crops_root} belong to no split (no annotation file, not in the test '
      f'list): {", ".join(unused[:20])}{" ..." if len(unused) > 20 else ""}',
      n=len(unused),
    )
  for split, p in plans.items():
    if not p:
      raise DataError(f'split {split} of {root} has no usable video')
    if has_corruptions:
      absent = [v.name for v in p if v.name not in side]
      if absent:
        raise DataError(
          f'{split} videos {", ".join(absent)} are missing from {os.path.join(root, corruptions.FILENAME)}'
        )
  return plans


def _plan_video(
  root, name, raw_index, split, stats, *, labels=None, annotation_path=None, tolerance=0, missing_reason=None
) -> generation.VideoPlan | None:
  folder = layout.crop_dir(root, name)
  if not os.path.isdir(folder):
    if split == 'train':
      why = f' ({missing_reason})' if missing_reason else ''
      stats.warn(
        'videos_without_crop_folder', f'missing crop folder {folder}{why}: training video {name} skipped'
      )
      return None
    raise DataError(f'missing crop folder {folder} for {split} video {name}')
  listing = layout.read_crop_folder(folder)  # raises DataError on two files for one frame
  if not listing.crops:  # an empty folder is no better than a missing one
    holds = f'holds no face crop ({CROP_NAMES}){_other_entries(listing.others)}'
    if split == 'train':
      stats.warn('videos_without_crops', f'crop folder {folder} {holds}: training video {name} skipped')
      return None
    raise DataError(f'crop folder {folder} of {split} video {name} {holds}')
  _report_other_entries(folder, listing, stats)
  raw = layout.raw_video_for(name, raw_index)
  info, unreadable = None, None
  if raw is not None:
    try:
      info = audio_lib.probe_media(raw)
    except Exception as e:  # pylint: disable=broad-except  (PyAV raises many types)
      unreadable = type(e).__name__ + (f': {e}' if str(e).strip() else '')
  fps = info.fps if info and info.fps else None
  name_fps = layout.fps_from_name(layout.audio_source_name(name))
  if fps is None:
    fps = name_fps or DEFAULT_FPS
    if unreadable:  # said first and once: the frame rate, the frame count check and the audio
      stats.warn(
        'raw_video_unreadable',
        f'cannot open raw video {raw} ({unreadable}): frame rate {fps} '
        'assumed, its frame count not checked, its audio treated as silence',
      )
    elif raw is not None:
      stats.warn('fps_not_from_container', f'{raw}: no frame rate in the container, using {fps}')
  elif name_fps and abs(name_fps - fps) > 0.5:
    logging.info('%s: container says %.3f fps, name says %s; using the container', raw, fps, name_fps)
  video_frames = info.num_frames if info else None
  if labels is not None:
    num_frames = len(labels)
    if video_frames is not None and abs(video_frames - num_frames) > tolerance:
      raise DataError(
        f'annotation file {annotation_path} has {num_frames} label lines but raw video {raw} '
        f'has {video_frames} frames (tolerance {tolerance}; see frame_count_tolerance)'
      )
  elif video_frames is not None:
    num_frames = video_frames
  else:
    num_frames = max(listing.crops)
    stats.warn('length_from_crops', f'test video {name}: length taken from its last crop ({num_frames})')
  start = info.video_start if info else 0.0
  return generation.VideoPlan(
    name=name, crop_dir=folder, raw_path=raw, num_frames=num_frames, fps=fps, video_start=start, labels=labels
  )


def _some(names: list[str], shown: int = 5) -> str:
  """'a, b, c' or 'a, b, c, d, e and 3 more'."""
  more = f' and {len(names) - shown} more' if len(names) > shown else ''
  return ', '.join(names[:shown]) + more


def _other_entries(names: list[str]) -> str:
  """'; it holds 3 other entries: a.txt, b, c.gif', or '' for none."""
  return f'; it holds {len(names)} other entries: {_some(names)}' if names else ''


def _report_system_files(stats: examples.BuildStats, split: str) -> None:
  if stats.counts['crop_folder_system_files']:
    stats.note(
      f'{split}: {stats.counts["crop_folder_system_files"]} file-system files in crop folders '
      '(hidden files, Thumbs.db, desktop.ini) ignored'
    )


def _report_other_entries(folder: str, listing: layout.CropFolder, stats: examples.BuildStats) -> None:
  """Counts the entries of a crop folder that are not face crops, and names them once per folder,
  except file-system litter (on some systems in every folder: said once per split)."""
  if listing.others:
    stats.warn(
      'crop_folder_other_entries',
      f'crop folder {folder}: {len(listing.others)} entries that are not face crops ({CROP_NAMES}) '
      f'ignored: {_some(listing.others)}',
      n=len(listing.others),
    )
  if listing.system:
    stats.count('crop_folder_system_files', len(listing.system))
