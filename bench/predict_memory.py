r"""predict.py's peak memory over a video's length, and its start-up with and without JAX's persistent
compilation cache.

    .venv/bin/python bench/predict_memory.py [--minutes=1,10,60] [--fps=10] [--checkout=.]

- memory: a test video per length in --minutes (320x240 at --fps, scikit-image's astronaut moving
  across the frame and leaving it for 2 s of every 40, a synthetic voice; written frame by frame), and
  predict.py of the --checkout given (default this one) run on each with a demo-model run
  (configs/synthetic_demo.py, untrained: memory does not depend on the weights), writing the CSV, the
  plot and the overlay, as a child process: its peak RSS (`wait4`) and seconds.
- start-up: predict.py on the first video (--startup_seconds long), the compilation cache off
  (IACA_JIT_CACHE=0), cold (an empty cache folder) and warm (the same folder again), each twice in
  turn: seconds to the "ready" line and to the end of the command.
Results: --out (bench/results/predict_memory_cpu.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import av  # noqa: E402
import common  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import video_fixtures  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from configs import synthetic_demo  # noqa: E402
from iaca_jax import runtime  # noqa: E402

flags.DEFINE_list('minutes', ['1', '10', '60'], 'Video lengths in minutes.')
flags.DEFINE_integer('fps', 10, 'Frame rate of the test videos.')
flags.DEFINE_float('startup_seconds', 10.0, 'Length of the clip the start-up is measured on.')
flags.DEFINE_bool('startup', True, 'Also measure the start-up with and without the compilation cache.')
flags.DEFINE_string('checkout', ROOT, "Root of the checkout whose predict.py runs (e.g. an older commit's).")
flags.DEFINE_string('work_dir', '', 'Where the videos and the run go (default: a temporary folder).')
flags.DEFINE_string(
  'out', os.path.join(ROOT, 'bench', 'results', 'predict_memory_cpu.json'), 'JSON result file.'
)
FLAGS = flags.FLAGS

SIZE = (320, 240)
HEAD = 110  # pixels


def write_long_video(path: str, seconds: float, fps: int) -> None:
  """The test video, one frame in memory at a time (written under another name, renamed when complete)."""
  partial = path + '.partial.mp4'
  _write_long_video(partial, seconds, fps)
  os.replace(partial, path)


def _write_long_video(path: str, seconds: float, fps: int) -> None:
  width, height = SIZE
  head = cv2.resize(video_fixtures.data.astronaut()[video_fixtures.FACE_REGION], (HEAD, HEAD))
  voice = video_fixtures.voice(10.0)  # repeated
  rate = video_fixtures.SAMPLE_RATE
  with av.open(path, 'w') as out:
    video = out.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = width, height, 'yuv420p'
    video.options = {'preset': 'veryfast'}
    sound = out.add_stream('aac', rate=rate)
    sound.layout = 'mono'
    frames = int(seconds * fps)
    samples_per_frame = rate / fps
    written = 0
    for i in range(frames):
      t = i / fps
      rgb = np.full((height, width, 3), 128, np.uint8)
      if t % 40 >= 2:  # 2 s of every 40 without a face
        x = int((width - HEAD) * (0.5 + 0.45 * np.sin(2 * np.pi * t / 13)))
        y = int((height - HEAD) * (0.5 + 0.3 * np.sin(2 * np.pi * t / 7)))
        rgb[y : y + HEAD, x : x + HEAD] = head
      frame = av.VideoFrame.from_ndarray(rgb, format='rgb24')
      frame.pts = i
      out.mux(video.encode(frame))
      upto = int(round((i + 1) * samples_per_frame))
      while written + 1024 <= upto:
        start = written % (len(voice) - 1024)
        chunk = av.AudioFrame.from_ndarray(voice[None, start : start + 1024], format='flt', layout='mono')
        chunk.sample_rate, chunk.pts, chunk.time_base = rate, written, Fraction(1, rate)
        out.mux(sound.encode(chunk))
        written += 1024
    out.mux(video.encode(None))
    out.mux(sound.encode(None))


def run_predict(run: str, video: str, output_dir: str, env: dict | None = None, overlay: bool = True) -> dict:
  """predict.py of --checkout on `video` as a child process: its peak RSS, seconds and ready line."""
  log = os.path.join(output_dir + '.log')
  args = [sys.executable, 'predict.py', f'--workdir={run}', video, f'--output_dir={output_dir}']
  start = time.perf_counter()
  with open(log, 'w') as out:
    child = subprocess.Popen(
      args + ['--overlay'] * overlay,
      cwd=FLAGS.checkout,
      stdout=out,
      stderr=subprocess.STDOUT,
      env=dict(os.environ, PYTHONPATH=FLAGS.checkout, **(env or {})),
    )
    _, status, usage = os.wait4(child.pid, 0)
  seconds = time.perf_counter() - start
  text = open(log).read()
  if status != 0:
    raise RuntimeError(f'predict.py failed on {video}:\n{text[-3000:]}')
  ready = re.search(r'ready in ([0-9.]+) s', text)
  return dict(
    peak_rss_gb=round(usage.ru_maxrss / 2**20, 3),  # kB on Linux
    seconds=round(seconds, 1),
    ready_s=float(ready.group(1)) if ready else None,
  )


def startup(run: str, video: str, work_dir: str) -> dict:
  """Cache off, cold and warm, in turn twice: seconds to the ready line and to the end."""
  cache = os.path.join(work_dir, 'jit_cache')
  rows = {'off': [], 'cold': [], 'warm': []}
  for round_ in range(2):
    for mode in rows:
      if mode == 'cold':
        shutil.rmtree(cache, ignore_errors=True)
      env = {'IACA_JIT_CACHE': '0'} if mode == 'off' else {'JAX_COMPILATION_CACHE_DIR': cache}
      out = os.path.join(work_dir, f'startup_{mode}_{round_}')
      rows[mode].append(run_predict(run, video, out, env, overlay=False))
      print(f'start-up, cache {mode}: {json.dumps(rows[mode][-1])}', flush=True)
  return rows


def main(argv):
  del argv
  runtime.configure_process()
  logging.set_verbosity(logging.WARNING)
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix='iaca_bench_predict_memory_')
  os.makedirs(work_dir, exist_ok=True)
  run = os.path.join(work_dir, 'demo_run')
  if not os.path.isdir(run):  # made under another name, renamed when complete
    shutil.rmtree(run + '.partial', ignore_errors=True)
    os.replace(common.make_run(run + '.partial', synthetic_demo.get_config()), run)
  result = {
    'machine': common.machine(),
    'load_average_before': common.load_average(),
    'checkout': FLAGS.checkout,
    'checkout_commit': common.git_commit(FLAGS.checkout),
    'video': f'{SIZE[0]}x{SIZE[1]} at {FLAGS.fps} fps',
    'memory': [],
  }
  if FLAGS.startup:
    clip = os.path.join(work_dir, f'clip_{FLAGS.startup_seconds:g}s.mp4')
    write_long_video(clip, FLAGS.startup_seconds, FLAGS.fps)
    result['startup'] = startup(run, clip, work_dir)
  for minutes in map(float, FLAGS.minutes):
    path = os.path.join(work_dir, f'video_{minutes:g}min.mp4')
    if not os.path.exists(path):
      write_long_video(path, minutes * 60, FLAGS.fps)
    row = dict(minutes=minutes, frames=int(minutes * 60 * FLAGS.fps))
    row.update(run_predict(run, path, os.path.join(work_dir, f'out_{minutes:g}min')))
    result['memory'].append(row)
    print(f'memory: {json.dumps(row)}', flush=True)
  common.finish(result, FLAGS.out)


if __name__ == '__main__':
  app.run(main)
