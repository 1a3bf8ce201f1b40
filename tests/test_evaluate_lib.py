"""Evaluation end to end: a trained tiny run restored, the missing-audio sweep, evaluate.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from iaca_jax import evaluate_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_evaluate(workdir: str, *args: str) -> subprocess.CompletedProcess:
  """evaluate.py on configs/tiny.py in a fresh process, as a user runs it."""
  cmd = [
    sys.executable,
    'evaluate.py',
    '--config',
    os.path.join(REPO, 'configs/tiny.py'),
    '--workdir',
    workdir,
    *args,
  ]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.heavy
def test_evaluate_end_to_end_with_missing_audio_and_submission(one_epoch_run, tiny, tmp_path):
  config, workdir = one_epoch_run.config, one_epoch_run.workdir
  evaluator = evaluate_lib.Evaluator(config, workdir)
  clips = evaluator.predict('validation', silence_fraction=0.5, seed=3)
  real = clips['end_frame'] > 0
  assert abs(clips['silenced'][real].mean() - 0.5) < 0.02
  clean = evaluator.predict('validation')
  changed = np.abs(clips['predictions'] - clean['predictions']).max(-1) > 1e-6
  assert changed[clips['silenced']].mean() > 0.9  # silencing reaches the model
  out = str(tmp_path / 'eval')
  # The run's settings come from its config.json (configs/tiny.py reads no cached features): only what
  # is evaluated, and how, may be changed (batch_size); a training setting is ignored, and said so.
  run = run_evaluate(
    workdir,
    '--config.dataset.batch_size=16',
    '--config.training.num_epochs=7',
    '--output_dir',
    out,
    '--missing_audio',
    '--missing_fractions=0.5',
    '--seeds=0',
    '--submission',
    '--attention_figure=syn003',
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.splitlines()[:2] == [
    "note: evaluating with settings other than the run's: dataset.batch_size=16 (the run: 8)",
    'note: ignored (training only): training.num_epochs=7 (the run: 1)',
  ], run.stdout
  scores = json.load(open(os.path.join(out, 'metrics_validation.json')))
  assert np.isfinite(scores['ccc_mean']) and scores['n_frames'] > 0
  sweep = json.load(open(os.path.join(out, 'missing_audio.json')))
  assert abs(sweep['rows'][0]['silenced_share_mean'] - 0.5) < 0.02
  assert os.path.getsize(os.path.join(out, 'missing_audio.png')) > 0
  assert os.path.getsize(os.path.join(out, 'attention_syn003.png')) > 0
  lines = open(os.path.join(out, 'submission_test.csv')).read().splitlines()
  assert lines[0] == 'image_location,valence,arousal'
  test_video = [v for v, s in tiny.side.items() if s['split'] == 'test'][0]
  assert len(lines) - 1 == tiny.side[test_video]['num_frames']
  assert lines[1].startswith(f'{test_video}/00001.jpg,')


def test_evaluate_without_a_checkpoint_is_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'empty'
  workdir.mkdir()
  result = run_evaluate(str(workdir))
  assert result.returncode == 1 and 'error: No best checkpoint' in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and os.listdir(workdir) == []


def test_evaluate_with_other_model_settings_than_the_run_names_them_in_one_line(one_epoch_run, tmp_path):
  run = run_evaluate(
    one_epoch_run.workdir,
    '--config.model.gating=none',
    '--config.replicas.count=2',
    '--output_dir',
    str(tmp_path),
  )
  assert run.returncode == 1 and 'Traceback' not in run.stderr, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1] == (
    "error: the run was trained with other model settings than the command line gives: model.gating='none' "
    "(the run: 'iaca'), replicas.count=2 (the run: 1). Its settings come from its config.json: leave these out "
    "or give the run's values"
  )
  assert os.listdir(tmp_path) == []


def test_a_counterfactual_prediction_retraces_the_model_under_its_interceptor(one_epoch_run):
  """`predict_each_intervened` must trace the model anew (the compiled steps are cached per model):
  with the stage-2 audio weight scaled by 0 every audio weight is 0 and the predictions move; the
  plain evaluation before and after is untouched."""
  from iaca_jax import gate_analysis  # noqa: PLC0415

  config, workdir = one_epoch_run.config, one_epoch_run.workdir
  split = config.dataset.eval_split
  plain = evaluate_lib.Evaluator(config, workdir, 'best').predict_each(split)[0]
  (forced,) = evaluate_lib.predict_each_intervened(
    config, workdir, split, gate_analysis.scale_stage2_audio(0.0)
  )
  after = evaluate_lib.Evaluator(config, workdir, 'best').predict_each(split)[0]
  real = plain['end_frame'] > 0
  assert (plain['gate_modality'][..., 0][real] > 0).all()
  np.testing.assert_array_equal(forced['gate_modality'][..., 0][real], 0.0)
  np.testing.assert_allclose(forced['gate_modality'][..., 1][real], 1.0)
  assert np.abs(forced['predictions'] - plain['predictions'])[real].max() > 1e-4
  np.testing.assert_array_equal(after['predictions'], plain['predictions'])
