"""The read-once views predict streams a video through: the windows they give equal the windows of
the whole crops and track in memory, and what they hold stays bounded however long the video."""

import numpy as np
import pytest

from iaca_jax import streaming
from iaca_jax.preprocessing import examples
from iaca_jax.preprocessing import mel as mel_lib

FPS = 10.0
SAMPLE_RATE = 8_000


def chunked(track: np.ndarray, rng: np.random.Generator):
  """The track in chunks of random lengths, as a decoder hands them out."""
  start = 0
  while start < len(track):
    size = int(rng.integers(1, 3000))
    yield track[start : start + size]
    start += size


def windows_of(video: examples.VideoInput) -> list:
  settings = mel_lib.mel_settings(SAMPLE_RATE)
  return list(examples.video_examples(video, settings, train=False))


@pytest.mark.parametrize('num_frames', [40, 1300])  # one window block; three (past frames 512, 1024)
def test_streamed_windows_equal_the_windows_of_the_whole_video(num_frames):
  rng = np.random.default_rng(num_frames)
  present = np.flatnonzero(rng.random(num_frames) < 0.8) + 1
  crops = {int(f): f'jpeg of {f}'.encode() for f in present}
  seconds = num_frames / FPS - 1.5  # the track ends before the video
  track = rng.normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32)
  whole = windows_of(examples.VideoInput('v', num_frames, FPS, crops, track))

  sliding_crops = streaming.SlidingCrops(present, iter(crops.items()))
  bounds = np.round(np.arange(num_frames + 1) * SAMPLE_RATE / FPS).astype(np.int64)
  keep = int(np.ceil(streaming.KEEP_FRAMES * SAMPLE_RATE / FPS))
  audio = streaming.SlidingAudio(chunked(track, rng), keep, bounds)
  streamed = windows_of(examples.VideoInput('v', num_frames, FPS, sliding_crops, audio))

  assert [k for k, _ in streamed] == [k for k, _ in whole]
  for (_, a), (_, b) in zip(streamed, whole):
    assert a['video'] == b['video']
    np.testing.assert_array_equal(a['audio'], b['audio'])
  assert sliding_crops.held <= streaming.KEEP_FRAMES + 1
  assert len(audio._buffer) <= max(4 * keep, 1 << 17)  # noqa: SLF001 - the bound is the point


def test_silent_frames_are_those_without_sound():
  num_frames, per_frame = 50, SAMPLE_RATE / FPS
  rng = np.random.default_rng(0)
  track = rng.normal(0, 0.1, int(40.5 * per_frame)).astype(np.float32)  # ends inside frame 41
  track[int(10 * per_frame) : int(20 * per_frame)] = 0.0  # frames 11-20 silent
  track[int(25 * per_frame) : int(25.5 * per_frame)] = 0.0  # half of frame 26: still sound
  bounds = np.round(np.arange(num_frames + 1) * per_frame).astype(np.int64)
  audio = streaming.SlidingAudio(chunked(track, rng), 100, bounds)
  audio[0:500]
  audio.read_all()
  expected = np.zeros(num_frames, bool)
  expected[10:20] = True
  expected[41:] = True  # past the track's end; frame 41 has half its samples (RMS ~0.07): sound
  np.testing.assert_array_equal(audio.silent_frames(1e-4), expected)
  assert audio.end == len(track)


def test_reading_back_past_what_was_released_is_an_error():
  crops = streaming.SlidingCrops([1, 2, 900], iter([(1, b'a'), (2, b'b'), (900, b'c')]), keep=100)
  assert crops[900] == b'c' and crops.held == 1
  with pytest.raises(streaming.ReleasedError, match='frame 1 '):
    crops[1]
  audio = streaming.SlidingAudio(iter([np.ones(1000, np.float32)] * 5), 200, np.array([0, 5000]))
  np.testing.assert_array_equal(audio[4000:4100], np.ones(100))
  with pytest.raises(streaming.ReleasedError, match='samples from 0 '):
    audio[0:10]
  assert len(audio[4900:6000]) == 100  # the track ends at 5000
