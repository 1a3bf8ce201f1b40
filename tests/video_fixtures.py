"""Test videos made on the fly: a real face photograph (scikit-image's astronaut) moving and scaling
across frames, with blank frames and a synthetic voice, written with PyAV."""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np
from skimage import data

FPS = 30
WIDTH, HEIGHT = 320, 240
SAMPLE_RATE = 16_000
FACE_REGION = (slice(20, 220), slice(130, 330))  # rows, columns of the astronaut around her face


def face_frames(
  num_frames: int, blank: tuple[int, int], width: int = WIDTH, height: int = HEIGHT
) -> tuple[np.ndarray, np.ndarray]:
  """(N, H, W, 3) uint8 frames and the (N, 3) true (x, y, side) of the pasted head square, NaN where
  there is none: the astronaut's head moving left to right while shrinking from 150 to 100 pixels,
  grey frames [blank[0], blank[1]). Sizes scale with `height` (given for 240)."""
  head = data.astronaut()[FACE_REGION]
  frames = np.full((num_frames, height, width, 3), 128, np.uint8)
  unit = height / HEIGHT
  truth = np.full((num_frames, 3), np.nan)
  for i in range(num_frames):
    if blank[0] <= i < blank[1]:
      continue
    t = i / max(num_frames - 1, 1)
    side = int(round((150 - 50 * t) * unit))
    x = int(round(10 + (width - side - 20) * t))
    y = int(round((height - side) / 2 + 20 * unit * np.sin(2 * np.pi * t)))
    frames[i, y : y + side, x : x + side] = cv2.resize(head, (side, side), interpolation=cv2.INTER_AREA)
    truth[i] = (x, y, side)
  return frames, truth


def voice(
  duration: float, sample_rate: int = SAMPLE_RATE, pause: tuple[float, float] | None = None
) -> np.ndarray:
  """A voiced sound: harmonics of a gliding 120-220 Hz pitch under a 2 Hz syllable envelope, silent
  during `pause` (seconds). (S,) float32."""
  t = np.arange(int(duration * sample_rate)) / sample_rate
  f0 = 170 + 50 * np.sin(2 * np.pi * 0.7 * t)
  phase = 2 * np.pi * np.cumsum(f0) / sample_rate
  wave = sum(np.sin(k * phase) / k for k in range(1, 8))
  envelope = 0.3 + 0.7 * np.sin(2 * np.pi * 2 * t) ** 2
  if pause is not None:
    envelope[(t >= pause[0]) & (t < pause[1])] = 0.0
  return (0.3 * wave * envelope).astype(np.float32)


def write_video(
  path: str,
  frames: np.ndarray,
  audio: np.ndarray | None,
  fps: int = FPS,
  audio_start: float = 0.0,
  rotation: int = 0,
) -> None:
  """H.264 (and AAC when `audio` is given) in an mp4, written with PyAV. `audio_start`: the audio's
  first sample at this time (s) of the video's clock (negative: the video starts that much after the
  audio). `rotation`: the frames are stored turned clockwise by these degrees (a multiple of 90) with
  a display rotation that turns them back, as phones store portrait video."""
  with av.open(path, 'w') as out:
    video = out.add_stream('libx264', rate=fps)
    stored = np.rot90(frames, -rotation // 90, axes=(1, 2)) if rotation else frames
    video.width, video.height, video.pix_fmt = stored.shape[2], stored.shape[1], 'yuv420p'
    if rotation:
      video.set_display_rotation(rotation)
    sound = None
    if audio is not None:
      sound = out.add_stream('aac', rate=SAMPLE_RATE)
      sound.layout = 'mono'
    video_offset = int(round(max(-audio_start, 0) * fps))
    for i, rgb in enumerate(stored):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format='rgb24')
      frame.pts = i + video_offset
      out.mux(video.encode(frame))
    out.mux(video.encode(None))
    if sound is not None:
      audio_offset = int(round(max(audio_start, 0) * SAMPLE_RATE))
      for start in range(0, len(audio), 1024):
        chunk = audio[None, start : start + 1024]
        frame = av.AudioFrame.from_ndarray(chunk, format='flt', layout='mono')
        frame.sample_rate = SAMPLE_RATE
        frame.pts = start + audio_offset
        frame.time_base = Fraction(1, SAMPLE_RATE)
        out.mux(sound.encode(frame))
      out.mux(sound.encode(None))


def write_face_video(
  path: str,
  num_frames: int = 96,
  blank: tuple[int, int] = (40, 56),
  with_audio: bool = True,
  width: int = WIDTH,
  height: int = HEIGHT,
  pause: tuple[float, float] | None = None,
):
  """The face video at `path` (a silent `pause` in seconds); returns the (N, 3) head squares of
  `face_frames`."""
  frames, truth = face_frames(num_frames, blank, width, height)
  write_video(path, frames, voice(num_frames / FPS, pause=pause) if with_audio else None)
  return truth
