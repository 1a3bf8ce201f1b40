"""Window schedule and per-clip frame selection (docs/DESIGN.md §2).

Frame numbers are 1-based, as in the Aff-Wild2 crop file names.

A window is 16 clips of 32 frames; the clip ending at frame k covers frames
k-31..k. Window ends run e = 481, 482, ..., 512 (32 windows whose clips end at
every frame 1..512), then jump by 481 to 993, ..., 1024, and so on, so that
every frame of a video is the end frame of exactly one clip. The last block of
a video is cut where a window's first clip would start past the video; clip
ends beyond the video are padding clips.
"""

from __future__ import annotations

import numpy as np

CLIPS_PER_WINDOW = 16  # L
FRAMES_PER_CLIP = 32  # a clip ending at frame k covers k-31..k
FRAMES_PER_SAMPLE = 8  # face frames kept per clip
WINDOW_FRAMES = CLIPS_PER_WINDOW * FRAMES_PER_CLIP  # 512


def window_clip_ends(num_frames: int) -> np.ndarray:
  """End frames of the clips of every window of a video of `num_frames` frames.

  Args:
    num_frames: number of frames N of the video (>= 1).

  Returns:
    int array (num_windows, 16): row w holds the end frames of its 16 clips in
    time order (last column = the window end). Values above `num_frames` are
    padding clips. Every frame 1..N appears exactly once in the array.
  """
  if num_frames < 1:
    return np.zeros((0, CLIPS_PER_WINDOW), np.int64)
  offsets = FRAMES_PER_CLIP * np.arange(CLIPS_PER_WINDOW)  # 0, 32, ..., 480
  first_ends = []
  block_start = 1  # first clip end of the block
  while block_start <= num_frames:
    # 32 windows: first clip ends at block_start .. block_start + 31.
    for j in range(FRAMES_PER_CLIP):
      if block_start + j <= num_frames:
        first_ends.append(block_start + j)
    block_start += WINDOW_FRAMES
  first_ends = np.asarray(first_ends, np.int64)
  return first_ends[:, None] + offsets[None, :]


def select_frames(present: np.ndarray) -> np.ndarray:
  """Chooses the 8 face frames of one clip among its present frames.

  Args:
    present: increasing frame numbers (or indices) of the clip's present
      frames, at most 32 of them.

  Returns:
    8 entries of `present`, in time order, taken backwards from the last one:
    every 4th if 32 are present, every 3rd if 24-31, every 2nd if 16-23, the
    last 8 if 8-15; with 1-7 all of them then the last one repeated; an empty
    array if none is present (the clip's frames are zeros).
  """
  present = np.asarray(present)
  n = len(present)
  if n > FRAMES_PER_CLIP:
    raise ValueError(f'a clip has at most {FRAMES_PER_CLIP} frames, got {n}')
  if n == 0:
    return present[:0]
  if n < FRAMES_PER_SAMPLE:
    return np.concatenate([present, np.repeat(present[-1:], FRAMES_PER_SAMPLE - n)])
  if n == FRAMES_PER_CLIP:
    step = 4
  elif n >= 24:
    step = 3
  elif n >= 16:
    step = 2
  else:
    step = 1
  return present[::-1][::step][:FRAMES_PER_SAMPLE][::-1]


def window_frames(end_frames: np.ndarray) -> tuple[int, int]:
  """(first, last) frame a window's clips cover, from its clips' end frames (0 = padding clip; a
  window has at least one real clip)."""
  real = np.asarray(end_frames)[np.asarray(end_frames) > 0]
  return max(int(real.min()) - FRAMES_PER_CLIP + 1, 1), int(real.max())
