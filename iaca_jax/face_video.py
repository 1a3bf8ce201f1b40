"""A video file -> its face track and the aligned 112x112 crop of every frame with a face.

Shared by predict.py (any video) and the preprocessing stage's `--crops=detect` (a dataset that ships
raw videos only), so that both make the same crops from the same video. Frames are read upright: a
phone video stored sideways with a display rotation is turned as a player shows it. Two passes over
the frames, neither holding more than a frame: `detect_faces` (the track), then `face_crops`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import av
import numpy as np
import tqdm

from iaca_jax import faces
from iaca_jax.preprocessing import audio as audio_lib
from iaca_jax.preprocessing import examples, windows


class VideoError(ValueError):
  """A video file that cannot be used; the message names the file."""


@dataclasses.dataclass
class VideoFaces:
  """The face track of one video: N frames at `fps`, `width` x `height` as displayed (rotated upright);
  `face_crops` makes their crops."""

  path: str
  fps: float
  width: int
  height: int
  video_start: float  # seconds: the first frame's time in the container
  track: faces.FaceTrack
  detector: str

  @property
  def num_frames(self) -> int:
    return self.track.num_frames


def open_video(path: str) -> av.container.InputContainer:
  """Opens a video file; VideoError naming it when missing, unreadable or without a video stream."""
  if not os.path.isfile(path):
    raise VideoError(f'{path}: no such file')
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoError(f'{path}: not a readable video ({e})') from None
  if not container.streams.video:
    container.close()
    raise VideoError(f'{path} has no video stream')
  return container


def check_video(path: str, min_frames: int = windows.FRAMES_PER_CLIP) -> int:
  """Checks what can be checked before any work: the file opens, has a video stream with a frame
  rate and at least `min_frames` frames (counted from the packets). Returns the frame count.

  Raises:
    VideoError naming the file.
  """
  with open_video(path) as container:
    stream = container.streams.video[0]
    if not audio_lib.frame_rate(stream):
      raise VideoError(f'{path}: the video stream has no frame rate')
    try:
      count = sum(1 for p in container.demux(stream) if p.size > 0)
    except (av.error.FFmpegError, ValueError) as e:
      raise VideoError(f'{path}: reading the video stream failed ({e})') from None
  if count < min_frames:
    raise VideoError(f'{path} has {count} frames, fewer than one clip ({min_frames} frames)')
  return count


def upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
  """The frame as a player shows it: turned counterclockwise by the container's display rotation
  (`av.VideoFrame.rotation`, degrees; rounded to a quarter turn)."""
  quarters = int(round(rotation / 90)) % 4
  return np.ascontiguousarray(np.rot90(rgb, quarters)) if quarters else rgb


def decode_frames(path: str) -> Iterator[np.ndarray]:
  """The frames of the first video stream as (H, W, 3) uint8 RGB, upright (`upright`); a decoding
  failure names the file."""
  with open_video(path) as container:
    i = 0
    try:
      for frame in container.decode(video=0):
        yield upright(frame.to_ndarray(format='rgb24'), frame.rotation)
        i += 1
    except (av.error.FFmpegError, ValueError) as e:
      raise VideoError(f'{path}: decoding stopped at frame {i + 1} ({e})') from None


def detect_faces(
  path: str,
  detector: faces.MtcnnDetector | faces.HaarDetector | str = faces.DEFAULT_DETECTOR,
  *,
  detect_every: int = faces.DEFAULT_DETECT_EVERY,
  detect_size: int = faces.DEFAULT_DETECT_SIZE,
  crop_scale: float | None = None,
  prefer: str = 'score',
  min_frames: int = windows.FRAMES_PER_CLIP,
  progress: tqdm.tqdm | None = None,
) -> VideoFaces:
  """The face track of a video: the detector on every `detect_every`-th frame (and the last), then
  `faces.build_track`. One pass over the frames, one frame in memory at a time.

  Args:
    path: any video file PyAV reads.
    detector: a detector of `faces` (reset here for this video) or its name (made with `detect_size`).
    crop_scale: the crop side over what the detector defines (default: the detector's own,
      `faces.DEFAULT_CROP_SCALES`).
    prefer: which face starts the track when there are several (`faces.choose_face`).
    progress: a bar advanced by one per frame.

  Raises:
    VideoError naming the file: unreadable, no video stream, no frame rate, or fewer frames than
    `min_frames`.
  """
  if detect_every < 1:
    raise ValueError(f'detect_every must be >= 1, got {detect_every}')
  with open_video(path) as container:
    stream = container.streams.video[0]
    rate = audio_lib.frame_rate(stream)
    start = audio_lib.start_seconds(stream)
  if not rate:
    raise VideoError(f'{path}: the video stream has no frame rate')
  if isinstance(detector, str):
    detector = faces.make_detector(detector, detect_size)
  detector.reset(prefer)
  scale = faces.DEFAULT_CROP_SCALES[detector.name] if crop_scale is None else crop_scale
  detections, num_frames, last = {}, 0, None
  for i, rgb in enumerate(decode_frames(path)):
    if i % detect_every == 0:
      detections[i] = detector(rgb)
    num_frames, last = i + 1, rgb
    if progress is not None:
      progress.update(1)
  if num_frames < min_frames:
    raise VideoError(f'{path} has {num_frames} frames, fewer than one clip ({min_frames} frames)')
  if (num_frames - 1) % detect_every:  # the last frame is always detected: no extrapolated tail
    detections[num_frames - 1] = detector(last)
  height, width = last.shape[:2]
  track = faces.build_track(detections, num_frames, scale)
  return VideoFaces(path, float(rate), width, height, start, track, detector.name)


def face_crops(video: VideoFaces, progress: tqdm.tqdm | None = None) -> Iterator[tuple[int, bytes]]:
  """(1-based frame, JPEG of its aligned crop) for every frame of `video.track` with a face, in frame
  order: the second pass over the frames (a bar in `progress` advances by one per frame)."""
  track = video.track
  for i, rgb in enumerate(decode_frames(video.path)):
    if i < track.num_frames and track.present[i]:
      crop = faces.crop_face(rgb, track.centre[i], track.side[i], track.angle[i], examples.FACE_SIZE)
      yield i + 1, examples.encode_jpeg(crop)
    if progress is not None:
      progress.update(1)


def find_faces(path: str, detector=faces.DEFAULT_DETECTOR, **options) -> tuple[VideoFaces, dict[int, bytes]]:
  """`detect_faces` and every crop of `face_crops` in memory (short videos; predict streams them)."""
  video = detect_faces(path, detector, **options)
  return video, dict(face_crops(video))
