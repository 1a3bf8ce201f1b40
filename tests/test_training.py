"""The training loop, checkpoints, resumption and evaluation end to end on the tiny synthetic set
(cached features of tiny frozen encoders, so each run takes seconds)."""

import collections
import fcntl
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny as tiny_config
from iaca_jax import evaluate_lib, evaluation, feature_cache, input_pipeline, train_lib
from iaca_jax.checkpoints import Checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data_dir, features_dir=''):
  config = tiny_config.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.features_dir = features_dir
  return config


@pytest.fixture(scope='session')
def cached(tiny):
  """Cached tiny-encoder features of the tiny set, written once per session."""
  features_dir = str(tiny.root / 'features')
  with open(features_dir + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(features_dir, 'dataset_info.json')):
      feature_cache.cache_features(make_config(tiny.data_dir, features_dir))
  return make_config(tiny.data_dir, features_dir)


def test_feature_cache_holds_every_window_with_its_labels(tiny, cached):
  source = input_pipeline.get_builder('synthetic_av', tiny.data_dir)
  features = input_pipeline.get_builder(cached.dataset.features_dir)
  for split in ('train', 'validation', 'test'):
    assert features.info.splits[split].num_examples == source.info.splits[split].num_examples
  def windows(name, data_dir=None, keys=('labels', 'end_frame', 'video_name')):
    out = {}
    for batch in input_pipeline.create_eval_dataset(name, data_dir, global_batch_size=4, split='validation',
                                                     process_index=0, process_count=1):
      for i in np.flatnonzero(batch['valid_window']):   # tfds shuffles on write: match windows by key
        out[(batch['video_name'][i], int(batch['end_frame'][i].max()))] = {k: batch[k][i] for k in batch}
    return out
  src = windows('synthetic_av', tiny.data_dir)
  out = windows(cached.dataset.features_dir)
  assert src.keys() == out.keys()
  for key, window in src.items():
    for name in ('labels', 'mask', 'end_frame', 'frame_labels', 'frame_mask', 'corrupt_video', 'corrupt_audio'):
      np.testing.assert_array_equal(window[name], out[key][name])
  assert out[key]['video_features'].shape == (16, 2, 2, 32) and out[key]['audio_features'].shape == (16, 32)


def test_loss_falls_on_the_tiny_set(cached):
  config = cached
  config.learning_rate = 3e-3
  data = train_lib.DataConfig(config)
  model = train_lib.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  steps = data.steps_per_epoch(config)
  state = train_lib.create_train_state(config, model, data, trainer, train_lib.make_optimizer(config, steps))
  losses = []
  for epoch in range(6):
    for batch in data.train_batches(config, epoch=epoch):
      state, metrics = trainer.train_step(state, trainer.shard_batch(batch), jax.random.key(0))
      losses.append(float(metrics['loss']))
  first, last = np.mean(losses[:steps]), np.mean(losses[-steps:])
  assert np.isfinite(losses).all()
  assert last < first - 0.1, (first, last)


def final_params(workdir):
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  step = checkpoints.latest_step()
  args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  restored = checkpoints.latest.restore(step, args=args)
  checkpoints.close()
  return step, jax.tree.map(np.asarray, restored['state']['params'])


def test_resumed_run_equals_uninterrupted_run(cached, tmp_path):
  config = cached
  config.num_epochs, config.checkpoint_every_steps, config.log_every_steps = 1, 5, 5
  straight = str(tmp_path / 'straight')
  train_lib.train_and_evaluate(config, straight)
  resumed = str(tmp_path / 'resumed')
  config.max_steps = 5                  # mid-epoch: the resumed run must skip the batches already seen
  train_lib.train_and_evaluate(config, resumed)
  assert final_params(resumed)[0] == 5
  config.max_steps = -1
  result = train_lib.train_and_evaluate(config, resumed)
  step_a, params_a = final_params(straight)
  step_b, params_b = final_params(resumed)
  assert step_a == step_b == result['steps'] == train_lib.DataConfig(config).steps_per_epoch(config)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  assert os.path.isfile(os.path.join(resumed, 'train_result.json'))
  assert any(f.startswith('events') for f in os.listdir(os.path.join(resumed, 'tensorboard')))


def test_host_waits_only_for_steps_beyond_the_limit_in_flight():
  waited = []

  class Dispatched:
    def __init__(self, step):
      self.step = step

    def block_until_ready(self):
      waited.append(self.step)

  in_flight = collections.deque()
  for step in range(6):
    train_lib.wait_for_steps_in_flight(in_flight, Dispatched(step), limit=2)
    assert waited == list(range(step - 1)), step    # step n waits for n - 2 and keeps 2 queued
  unbounded = collections.deque()
  for step in range(6):
    train_lib.wait_for_steps_in_flight(unbounded, Dispatched(step), limit=0)
  assert waited == [0, 1, 2, 3] and not unbounded


def test_checkpoint_restores_bit_exactly(cached, tmp_path):
  config = cached
  data = train_lib.DataConfig(config)
  model = train_lib.build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  state = train_lib.create_train_state(config, model, data, trainer, train_lib.make_optimizer(config, 9))
  batch = next(iter(data.train_batches(config, epoch=0)))
  state, _ = trainer.train_step(state, trainer.shard_batch(batch), jax.random.key(0))
  expected = jax.device_get(state)
  checkpoints = Checkpoints(str(tmp_path / 'ckpt'))
  checkpoints.save(1, state, {'note': 'x'})
  checkpoints.wait()
  restored, meta = checkpoints.restore(train_lib.abstract_like(state, trainer.replicated))
  checkpoints.close()
  assert meta == {'note': 'x'}
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)


