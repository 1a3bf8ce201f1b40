"""Making the windows of one split from its planned videos, in this process or in worker processes.

What the builders' generation runs, apart from tfds (`tfds_builder.py` plans the splits and hands the
windows to tfds): worker processes import this module, not TensorFlow.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np

from iaca_jax.preprocessing import audio as audio_lib
from iaca_jax.preprocessing import corruptions, examples, layout
from iaca_jax.preprocessing import mel as mel_lib
from iaca_jax.preprocessing.errors import DataError


@dataclasses.dataclass
class VideoPlan:
  """One video of a split, checked before anything is written."""

  name: str
  crop_dir: str
  raw_path: str | None
  num_frames: int
  fps: float
  video_start: float
  labels: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """What generating one split's examples needs besides the videos: picklable for Beam's workers."""

  split: str
  root: str
  mel: mel_lib.MelSettings
  min_valid_clips: int
  has_corruptions: bool

  def corruptions(self) -> dict | None:
    if not self.has_corruptions:
      return None
    return corruptions.read_corruptions(os.path.join(self.root, corruptions.FILENAME))


def plan_examples(
  v: VideoPlan,
  track: audio_lib.AudioTrack,
  settings: GenerationSettings,
  side: dict | None,
  stats: examples.BuildStats,
):
  """The (key, example) windows of one planned video whose audio `track` is decoded."""
  crops = examples.load_crops(layout.list_crops(v.crop_dir), v.num_frames, v.name, stats)
  stats.count('videos')
  stats.count('frames', v.num_frames)
  stats.count('frames_without_face', v.num_frames - len(crops))
  face_mask = audio_mask = None
  if side is not None:
    if v.name not in side:
      raise DataError(f'video {v.name} is missing from {corruptions.FILENAME} in {settings.root}')
    face_mask = corruptions.frame_mask(side[v.name].get('face', []), v.num_frames)
    audio_mask = corruptions.frame_mask(side[v.name].get('audio', []), v.num_frames)
  video = examples.VideoInput(
    name=v.name,
    num_frames=v.num_frames,
    fps=v.fps,
    crops=crops,
    audio=track.samples,
    labels=v.labels,
    corrupt_face=face_mask,
    corrupt_audio=audio_mask,
    audio_path=v.raw_path,
  )
  yield from examples.video_examples(
    video,
    settings.mel,
    train=settings.split == 'train',
    min_valid_clips=settings.min_valid_clips,
    stats=stats,
  )


def no_window_error(settings: GenerationSettings, num_videos: int | None = None) -> DataError:
  """The error of a split that kept no window (a build with nothing to train or evaluate on)."""
  videos = f'{num_videos} videos; ' if num_videos is not None else ''
  return DataError(
    f'split {settings.split} of {settings.root}: no window kept ({videos}a training window needs '
    f'{settings.min_valid_clips} valid clips, i.e. videos of at least '
    f'{32 * (settings.min_valid_clips - 1) + 1} frames; see --min_valid_clips)'
  )


def check_windows_kept(
  stats: examples.BuildStats, num_videos: int | None, settings: GenerationSettings
) -> None:
  if not stats.counts['windows']:
    raise no_window_error(settings, num_videos)


def raw_file_groups(plan: list[VideoPlan]) -> list[list[VideoPlan]]:
  """The planned videos grouped by the raw file they take their audio from (Aff-Wild2's `_left` /
  `_right` share one; a video without one is a group of its own), in the plan's order."""
  groups: dict[str, list[VideoPlan]] = {}
  for v in plan:
    groups.setdefault(v.raw_path or f'<missing:{v.name}>', []).append(v)
  return list(groups.values())


def group_examples(
  videos: list[VideoPlan], settings: GenerationSettings, side: dict | None, stats: examples.BuildStats
):
  """The (key, example) windows of one `raw_file_groups` group, its audio decoded once."""
  first = videos[0]
  track = audio_lib.decode_audio(
    first.raw_path,
    settings.mel.sample_rate,
    video_start=first.video_start,
    expected_duration=first.num_frames / first.fps,
  )
  for v in videos:
    _count_audio_problem(track, v, stats)
    yield from plan_examples(v, track, settings, side, stats)


@functools.lru_cache(maxsize=4)
def corruptions_once(settings: GenerationSettings) -> dict | None:
  """The split's corruption sidecar, read once per process."""
  return settings.corruptions()


def made_in_worker(videos: list[VideoPlan], settings: GenerationSettings):
  """`group_examples` in a worker process: (the examples, the counts, the messages)."""
  stats = examples.BuildStats()
  made = list(group_examples(videos, settings, corruptions_once(settings), stats))
  return made, stats.counts, stats.messages


def worker_pool(num_workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """`num_workers` fresh ('spawn': no fork of a process running TensorFlow's threads) processes."""
  return concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context('spawn'))


def ordered_map(fn, items: list, pool: concurrent.futures.ProcessPoolExecutor, ahead: int) -> Iterator:
  """fn(item) for every item, computed by the pool's processes and yielded in order, at most `ahead`
  in flight (memory stays bounded however long the list). A worker's exception is raised here."""
  pending: collections.deque = collections.deque()
  items = iter(items)
  for item in itertools.islice(items, ahead):
    pending.append(pool.submit(fn, item))
  while pending:
    result = pending.popleft().result()
    for item in itertools.islice(items, 1):
      pending.append(pool.submit(fn, item))
    yield result


def _count_audio_problem(track: audio_lib.AudioTrack, v: VideoPlan, stats: examples.BuildStats) -> None:
  """A missing, unreadable, audio-less, truncated or silent track is warned about and counted once per
  video that uses it; its missing part is zeros."""
  if track.status == audio_lib.MISSING_FILE:
    stats.warn(
      'audio_missing_file',
      f'{v.name}: no raw video for it nor for '
      f'{layout.audio_source_name(v.name)} under {layout.RAW_VIDEOS_DIR}/: its audio is zeros',
    )
  elif track.status != audio_lib.OK:
    stats.warn(f'audio_{track.status}', f'{v.name}: {track.message}')
