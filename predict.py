r"""Per-frame valence and arousal for any video file. Thin entry point; see iaca_jax/predict_lib.py.

  python predict.py --workdir=results/demo/runs/rjca_iaca VIDEO [VIDEO ...] --output_dir=predictions
  python predict.py --workdir=/ckpt/converted VIDEO ...        # converted weights (docs/CONVERT.md)

--workdir is a training run (its config.json and best checkpoint) or a directory of converted
weights (its conversion.json; the rest of the settings from configs/default.py). Per video it writes
<name>.csv (frame,time_s,valence,arousal,face,audio), <name>.png (the plot), with --overlay <name>.mp4
and with --format=abaw <name>.txt (the challenge layout). A video that cannot be used is reported in
one line and the others still get their files; the exit status is then 1.
"""

import os
import sys
import time

STARTED = time.perf_counter()  # start-up is timed from here, before the heavy imports

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from configs import default  # noqa: E402
from iaca_jax import cli, face_video, faces, predict_lib, predict_outputs, runtime  # noqa: E402
from iaca_jax.preprocessing.errors import reason  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training run, or a directory of converted weights.', required=True)
flags.DEFINE_string('output_dir', 'predictions', 'Where the files of every video are written.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint of a run to load.')
flags.DEFINE_enum('format', 'csv', ['csv', 'abaw'], 'abaw: also the challenge file layout per video.')
flags.DEFINE_bool('overlay', False, 'Also write the video with the face box and a valence-arousal marker.')
flags.DEFINE_bool('plot', True, 'Write the plot of valence and arousal over time.')
flags.DEFINE_enum(
  'detector',
  faces.DEFAULT_DETECTOR,
  faces.DETECTORS,
  'mtcnn: landmarks and template alignment; haar: faster, coarser.',
)
flags.DEFINE_integer('detect_every', faces.DEFAULT_DETECT_EVERY, 'Run the face detector every N frames.')
flags.DEFINE_integer('detect_size', faces.DEFAULT_DETECT_SIZE, 'Longer side of the image the detector sees.')
flags.DEFINE_float(
  'crop_scale',
  None,
  'Crop side over the template crop (mtcnn, default 1) or the face box (haar, default 1.25).',
)
flags.DEFINE_integer('batch_size', 0, 'Windows per model call (default: the device count).')


def main(argv):
  runtime.configure_process()  # before JAX starts its backends (iaca_jax/runtime.py)
  videos = argv[1:]
  logging.set_verbosity(logging.WARNING)
  if not videos:
    print('error: name at least one VIDEO file (see --helpfull)', file=sys.stderr, flush=True)
    sys.exit(2)
  cli.run_reporting_user_errors(lambda: predict(videos))


def predict(videos):
  if FLAGS.detect_every < 1:
    raise ValueError(f'--detect_every must be >= 1, got {FLAGS.detect_every}')
  output_dir = os.path.abspath(os.path.expanduser(FLAGS.output_dir))
  kinds = ['csv'] + ['plot'] * FLAGS.plot + ['abaw'] * (FLAGS.format == 'abaw') + ['overlay'] * FLAGS.overlay
  plans = predict_outputs.plan_outputs(videos, output_dir, kinds)  # no output replaces an input
  cli.check_writable_dir(output_dir, 'output_dir')
  failed = {}
  for path in videos:  # what can be checked before the model loads: each bad video one line
    try:
      face_video.check_video(path)
    except face_video.VideoError as e:
      failed[path] = report_failure(e)
  if len(failed) < len(videos):
    model = predict_lib.load_model(FLAGS.workdir, which=FLAGS.checkpoint, base_config=default.get_config())
    detector = faces.make_detector(FLAGS.detector, FLAGS.detect_size)
    print(
      f'Model: {model.source}; {detector.name} face detector; ready in {time.perf_counter() - STARTED:.1f} s'
    )
  for path, plan in zip(videos, plans):
    if path not in failed:
      try:
        predict_one(model, detector, path, plan, output_dir)
      except cli.USER_ERRORS as e:  # the next video still gets its outputs
        failed[path] = report_failure(e)
  if failed:
    done = len(videos) - len(failed)
    raise PredictFailed(f'{len(failed)} of {len(videos)} videos failed ({", ".join(failed)}); {done} done')


class PredictFailed(ValueError):
  """Some videos of the command failed (each reported as it failed); the others have their outputs."""


def report_failure(error: Exception) -> str:
  message = reason(error)
  print(f'error: {message}', file=sys.stderr, flush=True)
  return message


def predict_one(model, detector, path: str, plan: dict[str, str], output_dir: str) -> None:
  prediction = predict_lib.predict_video(
    model,
    path,
    batch_size=FLAGS.batch_size,
    detector=detector,
    detect_every=FLAGS.detect_every,
    crop_scale=FLAGS.crop_scale,
  )
  written = [WRITERS[kind](prediction, out) for kind, out in plan.items()]
  print(predict_outputs.summary(path, prediction, written, output_dir), flush=True)


WRITERS = {
  'csv': predict_outputs.write_csv,
  'plot': predict_outputs.plot,
  'abaw': predict_outputs.write_abaw,
  'overlay': predict_outputs.write_overlay,
}


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