def test_silence_audio_replaces_exactly_the_chosen_clips():
  rng = np.random.default_rng(0)
  valid = rng.random((4, 16)) > 0.25
  chosen = evaluation.choose_silenced_clips(valid, 0.3, rng)
  assert chosen.sum() == round(0.3 * valid.sum()) and not (chosen & ~valid).any()
  batch = {'audio': rng.normal(size=(4, 16, 64, 104)), 'audio_features': rng.normal(size=(4, 16, 8))}
  silent = {'audio': np.full((64, 104), -4.0), 'audio_features': np.arange(8.0)}
  out = evaluation.silence_audio(batch, chosen, silent)
  np.testing.assert_array_equal(out['audio'][chosen], np.full((chosen.sum(), 64, 104), -4.0))
  np.testing.assert_array_equal(out['audio'][~chosen], batch['audio'][~chosen])
  np.testing.assert_array_equal(out['audio_features'][chosen], np.tile(np.arange(8.0), (chosen.sum(), 1)))


def test_silent_log_mel_is_the_floor_of_the_normalised_scale():
  # A zero waveform: 10 log10(1e-10) = -100 dB everywhere, then (x + 14.8) / 19.895.
  np.testing.assert_allclose(feature_cache.silent_log_mel(), (-100 + 14.8) / 19.895, rtol=1e-6)


def test_gate_summary_averages_each_gate_over_its_clip_group():
  rng = np.random.default_rng(0)
  n, length = 3, 4
  clips = {'end_frame': np.array([[5, 10, 15, 0], [5, 10, 15, 20], [0, 0, 5, 10]]),
           'corrupt_audio': rng.random((n, length)) < 0.4, 'corrupt_video': rng.random((n, length)) < 0.4,
           'gate_modality': rng.random((n, length, 2)), 'gate_audio': rng.random((n, length, 2))}
  rows = {r['clips']: r for r in evaluate_lib.gate_summary(clips)}
  expected = collections.defaultdict(list)
  for i in range(n):
    for j in range(length):
      if clips['end_frame'][i, j] == 0:
        continue
      audio, video = clips['corrupt_audio'][i, j], clips['corrupt_video'][i, j]
      groups = (['both clean'] if not (audio or video) else []) + (['audio corrupted'] if audio else []) + (
          ['video corrupted'] if video else [])
      for group in groups:
        expected[group].append((clips['gate_modality'][i, j, 0], clips['gate_audio'][i, j, 1]))
  for group, values in expected.items():
    assert rows[group]['n'] == len(values)
    np.testing.assert_allclose(rows[group]['stage-2 audio weight'], np.mean([v[0] for v in values]))
    np.testing.assert_allclose(rows[group]['stage-1 weight on the attended audio'], np.mean([v[1] for v in values]))
    assert 'stage-1 weight on the attended video' not in rows[group]
  table = evaluate_lib.gate_table(clips).splitlines()
  assert table[0] == '| clips | stage-2 audio weight | stage-1 weight on the attended audio | n |'
  assert len(table) == 5 and evaluate_lib.gate_table({'end_frame': clips['end_frame'],
                                                      'corrupt_audio': clips['corrupt_audio'],
                                                      'corrupt_video': clips['corrupt_video']}) == ''


def test_to_frames_puts_clip_predictions_back_on_frames():
  clips = {'video_name': np.array([b'a', b'a']),
           'end_frame': np.array([[1, 3], [2, 0]]),
           'predictions': np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [9, 9]]]),
           'frame_labels': np.array([[[0.0, 0.1], [0.2, 0.3]], [[0.4, 0.5], [0, 0]]]),
           'frame_mask': np.array([[True, False], [True, False]]),
           'corrupt_video': np.array([[False, True], [False, False]]),
           'corrupt_audio': np.zeros((2, 2), bool), 'silenced': np.zeros((2, 2), bool)}
  frames = evaluation.to_frames(clips)['a']
  np.testing.assert_array_equal(frames['predictions'], [[0.1, 0.2], [0.5, 0.6], [0.3, 0.4]])
  np.testing.assert_array_equal(frames['labels'], [[0.0, 0.1], [0.4, 0.5], [-5, -5]])
  np.testing.assert_array_equal(frames['corrupt_video'], [False, False, True])
  clips['end_frame'] = np.array([[1, 3], [3, 0]])
  with pytest.raises(ValueError, match='predicted twice'):
    evaluation.to_frames(clips)


def test_evaluate_end_to_end_with_missing_audio_and_submission(cached, tiny, tmp_path):
  config = cached
  config.num_epochs = 1
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(config, workdir)
  evaluator = evaluate_lib.Evaluator(config, workdir)
  clips = evaluator.predict('validation', silence_fraction=0.5, seed=3)
  real = clips['end_frame'] > 0
  assert abs(clips['silenced'][real].mean() - 0.5) < 0.02
  clean = evaluator.predict('validation')
  changed = np.abs(clips['predictions'] - clean['predictions']).max(-1) > 1e-6
  assert changed[clips['silenced']].mean() > 0.9          # silencing reaches the model
  out = str(tmp_path / 'eval')
  cmd = [sys.executable, 'evaluate.py', '--config', os.path.join(REPO, 'configs/tiny.py'), '--workdir', workdir,
         f'--config.dataset.data_dir={tiny.data_dir}', f'--config.dataset.features_dir={config.dataset.features_dir}',
         '--output_dir', out, '--missing_audio', '--missing_fractions=0.5', '--seeds=0',
         '--submission', '--attention_figure=syn003']
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
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


def test_unknown_config_key_is_an_error(tmp_path):
  cmd = [sys.executable, 'train.py', '--config', 'configs/tiny.py', '--workdir', str(tmp_path),
         '--config.model.no_such_key=1']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and 'no_such_key' in result.stderr
