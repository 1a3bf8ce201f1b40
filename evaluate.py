r"""Evaluates a trained IACA model. Thin entry point; the logic is in iaca_jax/evaluate_lib.py.

  python evaluate.py --config configs/synthetic_demo.py --workdir runs/demo            # CCC on validation
  python evaluate.py ... --missing_audio          # docs/DESIGN.md §5 sweep: 10-90% of clips silenced, 3 seeds
  python evaluate.py ... --attention_figure=VIDEO # faces, spectrogram and attention heat strips
  python evaluate.py ... --submission             # the challenge file for the test split
  python evaluate.py ... --protocol=authors       # score as the authors' released code does

A run of K replicas (--config.replicas.count=K, as trained) is scored replica by replica, with the mean
and its 95% t-interval over replicas; its submission file holds the replicas' mean prediction.

The settings are the run's, recorded in <workdir>/config.json; --config.<key> overrides may change what
is evaluated and how (the dataset, its data_dir and features_dir, batch_size, eval_split, model.kernels,
model.dtype); one that would build another model (a model setting, replicas.count) is an error. Results
go to --output_dir (default <workdir>/eval).
"""

import builtins
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from iaca_jax import cli, distributed, evaluate_lib, reports, runtime  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_flag('configs/default.py', 'The training configuration.')
flags.DEFINE_string('workdir', None, 'The training run to evaluate.', required=True)
flags.DEFINE_string('output_dir', None, 'Where results are written (default <workdir>/eval).')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint to load.')
flags.DEFINE_string('split', None, 'Split to score (default: config.dataset.eval_split).')
flags.DEFINE_bool('missing_audio', False, 'Run the missing-audio sweep.')
flags.DEFINE_list(
  'missing_fractions',
  [str(f) for f in evaluate_lib.MISSING_AUDIO_FRACTIONS],
  'Shares of clips whose audio is silenced.',
)
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of the missing-audio sweep.')
flags.DEFINE_string('label', 'model', 'Name of this model in tables and plots.')
flags.DEFINE_string('attention_figure', None, 'Draw the attention-score figure for this video.')
flags.DEFINE_enum(
  'protocol',
  'challenge',
  ['challenge', 'authors'],
  "Frames scored: the challenge's (labelled frames only) or the authors' released code's (unlabelled "
  'frames kept as (0, 0) pairs; docs/DESIGN.md §5).',
)
flags.DEFINE_bool('submission', False, 'Write the challenge submission file for the test split.')
flags.DEFINE_string('test_split', 'test', 'Split used for --submission.')


def main(argv):
  runtime.configure_process()  # before JAX starts its backends (iaca_jax/runtime.py)
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.run_reporting_user_errors(lambda: distributed.initialize(FLAGS.config))  # before any device use
  cli.run_reporting_user_errors(evaluate)


def evaluate():
  print = builtins.print if distributed.is_main_process() else lambda *args: None  # process 0 reports
  output_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, 'eval')
  config, notes = evaluate_lib.run_settings(FLAGS.workdir, FLAGS.config, cli.config_overrides())
  for note in notes:
    print(f'note: {note}')
  split = FLAGS.split or config.dataset.eval_split
  evaluator = evaluate_lib.Evaluator(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.protocol)
  steps = evaluator.steps if evaluator.replicas > 1 else evaluator.step
  print(f'Restored the {FLAGS.checkpoint} checkpoint (step {steps}) from {FLAGS.workdir}.')
  scores = evaluate_lib.score_split(evaluator, split, output_dir)
  print(
    f'{split} ({FLAGS.protocol} protocol): CCC_v={scores["ccc_valence"]:.4f} '
    f'CCC_a={scores["ccc_arousal"]:.4f} mean={scores["ccc_mean"]:.4f}'
  )
  if evaluator.replicas > 1:
    print(reports.replica_table(scores['replicas']))
  else:
    print(reports.metrics_table(scores))
  if FLAGS.missing_audio:
    result = evaluate_lib.missing_audio_sweep(
      evaluator,
      split,
      output_dir,
      [float(f) for f in FLAGS.missing_fractions],
      [int(s) for s in FLAGS.seeds],
      FLAGS.label,
    )
    print(reports.missing_audio_table([result]))
  if FLAGS.attention_figure:
    print('Wrote', evaluate_lib.attention_figure(evaluator, FLAGS.attention_figure, split, output_dir))
  if FLAGS.submission:
    print('Wrote', evaluate_lib.write_submission(evaluator, FLAGS.test_split, output_dir))
  print(f'Results in {output_dir}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
