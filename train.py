r"""Trains the IACA model. Thin entry point; the logic is in iaca_jax/train_lib.py.

  python train.py --config configs/synthetic_demo.py --workdir runs/demo [--config.key=value ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. On several hosts every
host runs the same command with --config.cluster.distributed=True (docs/SCALING.md).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from iaca_jax import cli, distributed, runtime, train_lib  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_flag('configs/default.py', 'Training configuration.')
flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, TensorBoard logs and results.', required=True
)


def main(argv):
  runtime.configure_process()  # before JAX starts its backends (iaca_jax/runtime.py)
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  cli.run_reporting_user_errors(lambda: distributed.initialize(FLAGS.config))  # before any device use
  new = not os.path.exists(os.path.expanduser(FLAGS.workdir))
  workdir = cli.run_reporting_user_errors(lambda: cli.check_writable_dir(FLAGS.workdir))
  try:
    result = cli.run_reporting_user_errors(lambda: train_lib.train_and_evaluate(FLAGS.config, workdir))
  finally:
    if new:  # a run refused before it wrote anything leaves no empty workdir either
      cli.remove_if_empty(workdir)
  logging.info('Best validation CCC_v + CCC_a = %.4f at step %d.', result['best_score'], result['best_step'])


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
