"""Assembling the examples of one video: one example per 16-clip window.

This is the whole per-video logic of both builders, free of tfds so that it
can be unit-tested. See docs/DESIGN.md §2 and docs/DATA.md for the rules.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from iaca_jax.preprocessing import annotations, corruptions, windows
from iaca_jax.preprocessing import mel as mel_lib
from iaca_jax.preprocessing.errors import DataError, reason

# The version of the example format: the builders write it (<data_dir>/<dataset>/<config>/<version>/),
# the input pipeline reads only it. A change to what a window holds or means is a new version.
DATASET_VERSION = '1.0.0'
FACE_SIZE = 112
FRAMES_PER_WINDOW = windows.CLIPS_PER_WINDOW * windows.FRAMES_PER_SAMPLE  # 128
# [decision] Keep a training window when at least this many of its 16 clips are
# valid (have a chosen frame with a valid label). Validation and test keep
# every window.
DEFAULT_MIN_VALID_CLIPS = 8


class BuildStats:
  """Counts what was skipped or repaired during a build, and logs each case once."""

  def __init__(self):
    self.counts = collections.Counter()
    self.messages: list[str] = []

  def warn(self, kind: str, message: str, n: int = 1):
    self.counts[kind] += n
    self.note(message)

  def note(self, message: str):
    """Logs and keeps a message without counting (what was counted is said once, in sum)."""
    self.messages.append(message)
    logging.warning('%s', message)

  def count(self, kind: str, n: int = 1):
    self.counts[kind] += n

  def summary(self) -> str:
    return ', '.join(f'{k}={v}' for k, v in sorted(self.counts.items())) or 'nothing to report'


@dataclasses.dataclass
class VideoInput:
  """Everything the example assembly needs about one (crop) video."""

  name: str
  num_frames: int  # N; frames are 1..N
  fps: float
  crops: dict[int, bytes]  # frame -> JPEG bytes (112x112 RGB, already checked)
  audio: np.ndarray  # mono track at the mel sample rate, sample 0 = frame 1's start
  labels: np.ndarray | None = None  # (N, 2) with -5 = invalid; None for the test split
  corrupt_face: np.ndarray | None = None  # bool (N,) or None
  corrupt_audio: np.ndarray | None = None  # bool (N,) or None
  audio_path: str | None = None  # the raw file the audio was decoded from, for messages


JPEG_QUALITY = 95  # of every face crop this stage encodes (converted crops, the zero frame, detected faces)
_ZERO_JPEG = None


def encode_jpeg(image: np.ndarray | Image.Image) -> bytes:
  """An RGB image ((H, W, 3) uint8 or PIL) as the JPEG bytes the shards store."""
  buf = io.BytesIO()
  (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(
    buf, format='JPEG', quality=JPEG_QUALITY
  )
  return buf.getvalue()


def zero_frame_jpeg() -> bytes:
  """A black 112x112 JPEG: the frame stored where a clip has no chosen face."""
  global _ZERO_JPEG
  if _ZERO_JPEG is None:
    _ZERO_JPEG = encode_jpeg(np.zeros((FACE_SIZE, FACE_SIZE, 3), np.uint8))
  return _ZERO_JPEG


def check_jpeg(data: bytes, path: str) -> tuple[bytes, str | None]:
  """Decodes a face crop; returns (JPEG bytes of a 112x112 RGB image, what was changed or None).

  Crops that are not 112x112 RGB JPEGs are converted and re-encoded; the second value then says how
  ('resized from 64x64', 'converted from L', ...).

  Raises:
    ValueError with the reason (an empty file, not an image, a truncated image) if the file is not a
    readable image.
  """
  if not data:
    raise ValueError('empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      size, mode, kind = im.size, im.mode, im.format
      if kind == 'JPEG' and mode == 'RGB' and size == (FACE_SIZE, FACE_SIZE):
        return data, None
      im = im.convert('RGB')
      if size != (FACE_SIZE, FACE_SIZE):
        im = im.resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR)
  except Image.UnidentifiedImageError:
    raise ValueError(f'not an image file ({len(data)} bytes)') from None
  data = encode_jpeg(im)
  if size != (FACE_SIZE, FACE_SIZE):
    return data, f'resized from {size[0]}x{size[1]} to {FACE_SIZE}x{FACE_SIZE}'
  return data, f'converted from {kind} {mode} to an RGB JPEG'


def load_crops(
  crop_paths: dict[int, str], num_frames: int, video: str, stats: BuildStats
) -> dict[int, bytes]:
  """Reads and checks the crops of frames 1..num_frames; unreadable ones are skipped (counted and
  named), resized ones counted and named, other conversions (mode, format) counted."""
  crops = {}
  beyond = []
  for frame in sorted(crop_paths):
    path = crop_paths[frame]
    if frame < 1 or frame > num_frames:
      beyond.append(path)
      continue
    try:
      with open(path, 'rb') as f:
        data = f.read()
      data, change = check_jpeg(data, path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      stats.warn('unreadable_jpegs', f'unreadable face crop {path} ({reason(e)}): treated as no face')
      continue
    if change and change.startswith('resized'):
      stats.warn('resized_jpegs', f'face crop {path} {change}')
    elif change:
      stats.count('reencoded_jpegs')
    crops[frame] = data
  if beyond:
    stats.warn(
      'crops_beyond_video',
      f'{video}: {len(beyond)} crops numbered outside its frames 1..{num_frames} ignored '
      f'({", ".join(os.path.basename(p) for p in beyond[:3])}{" ..." if len(beyond) > 3 else ""})',
      n=len(beyond),
    )
  return crops


def video_examples(
  video: VideoInput,
  mel: mel_lib.MelSettings,
  *,
  train: bool,
  min_valid_clips: int = DEFAULT_MIN_VALID_CLIPS,
  stats: BuildStats | None = None,
) -> Iterator[tuple[str, dict]]:
  """Yields (key, example) for every kept window of one video.

  Frame rules [docs/DESIGN.md §2 + decision]: the present frames of a clip are those with
  a face crop and, in training, a valid label; 8 of them are chosen by
  `windows.select_frames`; the clip label is the label of the last chosen
  frame, valid if that label is valid. `frame_labels` / `frame_mask` are the
  label of the clip's end frame itself and whether it is a real, validly
  labelled frame. Clips ending beyond the video are padding (end_frame 0).

  Args:
    video: the video's data.
    mel: log-mel settings (their sample rate is the track's).
    train: training rules (valid-label frames only, keep rule) or eval rules.
    min_valid_clips: keep rule for training windows.
    stats: counts of kept and dropped windows.

  Yields:
    key `<video>/<window end frame, 6 digits>` and a dict with the builder's
    features: video (128 JPEG bytes), audio (16, 64, T) float32, labels (16, 2),
    mask (16,), frame_labels (16, 2), frame_mask (16,), end_frame (16,) int32,
    video_name, corrupt_video (16,), corrupt_audio (16,).
  """
  stats = stats or BuildStats()
  n = video.num_frames
  has_labels = video.labels is not None
  if has_labels:
    if video.labels.shape != (n, 2):
      raise ValueError(f'{video.name}: labels {video.labels.shape} for {n} frames')
    valid = annotations.label_valid(video.labels)
  else:
    valid = np.zeros(n, bool)
  has_crop = np.zeros(n + 1, bool)  # index = frame number
  for f in video.crops:
    if 1 <= f <= n:
      has_crop[f] = True
  present = has_crop.copy()
  if train:
    present[1:] &= valid
  zero = zero_frame_jpeg()
  L, S = windows.CLIPS_PER_WINDOW, windows.FRAMES_PER_SAMPLE

  for ends in windows.window_clip_ends(n):
    jpegs = [zero] * (L * S)
    labels = np.zeros((L, 2), np.float32)
    mask = np.zeros(L, bool)
    frame_labels = np.zeros((L, 2), np.float32)
    frame_mask = np.zeros(L, bool)
    end_frame = np.zeros(L, np.int32)
    corrupt_v = np.zeros(L, bool)
    corrupt_a = np.zeros(L, bool)
    for c, k in enumerate(ends):
      k = int(k)
      if k > n:
        continue  # padding clip
      end_frame[c] = k
      lo = max(k - windows.FRAMES_PER_CLIP + 1, 1)
      chosen = windows.select_frames(lo + np.flatnonzero(present[lo : k + 1]))
      for s, f in enumerate(chosen):
        jpegs[c * S + s] = video.crops[int(f)]
      if has_labels:
        if len(chosen):
          last = int(chosen[-1]) - 1
          labels[c] = video.labels[last]
          mask[c] = valid[last]
        frame_labels[c] = video.labels[k - 1]
        frame_mask[c] = valid[k - 1]
      if video.corrupt_face is not None:
        corrupt_v[c] = corruptions.clip_corrupt(video.corrupt_face, k)
      if video.corrupt_audio is not None:
        corrupt_a[c] = corruptions.clip_corrupt(video.corrupt_audio, k)
    labels[~mask] = 0.0
    frame_labels[~frame_mask] = 0.0
    if train and mask.sum() < min_valid_clips:
      stats.count('train_windows_dropped')
      continue
    real = end_frame > 0
    waves = np.zeros((L, mel.clip_samples), np.float32)
    for c in np.flatnonzero(real):
      waves[c] = mel_lib.clip_waveform(
        video.audio, mel.sample_rate, video.fps, int(end_frame[c]), mel.clip_samples
      )
    bad = np.flatnonzero(~np.isfinite(waves).all(axis=1))
    if bad.size:
      first, last = windows.window_frames(end_frame)
      raise DataError(
        f'{video.name}: the window of frames {first}-{last} (the clip ending at frame '
        f'{int(end_frame[bad[0]])}) has non-finite audio samples: the track decoded from '
        f'{video.audio_path or "its raw video"} holds NaN or infinity'
      )
    audio = mel_lib.log_mel(waves, mel)
    # Padding clips get the log-mel of silence too (what a zero waveform gives).
    stats.count('windows')
    yield (
      f'{video.name}/{int(ends[-1]):06d}',
      {
        'video': jpegs,
        'audio': audio,
        'labels': labels,
        'mask': mask,
        'frame_labels': frame_labels,
        'frame_mask': frame_mask,
        'end_frame': end_frame,
        'video_name': video.name,
        'corrupt_video': corrupt_v,
        'corrupt_audio': corrupt_a,
      },
    )
