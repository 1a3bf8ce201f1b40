"""The face crops of a dataset that ships raw videos only (`python -m data.build --crops=detect`).

For every video of the splits (the annotation files and the test list) whose crop folder is missing,
the raw video under `raw_videos/` goes through the same detector, track and alignment as predict.py
(`iaca_jax.face_video.find_faces`), and its crops are written as `<root>/cropped_aligned/<video>/
<%05d>.jpg`, the layout the builders read. Each folder is written under a temporary name and renamed
when complete, so an interrupted run leaves no half folder and a second run does the rest. Existing
folders are kept (delete one to detect it again). Videos with two annotated people (`<base>_left`,
`<base>_right`) share `<base>`'s raw video: their tracks start on the face furthest that way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Iterable

import tqdm

from iaca_jax import face_video, faces
from iaca_jax.preprocessing import annotations, layout
from iaca_jax.preprocessing.errors import DataError


@dataclasses.dataclass
class DetectStats:
  """What `detect_crops` did: videos detected, kept and skipped, frames and frames with a face."""

  detected: int = 0
  kept: int = 0
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # training video -> why
  frames: int = 0
  face_frames: int = 0

  def summary(self) -> str:
    share = self.face_frames / self.frames if self.frames else 0.0
    text = f'{self.detected} videos detected (face in {share:.1%} of {self.frames} frames), {self.kept} kept'
    return text + (
      f', {len(self.skipped)} training videos skipped (the build names them)' if self.skipped else ''
    )


def split_videos(root: str) -> dict[str, str]:
  """{video name: split} of every annotated training and validation video and every test video."""
  videos = {}
  for split in ('train', 'validation'):
    videos.update(dict.fromkeys(layout.split_annotation_files(root, split), split))
  test_list = layout.find_test_list(root)
  if test_list is not None:
    videos.update(dict.fromkeys(annotations.read_video_list(test_list), 'test'))
  return videos


def track_preference(video: str) -> str:
  """Which face starts the track: Aff-Wild2's `_left` / `_right` videos hold two annotated people."""
  for side in ('left', 'right'):
    if video.endswith(f'_{side}'):
      return side
  return 'score'


def _write_folder(folder: str, crops: Iterable[tuple[int, bytes]]) -> int:
  """Writes the (frame, JPEG) crops as `<folder>/<frame, 5 digits>.jpg`, the folder appearing only when
  complete; returns their count."""
  partial = folder + '.incomplete'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  count = 0
  for frame, jpeg in crops:
    with open(os.path.join(partial, f'{frame:05d}.jpg'), 'wb') as f:
      f.write(jpeg)
    count += 1
  os.replace(partial, folder)
  return count


def detect_crops(
  root: str,
  *,
  detector: str = faces.DEFAULT_DETECTOR,
  detect_every: int = faces.DEFAULT_DETECT_EVERY,
  detect_size: int = faces.DEFAULT_DETECT_SIZE,
) -> DetectStats:
  """Writes the crop folder of every video of `root`'s splits that has none (see the module docstring).

  A training video without a readable raw video is skipped (`DetectStats.skipped` says why; the build
  then skips it, saying so); a validation or test video without one raises DataError naming it.
  """
  crops_root = os.path.join(root, layout.CROPS_DIR)
  try:
    os.makedirs(crops_root, exist_ok=True)
  except OSError as e:
    raise DataError(f'--crops=detect cannot create the crop folder {crops_root} ({e.strerror})') from None
  raw_index = layout.index_raw_videos(root)
  stats = DetectStats()
  model = None
  for name, split in tqdm.tqdm(sorted(split_videos(root).items()), desc='detecting faces', unit='video'):
    folder = layout.crop_dir(root, name)
    if os.path.isdir(folder):
      stats.kept += 1
      continue
    raw = layout.raw_video_for(name, raw_index)
    try:
      if raw is None:
        raise face_video.VideoError(
          f'no raw video for {name} under {os.path.join(root, layout.RAW_VIDEOS_DIR)}'
        )
      model = model or faces.make_detector(detector, detect_size)
      video = face_video.detect_faces(
        raw, model, detect_every=detect_every, prefer=track_preference(name), min_frames=1
      )
      written = _write_folder(folder, face_video.face_crops(video))
    except face_video.VideoError as e:
      shutil.rmtree(folder + '.incomplete', ignore_errors=True)
      if split != 'train':
        raise DataError(f'{split} video {name}: {e}') from None
      logging.info('training video %s: %s', name, e)  # the build says it skips it, and why
      stats.skipped[name] = str(e)
      continue
    stats.detected += 1
    stats.frames += video.num_frames
    stats.face_frames += written
    logging.info('%s: face in %d of %d frames of %s', name, written, video.num_frames, raw)
  return stats
