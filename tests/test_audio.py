"""A video's audio on the video's clock (`preprocessing.audio`): audio that starts late is zeros until
it starts and is reported, audio that starts before the first frame is cut."""

import av
import numpy as np
import pytest
import video_fixtures  # tests/video_fixtures.py

from iaca_jax.preprocessing import audio as audio_lib

RATE = 16_000


def decode(path: str) -> audio_lib.AudioTrack:
  with av.open(path) as container:
    start = audio_lib.start_seconds(container.streams.video[0])
  return audio_lib.decode_audio(path, RATE, video_start=start, expected_duration=2.0)


def voiced(samples: np.ndarray) -> np.ndarray:
  """Whether each 0.1 s of `samples` has sound."""
  blocks = samples[: len(samples) // 1600 * 1600].reshape(-1, 1600)
  return np.sqrt(np.mean(blocks**2, axis=1)) > 1e-3


@pytest.mark.parametrize('audio_start', [0.0, 1.2, -0.5])
def test_the_audio_sits_on_the_videos_clock(tmp_path, audio_start):
  frames, _ = video_fixtures.face_frames(60, (0, 0))  # 2 s
  path = str(tmp_path / 'video.mp4')
  video_fixtures.write_video(path, frames, video_fixtures.voice(3.0), audio_start=audio_start)
  track = decode(path)
  sound = voiced(track.samples)
  late = max(audio_start, 0)
  first = int(round(late * 10))
  assert not sound[: max(first - 1, 0)].any() and sound[first + 1 : 20].all()
  if late > audio_lib.TRUNCATION_TOLERANCE_S:
    assert track.status == audio_lib.LATE_START
    assert f'{path} starts {late - 0.064:.2f} s after the first video frame' in track.message
  else:
    assert track.status == audio_lib.OK and track.message == ''
  if audio_start < 0:  # the first 0.5 s of the voice are before the video: cut
    expected = video_fixtures.voice(3.0, RATE)[int(0.5 * RATE) :][: 1600 * 10]
    np.testing.assert_allclose(voiced(track.samples)[:10], voiced(expected)[:10])
