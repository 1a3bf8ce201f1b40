"""What predict writes and prints, from predictions made up for the purpose (no model): the CSV says
which modalities each row rests on, the summary warns where a video gives the model little to read,
the plot's legend and the overlay's marker stay legible, and the overlay keeps the audio on the
video's clock and the picture upright."""

import av
import numpy as np
import pytest
import video_fixtures  # tests/video_fixtures.py

from iaca_jax import face_video, faces, predict_outputs
from iaca_jax.predict_lib import VideoPrediction
from iaca_jax.preprocessing import audio as audio_lib

NUM_FRAMES = 30


def made_up(path: str, face: np.ndarray, silent: np.ndarray, values: float = 0.9, message: str = ''):
  """A VideoPrediction of the video at `path` with the given per-frame flags and constant values."""
  n = len(face)
  track = faces.FaceTrack(
    face.copy(),
    np.where(face[:, None], [[160.0, 120.0]], 0.0),
    np.where(face, 80.0, 0.0),
    np.zeros(n),
    np.ones(n, bool),
  )
  with face_video.open_video(path) as container:
    start = audio_lib.start_seconds(container.streams.video[0])
  video = face_video.VideoFaces(path, video_fixtures.FPS, 320, 240, start, track, 'mtcnn')
  values = np.full((n, 2), values)
  status = audio_lib.OK if not message else audio_lib.LATE_START
  return VideoPrediction(video, values, values, silent.copy(), status, message)


@pytest.fixture(scope='module')
def video(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('outputs') / 'face.mp4')
  frames, _ = video_fixtures.face_frames(NUM_FRAMES, (0, 0))
  video_fixtures.write_video(path, frames, video_fixtures.voice(NUM_FRAMES / video_fixtures.FPS))
  return path


def test_the_csv_tells_which_modalities_each_row_rests_on(video, tmp_path):
  face = np.arange(NUM_FRAMES) < 20
  silent = np.arange(NUM_FRAMES) >= 10
  path = predict_outputs.write_csv(made_up(video, face, silent), str(tmp_path / 'face.csv'))
  rows = np.loadtxt(path, delimiter=',', skiprows=1)
  np.testing.assert_array_equal(rows[:, 4], face)
  np.testing.assert_array_equal(rows[:, 5], ~silent)


def test_the_summary_warns_when_most_frames_have_no_face_or_neither_modality(video):
  n = NUM_FRAMES
  summary = lambda face, silent, message='': predict_outputs.summary(
    video, made_up(video, face, silent, message=message), ['/out/face.csv'], '/out'
  ).splitlines()
  both = summary(np.ones(n, bool), np.zeros(n, bool))
  assert both == [f'{video}: 30 frames (1.0 s), face in 100.0%, sound in 100.0%; wrote face.csv to /out']
  no_face = summary(np.zeros(n, bool), np.zeros(n, bool))
  assert len(no_face) == 2 and 'no face in 100% of the frames' in no_face[1] and 'audio alone' in no_face[1]
  nothing = summary(np.zeros(n, bool), np.ones(n, bool), f'the audio of {video} starts 2.43 s after')
  assert nothing[1] == '  warning: the audio of the video starts 2.43 s after'  # the path said once
  assert 'neither a face nor sound' in nothing[3] and '100%' in nothing[3]


def test_the_plot_legend_covers_no_curve(video):
  prediction = made_up(video, np.ones(NUM_FRAMES, bool), np.zeros(NUM_FRAMES, bool), values=0.95)
  fig = predict_outputs.figure(prediction)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
  assert legends
  for legend in legends:
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
      assert not box.overlaps(ax.get_window_extent(renderer)), 'the legend lies over the plot'


@pytest.mark.parametrize('background', [0, 255])
def test_the_overlay_marker_stands_out_on_dark_and_bright_frames(video, background):
  prediction = made_up(video, np.zeros(NUM_FRAMES, bool), np.zeros(NUM_FRAMES, bool), values=0.0)
  frame = np.full((240, 320, 3), background, np.uint8)
  drawn = predict_outputs._draw(frame, prediction, 0).astype(float)  # noqa: SLF001
  luma = drawn.mean(axis=-1)
  radius = max(20, 240 // 8)
  cx = cy = radius + 8
  inside = luma[cy - radius // 2, cx + radius // 2]  # inside the disc, off its axes
  rim = max(luma[cy, cx + radius + d] for d in (-1, 0, 1))
  # A drawing is legible where it differs from the frame around it by at least a third of the range.
  assert abs(inside - background) > 85 or abs(rim - background) > 85
  assert abs(rim - inside) > 85  # the rim stands out from the disc it bounds
  dot = drawn[cy, cx]  # valence = arousal = 0: the dot at the centre, red
  assert dot[0] > 150 and dot[1] < 100


def audio_envelope(path: str) -> np.ndarray:
  """RMS of each 0.1 s of the file's audio, on its video's clock."""
  with face_video.open_video(path) as container:
    start = audio_lib.start_seconds(container.streams.video[0])
  track = audio_lib.decode_audio(path, 16_000, video_start=start).samples
  return np.sqrt(np.mean(track[: len(track) // 1600 * 1600].reshape(-1, 1600) ** 2, axis=1))


@pytest.mark.parametrize('audio_start', [1.0, -0.5])
def test_the_overlay_keeps_the_audio_where_it_was_on_the_videos_clock(tmp_path, audio_start):
  frames, _ = video_fixtures.face_frames(60, (0, 0))
  source = str(tmp_path / 'shifted.mp4')
  video_fixtures.write_video(source, frames, video_fixtures.voice(2.0), audio_start=audio_start)
  prediction = made_up(source, np.ones(60, bool), np.zeros(60, bool))
  overlay = predict_outputs.write_overlay(prediction, str(tmp_path / 'overlay.mp4'))
  before, after = audio_envelope(source), audio_envelope(overlay)
  n = min(len(before), len(after))
  assert n >= 15
  if audio_start > 0:
    assert before[:9].max() < 1e-3 < before[11:n].min()  # silence until 1 s, then the voice
  np.testing.assert_allclose(after[:n], before[:n], atol=0.03)


def test_the_overlay_of_a_sideways_video_is_upright(tmp_path):
  frames, _ = video_fixtures.face_frames(NUM_FRAMES, (0, 0))
  source = str(tmp_path / 'phone.mp4')
  video_fixtures.write_video(source, frames, None, rotation=90)
  prediction = made_up(source, np.zeros(NUM_FRAMES, bool), np.zeros(NUM_FRAMES, bool))
  overlay = predict_outputs.write_overlay(prediction, str(tmp_path / 'overlay.mp4'))
  with av.open(overlay) as container:
    written = next(container.decode(video=0)).to_ndarray(format='rgb24')
  assert written.shape == frames[0].shape
  away = (slice(100, None), slice(100, None))  # away from the marker
  assert np.abs(written[away].astype(int) - frames[0][away]).mean() < 6
