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
from collections.abc import Iterator

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
LATE_START = 'late_start'  # the audio starts after the first video frame: the gap is zeros

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


class AudioStream:
  """The first audio stream of a file, decoded chunk by chunk to mono float32 at `sample_rate`, sample
  0 at the time of the first video frame: audio before it is dropped, a late start is preceded by
  zeros. Iterate it once for the chunks, then `finish` gives the track's status; memory does not grow
  with the track's length (predict streams long videos through it). Never raises for bad media."""

  def __init__(self, path: str | None, sample_rate: int, *, video_start: float = 0.0):
    self.path = path
    self.sample_rate = sample_rate
    self.video_start = video_start
    self.num_samples = 0  # yielded so far
    self.peak = 0.0  # max |x| yielded so far
    self.late_start = 0.0  # seconds of zeros before the audio begins
    self._status, self._message = OK, ''

  def __iter__(self) -> Iterator[np.ndarray]:
    path = self.path
    if path is None or not os.path.exists(path):
      self._status, self._message = MISSING_FILE, f'no raw video found for audio: {path}'
      return
    try:
      container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
      self._status, self._message = UNREADABLE, f'cannot open {path}: {reason(e)}'
      return
    with container:
      if not container.streams.audio:
        self._status, self._message = NO_AUDIO_STREAM, f'{path} has no audio stream'
        return
      resampler = av.AudioResampler(format='flt', layout='mono', rate=self.sample_rate)
      pending, drop = [], None  # chunks before the first timestamp; samples still to drop
      try:
        for frame in container.decode(container.streams.audio[0]):
          if drop is None and frame.time is not None:
            drop = yield from self._start(float(frame.time))
          pending += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
          if drop is not None:
            drop = yield from self._emit(pending, drop)
            pending = []
        pending += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
      except (av.error.FFmpegError, ValueError) as e:
        self._status, self._message = TRUNCATED, f'decoding the audio of {path} stopped early: {reason(e)}'
      if drop is None:  # no timestamp at all: the audio starts at time 0
        drop = yield from self._start(0.0)
      yield from self._emit(pending, drop)

  def _start(self, first_time: float) -> Iterator[np.ndarray]:
    """Zeros for a late start (yielded); returns the samples to drop for an early one."""
    shift = int(round((first_time - self.video_start) * self.sample_rate))
    if shift > 0:
      self.late_start = shift / self.sample_rate
      self.num_samples += shift
      yield np.zeros(shift, np.float32)
    return max(-shift, 0)

  def _emit(self, chunks: list[np.ndarray], drop: int) -> Iterator[np.ndarray]:
    """Yields `chunks` less their first `drop` samples; returns the samples still to drop."""
    for chunk in chunks:
      cut = min(drop, len(chunk))
      chunk, drop = chunk[cut:], drop - cut
      if len(chunk):
        self.num_samples += len(chunk)
        self.peak = max(self.peak, float(np.max(np.abs(chunk))))
        yield chunk
    return drop

  def finish(self, expected_duration: float | None = None) -> tuple[str, str]:
    """(status, message) of the whole track, once iterated: the first problem's status (decoding
    stopped, a late start, a track shorter than `expected_duration` seconds, silence) and every
    problem's message, naming the file; (OK, '') for a sound track."""
    if self._status != OK:
      return self._status, self._message
    problems = []
    if self.late_start > TRUNCATION_TOLERANCE_S:
      problems.append(
        (
          LATE_START,
          f'the audio of {self.path} starts {self.late_start:.2f} s after the first video frame: '
          'those seconds are zeros',
        )
      )
    got = self.num_samples / self.sample_rate
    if expected_duration is not None and got < expected_duration - TRUNCATION_TOLERANCE_S:
      problems.append(
        (
          TRUNCATED,
          f'the audio of {self.path} lasts {got:.2f} s but the video {expected_duration:.2f} s: '
          'the rest is zeros',
        )
      )
    if not problems and self.peak < SILENCE_THRESHOLD:
      problems.append((SILENT, f'the audio track of {self.path} is silent (zeros)'))
    if not problems:
      return OK, ''
    return problems[0][0], '; '.join(message for _, message in problems)


def decode_audio(
  path: str | None, sample_rate: int, *, video_start: float = 0.0, expected_duration: float | None = None
) -> AudioTrack:
  """Decodes the first audio stream of `path` to mono float32 at `sample_rate` (`AudioStream`, whole).

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
  stream = AudioStream(path, sample_rate, video_start=video_start)
  chunks = list(stream)
  samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
  status, message = stream.finish(expected_duration)
  return AudioTrack(samples, sample_rate, status, message)
