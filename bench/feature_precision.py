r"""What storing the cached encoder features in fp16 or bf16 would cost: a trained model's validation
CCC and predictions on features rounded to each format, against float32, and the bytes per window.

    python bench/feature_precision.py --config configs/synthetic_demo.py --workdir results/demo/rjca_iaca \
        [--config.dataset.features_dir=...] [--out=bench/results/feature_precision.json]
"""

from __future__ import annotations

import json
import os
import sys

import ml_dtypes
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iaca_jax import evaluate_lib, inference, metrics, runtime  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/synthetic_demo.py', 'The training configuration.')
flags.DEFINE_string('workdir', None, 'A trained run on cached features.', required=True)
flags.DEFINE_string('split', 'validation', 'Split to score.')
flags.DEFINE_string('out', '', 'JSON result file.')
FLAGS = flags.FLAGS
FORMATS = {'float32': np.float32, 'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16}


def rounded(batches, dtype):
  for batch in batches:
    yield {k: v.astype(dtype).astype(np.float32) if k.endswith('_features') else v for k, v in batch.items()}


def main(argv):
  del argv
  runtime.configure_process()  # as evaluate.py does, before any device is used
  evaluator = evaluate_lib.Evaluator(FLAGS.config, FLAGS.workdir)
  batches = evaluator.data.eval_batches(FLAGS.split)
  first = next(iter(batches))
  values = {k: int(np.prod(v.shape[1:])) for k, v in first.items() if k.endswith('_features')}
  result = dict(workdir=FLAGS.workdir, split=FLAGS.split, values_per_window=values, formats={})
  reference = None
  for name, dtype in FORMATS.items():
    clips = inference.predict_split(evaluator.trainer, evaluator.variables, rounded(batches, dtype))
    scores = metrics.score_clips(clips)
    entry = {k: scores[k] for k in ('ccc_valence', 'ccc_arousal', 'ccc_mean')}
    entry['feature_bytes_per_window'] = sum(values.values()) * np.dtype(dtype).itemsize
    if reference is None:
      reference = (clips['predictions'], scores)
    else:
      entry['max_abs_prediction_difference'] = float(np.abs(clips['predictions'] - reference[0]).max())
      entry['ccc_mean_difference'] = scores['ccc_mean'] - reference[1]['ccc_mean']
    result['formats'][name] = entry
    print(name, entry, flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
