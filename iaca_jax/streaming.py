"""Read-once views of a video's crops and audio that hold only the stretch the windows still need.

`examples.video_examples` reads a video's crops and audio window after window, each window reaching at
most `KEEP_FRAMES` frames behind the furthest frame read before (docs/DESIGN.md §2: a window spans 512
frames, its first clip 32 before it). predict.py hands it these views instead of the whole video's crops
and track, so that its memory does not grow with the video's length; the preprocessing stage keeps
its in-memory arrays (its videos are minutes long and the tfds writer holds the examples anyway).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from iaca_jax.preprocessing import windows

# Frames behind the furthest one read that a later window can still read: a window's span (512) and
# its first clip's start (32), with a clip's length more to spare.
KEEP_FRAMES = windows.WINDOW_FRAMES + 2 * windows.FRAMES_PER_CLIP


class ReleasedError(RuntimeError):
  """A read of what a view had already released: the reads went further back than KEEP_FRAMES (a bug)."""


class SlidingCrops(Mapping):
  """The crops of a video as a read-only {1-based frame: JPEG bytes} mapping whose keys (`frames`) are
  known up front and whose values come from `crops`, an iterator of (frame, JPEG) in frame order,
  read as far as a lookup needs. Values more than `keep` frames behind the furthest lookup are
  released."""

  def __init__(self, frames: Iterable[int], crops: Iterator[tuple[int, bytes]], keep: int = KEEP_FRAMES):
    self._frames = [int(f) for f in frames]
    self._keys = frozenset(self._frames)
    self._crops = crops
    self._keep = keep
    self._held: collections.OrderedDict[int, bytes] = collections.OrderedDict()
    self._floor = 0  # frames below it are released

  def __iter__(self) -> Iterator[int]:
    return iter(self._frames)

  def __len__(self) -> int:
    return len(self._frames)

  def __contains__(self, frame: object) -> bool:
    return frame in self._keys

  def __getitem__(self, frame: int) -> bytes:
    if frame not in self._keys:
      raise KeyError(frame)
    if frame < self._floor:
      raise ReleasedError(f'crop of frame {frame} read after its release (frames below {self._floor})')
    while frame not in self._held:
      got, jpeg = next(self._crops, (None, None))
      if got is None:
        raise KeyError(frame)  # the crops ended early: the track promised a face here
      self._held[got] = jpeg
    self._release(frame - self._keep)
    return self._held[frame]

  def _release(self, below: int) -> None:
    self._floor = max(self._floor, below)
    while self._held and next(iter(self._held)) < self._floor:
      self._held.popitem(last=False)

  @property
  def held(self) -> int:
    """Crops in memory now."""
    return len(self._held)


class SlidingAudio:
  """A mono track read once from `chunks` (float32 arrays in time order), sliced like a 1-D array by
  `mel.clip_waveform` (`track[lo:hi]`, shorter where the track ends): chunks are read as far as a slice
  needs, and samples more than `keep` behind the furthest slice end are released. On the way it sums
  each frame's energy (`bounds`: the (N + 1,) first sample of each frame and the end) for
  `silent_frames`."""

  def __init__(self, chunks: Iterable[np.ndarray], keep: int, bounds: np.ndarray):
    self._chunks = iter(chunks)
    self._keep = keep
    self._bounds = np.asarray(bounds, np.int64)
    self._energy = np.zeros(len(self._bounds) - 1, np.float64)
    self._buffer = np.zeros(max(2 * keep, 1 << 16), np.float32)
    self._start = 0  # track index of _buffer[_head]
    self._head = self._tail = 0  # the samples held are _buffer[_head:_tail]
    self._floor = 0  # samples below it are released
    self._done = False

  @property
  def end(self) -> int:
    """Samples read so far (the track's length once `read_all` returned)."""
    return self._start + self._tail - self._head

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError('SlidingAudio takes slices [lo:hi] only')
    lo, hi = index.start or 0, index.stop
    if lo < 0 or hi is None or hi < 0:
      raise TypeError('SlidingAudio takes slices with non-negative bounds')
    if lo < self._floor:
      raise ReleasedError(f'audio samples from {lo} read after their release (samples below {self._floor})')
    self._read_to(hi)
    a, b = self._head + lo - self._start, self._head + min(hi, self.end) - self._start
    out = self._buffer[a:b].copy() if b > a else np.zeros(0, np.float32)
    self._release(hi - self._keep)
    return out

  def read_all(self) -> None:
    """Reads (and sums the energy of) the rest of the track, releasing all of it."""
    self._release(self.end)
    for chunk in self._chunks:
      self._account(chunk, self.end)
      self._start += len(chunk)  # nothing is held: the read position moves on
    self._floor = self.end
    self._done = True

  def silent_frames(self, threshold: float) -> np.ndarray:
    """bool (N,): frames whose stretch of the track is missing or has an RMS below `threshold` (of
    the whole frame's length: a frame the track ends in counts its missing part as silence)."""
    if not self._done:
      raise RuntimeError('silent_frames needs the whole track: call read_all first')
    lengths = np.maximum(np.diff(self._bounds), 1)
    return (self._bounds[:-1] >= self.end) | (np.sqrt(self._energy / lengths) < threshold)

  def _read_to(self, stop: int) -> None:
    while self.end < stop and not self._done:
      chunk = next(self._chunks, None)
      if chunk is None:
        self._done = True
        return
      self._account(chunk, self.end)
      self._append(np.asarray(chunk, np.float32))

  def _append(self, chunk: np.ndarray) -> None:
    if self._tail + len(chunk) > len(self._buffer):  # compact, growing only if what is held needs it
      held = self._buffer[self._head : self._tail]
      size = max(len(self._buffer), 2 * (len(held) + len(chunk)))
      buffer = np.zeros(size, np.float32) if size > len(self._buffer) else self._buffer
      buffer[: len(held)] = held
      self._buffer, self._head, self._tail = buffer, 0, len(held)
    self._buffer[self._tail : self._tail + len(chunk)] = chunk
    self._tail += len(chunk)

  def _release(self, below: int) -> None:
    self._floor = max(self._floor, below)
    drop = min(self._floor - self._start, self._tail - self._head)
    if drop > 0:
      self._head += drop
      self._start += drop

  def _account(self, chunk: np.ndarray, first: int) -> None:
    """Adds the squared samples of `chunk` (track indices first..) to the energy of their frames."""
    bounds = self._bounds
    i0 = int(np.searchsorted(bounds, first, 'right')) - 1  # the frame of the chunk's first sample
    if len(chunk) == 0 or i0 >= len(self._energy):
      return  # past the last frame
    i1 = int(np.searchsorted(bounds, first + len(chunk), 'left'))
    cuts = bounds[i0 + 1 : i1] - first  # frame starts inside the chunk
    sums = np.add.reduceat(np.square(chunk, dtype=np.float64), np.concatenate([[0], cuts]))
    frames = np.arange(i0, i0 + len(sums))
    keep = frames < len(self._energy)
    self._energy[frames[keep]] += sums[keep]
