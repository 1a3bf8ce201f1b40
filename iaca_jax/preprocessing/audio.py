"""Reading the raw videos with PyAV (bundled FFmpeg libraries, no external binary).

`probe_media` reads a container's frame rate and frame count; `decode_audio`
decodes its first audio stream to a mono float32 track at a fixed sample rate,
sample 0 at the time of the first video frame. Problems that leave part of the
audio usable are reported in `AudioTrack.status`, not raised: the caller turns
the missing part into zeros and counts it.
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np

from iaca_jax.preprocessing.errors import reason

# Status of a decoded track.
OK = 'ok'
MISSING_FILE = 'missing_file'  # no raw video for this name
UNREADABLE = 'unreadable'  # the container cannot be opened
NO_AUDIO_STREAM = 'no_audio_stream'  # the container has no audio stream
TRUNCATED = 'truncated'  # decoding stopped early or the track is shorter than the video
SILENT = 'silent'  # decoded, but all samples are (near) zero

SILENCE_THRESHOLD = 1e-6  # max |x| below this counts as a silent track
TRUNCATION_TOLERANCE_S = 0.1  # audio may end this much before the video does


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What the preprocessing needs from a raw video."""

  path: str
  fps: float | None  # video frame rate, None without a video stream
  num_frames: int | None  # video frames, None if unknown
  video_start: float  # start time of the video stream (s)
  has_audio: bool


@dataclasses.dataclass
class AudioTrack:
  samples: np.ndarray  # float32 (num_samples,), mono
  sample_rate: int
  status: str  # one of the constants above
  message: str = ''  # why, naming the file, when status != OK

  @property
  def duration(self) -> float:
    return len(self.samples) / self.sample_rate


def frame_rate(stream: av.video.stream.VideoStream):
  """The video stream's frame rate (a Fraction) from whichever field the container fills, or None."""
  return stream.average_rate or stream.guessed_rate or stream.base_rate


def start_seconds(stream: av.stream.Stream) -> float:
  """The stream's first timestamp in seconds (0 when the container gives none)."""
  return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def probe_media(path: str) -> MediaInfo:
  """Frame rate, frame count and streams of a raw video.

  Raises:
    av.error.FFmpegError (or OSError) if the file cannot be opened.
  """
  with av.open(path) as container:
    has_audio = bool(container.streams.audio)
    if not container.streams.video:
      return MediaInfo(path, None, None, 0.0, has_audio)
    stream = container.streams.video[0]
    rate = frame_rate(stream)
    fps = float(rate) if rate else None
    start = start_seconds(stream)
    num_frames = int(stream.frames) if stream.frames else None
    if not num_frames:
      try:
        num_frames = sum(1 for p in container.demux(stream) if p.size > 0) or None
      except av.error.FFmpegError:
        num_frames = None
    return MediaInfo(path, fps, num_frames, start, has_audio)


def decode_audio(
  path: str | None, sample_rate: int, *, video_start: float = 0.0, expected_duration: float | None = None
) -> AudioTrack:
  """Decodes the first audio stream of `path` to mono float32 at `sample_rate`.

  Args:
    path: raw video (or audio) file; None or a missing file gives an empty track.
    sample_rate: output rate (the resampler downmixes to mono).
    video_start: time (s) of the first video frame; audio before it is dropped,
      a gap after it is zeros, so that sample 0 is the first frame's time.
    expected_duration: the video's duration (s); a track that ends more than
      TRUNCATION_TOLERANCE_S earlier is reported as TRUNCATED.

  Returns:
    An AudioTrack; on any problem its status says which and `message` names
    the file. Never raises for bad media.
  """
  empty = np.zeros(0, np.float32)
  if path is None or not os.path.exists(path):
    return AudioTrack(empty, sample_rate, MISSING_FILE, f'no raw video found for audio: {path}')
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as e:
    return AudioTrack(empty, sample_rate, UNREADABLE, f'cannot open {path}: {reason(e)}')
  chunks = []
  status, message = OK, ''
  first_time = None
  with container:
    if not container.streams.audio:
      return AudioTrack(empty, sample_rate, NO_AUDIO_STREAM, f'{path} has no audio stream')
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
    try:
      for frame in container.decode(stream):
        if first_time is None and frame.time is not None:
          first_time = float(frame.time)
        for out in resampler.resample(frame):
          chunks.append(out.to_ndarray().reshape(-1))
      for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, ValueError) as e:
      status, message = TRUNCATED, f'decoding the audio of {path} stopped early: {reason(e)}'
  samples = np.concatenate(chunks).astype(np.float32) if chunks else empty
  # Align sample 0 with the first video frame.
  shift = int(round(((first_time or 0.0) - video_start) * sample_rate))
  if shift > 0:
    samples = np.concatenate([np.zeros(shift, np.float32), samples])
  elif shift < 0:
    samples = samples[-shift:]
  if status == OK and expected_duration is not None:
    got = len(samples) / sample_rate
    if got < expected_duration - TRUNCATION_TOLERANCE_S:
      status = TRUNCATED
      message = (
        f'the audio of {path} lasts {got:.2f} s but the video {expected_duration:.2f} s: the rest is zeros'
      )
  if status == OK and (samples.size == 0 or np.max(np.abs(samples)) < SILENCE_THRESHOLD):
    status, message = SILENT, f'the audio track of {path} is silent (zeros)'
  return AudioTrack(samples, sample_rate, status, message)
