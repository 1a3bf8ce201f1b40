r"""Caches the frozen encoders' features of every window. Thin entry point; see iaca_jax/feature_cache.py.

  python cache_features.py --config configs/synthetic_demo.py \
      --config.dataset.data_dir=/tmp/tfds --config.dataset.features_dir=/tmp/features

Then train and evaluate with the same --config.dataset.features_dir.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402

from iaca_jax import cli, distributed, feature_cache, runtime  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_flag('configs/synthetic_demo.py', 'Config whose encoders to cache.')


def main(argv):
  runtime.configure_process()  # before JAX starts its backends (iaca_jax/runtime.py)
  del argv
  cli.run_reporting_user_errors(lambda: distributed.initialize(FLAGS.config))  # before any device use
  out = cli.run_reporting_user_errors(lambda: feature_cache.cache_features(FLAGS.config))
  if distributed.is_main_process():
    print(f'Cached encoder features written to {out}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
