"""Window schedule and frame selection (docs/DESIGN.md §2) against hand-worked expectations."""

import numpy as np
import pytest

from iaca_jax.preprocessing import windows


def _authors_schedule(num_frames):
  """The authors' loop (from their dataset code): window end 481, +1 for 32 windows, then +481."""
  out, end, counter = [], 481, 0
  while end < num_frames + 481:
    out.append([end - 32 * c for c in range(15, -1, -1)])
    counter += 1
    if counter > 31:
      end, counter = end + 481, 0
    else:
      end += 1
  return np.array(out, dtype=np.int64).reshape(-1, 16)


@pytest.mark.parametrize(
  'present, expected',
  [
    (range(1, 33), [4, 8, 12, 16, 20, 24, 28, 32]),  # all 32: every 4th back from k
    (range(1, 32), [10, 13, 16, 19, 22, 25, 28, 31]),  # 31: every 3rd back from the last
    (range(1, 25), [3, 6, 9, 12, 15, 18, 21, 24]),  # 24: every 3rd
    (range(1, 24), [9, 11, 13, 15, 17, 19, 21, 23]),  # 23: every 2nd, the last 8
    (range(1, 21), [6, 8, 10, 12, 14, 16, 18, 20]),  # 20: every 2nd
    (range(1, 17), [2, 4, 6, 8, 10, 12, 14, 16]),  # 16: every 2nd
    (range(1, 13), [5, 6, 7, 8, 9, 10, 11, 12]),  # 12: the last 8
    (range(1, 9), [1, 2, 3, 4, 5, 6, 7, 8]),  # 8: all
    (range(1, 6), [1, 2, 3, 4, 5, 5, 5, 5]),  # 5: all, then repeat the last
    ([7], [7] * 8),  # 1
    ([], []),  # none: the clip stays zeros
    ([3, 7, 9, 12, 20, 21, 22, 25, 30], [7, 9, 12, 20, 21, 22, 25, 30]),  # 9 with gaps
    # 17 present with gaps: every 2nd *present* frame back from the last one.
    ([1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24], [3, 6, 9, 12, 15, 18, 21, 24]),
    # 26 present (frames 7..32): every 3rd back from 32.
    (range(7, 33), [11, 14, 17, 20, 23, 26, 29, 32]),
  ],
)
def test_select_frames(present, expected):
  got = windows.select_frames(np.asarray(list(present), dtype=np.int64))
  assert got.tolist() == list(expected)


def test_select_frames_rejects_more_than_a_clip():
  with pytest.raises(ValueError):
    windows.select_frames(np.arange(33))


def test_window_schedule_hand_worked():
  ends = windows.window_clip_ends(600)
  assert ends.shape == (64, 16)
  assert ends[0].tolist() == list(range(1, 482, 32))  # first clip ends at frame 1
  assert ends[31].tolist() == list(range(32, 513, 32))  # window end 512
  assert ends[32].tolist() == list(range(513, 994, 32))  # jump by 481: window end 993
  assert ends[63, -1] == 1024
  # Consecutive windows of a block are shifted by one frame.
  np.testing.assert_array_equal(ends[1:32] - ends[:31], np.ones((31, 16)))


@pytest.mark.parametrize(
  'n, num_windows',
  [
    (1, 1),
    (2, 2),
    (31, 31),
    (32, 32),
    (33, 32),
    (512, 32),
    (513, 33),
    (544, 64),
    (1025, 65),
  ],
)
def test_window_counts(n, num_windows):
  """A window exists while its first clip ends inside the video."""
  assert windows.window_clip_ends(n).shape == (num_windows, 16)


@pytest.mark.parametrize('n', [1, 7, 31, 32, 33, 100, 480, 511, 512, 513, 700, 1024, 1500, 2049])
def test_every_frame_is_the_end_of_exactly_one_clip(n):
  ends = windows.window_clip_ends(n)
  np.testing.assert_array_equal(ends, _authors_schedule(n))
  real = np.sort(ends[ends <= n])
  np.testing.assert_array_equal(real, np.arange(1, n + 1))
