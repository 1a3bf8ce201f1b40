"""predict.py on video files: faces found where they are, one CSV row per frame, the same numbers as
the same crops through the preprocessing stage and the evaluation, clear errors for bad videos.

The model is the tiny config, an initialised (untrained) state saved as a run's best checkpoint with
its config.json, as train.py leaves them.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import av
import jax
import numpy as np
import optax
import pytest
import video_fixtures  # tests/video_fixtures.py
from PIL import Image

from configs import tiny as tiny_config
from data import build
from iaca_jax import (
  data_source,
  evaluate_lib,
  faces,
  input_pipeline,
  metrics,
  predict_lib,
  predict_outputs,
  pretrained,
  replicas,
  train_lib,
)
from iaca_jax.face_video import VideoError, check_video, detect_faces, find_faces
from iaca_jax.kernel_choice import build_model
from iaca_jax.models import IACAModel
from iaca_jax.preprocessing import audio as audio_lib
from iaca_jax.preprocessing.errors import DataError
from tests.test_configs import old_flat_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 96
BLANK = (40, 56)  # frames without a face
PAUSE = (66, 81)  # frames without voice

# Its module-scoped fixtures are built once: the module runs on one xdist worker (--dist=loadgroup).
pytestmark = pytest.mark.xdist_group('predict')


def make_run(workdir: str, config, shapes=None, state=None) -> str:
  """A workdir as train.py leaves it: config.json and a best checkpoint (`state`, default the initial
  state for inputs shaped like `shapes`, default raw faces and log-mels)."""
  if state is None:
    shapes = shapes or predict_lib.raw_inputs(predict_lib.model_sample_rate(config))
    model = build_model(config.model)
    state = train_lib.init_state(model, shapes, jax.random.key(config.seed + 1), optax.adamw(1e-3))
  return predict_lib.write_run(workdir, config, state)


def run_config():
  config = tiny_config.get_config()
  config.dataset.name = 'aff_wild2'  # 44.1 kHz log-mels, as the route through the builder
  return config


@pytest.fixture(scope='module')
def face_video(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('videos') / 'face.mp4')
  squares = video_fixtures.write_face_video(path, NUM_FRAMES, BLANK, pause=(PAUSE[0] / 30, PAUSE[1] / 30))
  return path, squares


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  return make_run(str(tmp_path_factory.mktemp('run') / 'tiny'), run_config())


@pytest.fixture(scope='module')
def model(run_dir):
  return predict_lib.load_model(run_dir)


@pytest.fixture(scope='module')
def crops(face_video):
  """The crops predict streams through the model (the `prediction` fixture's settings), in memory."""
  return find_faces(face_video[0], detect_every=1)[1]


@pytest.fixture(scope='module')
def prediction(model, face_video):
  return predict_lib.predict_video(model, face_video[0], detect_every=1, show_progress=False)


def test_the_detector_finds_the_face_where_it_is_and_not_in_blank_frames(prediction, face_video):
  squares = face_video[1]
  truth = ~np.isnan(squares[:, 0])
  track = prediction.faces.track
  np.testing.assert_array_equal(track.present, truth)
  # The astronaut's face spans about 47-142 of the 200 pixels of the pasted head square, both ways.
  x, y, side = squares[truth].T
  centre = track.centre[truth]
  np.testing.assert_array_less(np.abs(centre[:, 0] - (x + 0.47 * side)), 0.12 * side)
  np.testing.assert_array_less(np.abs(centre[:, 1] - (y + 0.47 * side)), 0.12 * side)
  ratio = track.side[truth] / (0.475 * side * faces.DEFAULT_CROP_SCALES['haar'])
  assert ratio.min() > 0.75 and ratio.max() < 1.35, (ratio.min(), ratio.max())


def test_detecting_every_fifth_frame_errs_only_next_to_a_change(face_video):
  truth = ~np.isnan(face_video[1][:, 0])
  track = detect_faces(face_video[0], detect_every=5).track
  assert set(np.flatnonzero(track.detected)) == set(range(0, NUM_FRAMES, 5)) | {NUM_FRAMES - 1}
  wrong = np.flatnonzero(track.present != truth)
  assert all(min(abs(i - b) for b in BLANK) <= 2 for i in wrong), wrong


def test_the_silent_frames_are_the_pause(prediction):
  assert prediction.audio_status == audio_lib.OK
  expected = np.zeros(NUM_FRAMES, bool)
  expected[PAUSE[0] : PAUSE[1]] = True
  near_an_edge = np.zeros(NUM_FRAMES, bool)
  for edge in PAUSE:
    near_an_edge[edge - 2 : edge + 2] = True  # AAC spreads the edges over a few milliseconds
  np.testing.assert_array_equal(prediction.silent[~near_an_edge], expected[~near_an_edge])


def read_csv(path: str) -> tuple[str, np.ndarray]:
  with open(path) as f:
    header = f.readline().strip()
  return header, np.loadtxt(path, delimiter=',', skiprows=1, ndmin=2)


def test_the_csv_has_one_row_per_frame(prediction, tmp_path):
  path = predict_outputs.write_csv(prediction, str(tmp_path / 'face.csv'))
  header, rows = read_csv(path)
  assert header == 'frame,time_s,valence,arousal,face,audio'
  assert rows.shape == (NUM_FRAMES, 6)
  np.testing.assert_array_equal(rows[:, 0], np.arange(1, NUM_FRAMES + 1))
  np.testing.assert_allclose(rows[:, 1], np.arange(NUM_FRAMES) / video_fixtures.FPS, atol=1e-4)
  np.testing.assert_allclose(rows[:, 2:4], prediction.smoothed, atol=1e-6)
  np.testing.assert_array_equal(rows[:, 4], prediction.faces.track.present)
  np.testing.assert_array_equal(rows[:, 5], ~prediction.silent)
  assert os.listdir(tmp_path) == ['face.csv']  # no temporary file left


def write_aff_wild2_layout(root, name: str, video_path: str, crops: dict | None, num_frames: int) -> None:
  """The crops (None: no crop folder) and the raw video as an Aff-Wild2 validation video (and a copy
  as the train split)."""
  va = root / '8th_ABAW_Annotations' / 'VA_Estimation_Challenge'
  for split_dir, video in (('Train_Set', f'{name}_train'), ('Validation_Set', name)):
    (va / split_dir).mkdir(parents=True)
    (va / split_dir / f'{video}.txt').write_text('valence,arousal\n' + '0.1,0.2\n' * num_frames)
    for frame, jpeg in (crops or {}).items():
      crop_dir = root / 'cropped_aligned' / video
      crop_dir.mkdir(parents=True, exist_ok=True)
      (crop_dir / f'{frame:05d}.jpg').write_bytes(jpeg)
    (root / 'raw_videos').mkdir(exist_ok=True)
    shutil.copy(video_path, root / 'raw_videos' / f'{video}.mp4')


def test_predictions_equal_the_same_crops_through_the_builder_and_the_evaluation(
  prediction, crops, run_dir, face_video, tmp_path
):
  """predict streams the crops and the audio through the windows; the builder and the evaluation
  hold them whole: the same numbers."""
  raw = tmp_path / 'raw'
  write_aff_wild2_layout(raw, 'face', face_video[0], crops, NUM_FRAMES)
  builder = build.build('aff_wild2', str(raw), str(tmp_path / 'tfds'), min_valid_clips=1)
  config = run_config()
  config.dataset.name = str(builder.data_dir)  # the prepared version folder (44.1 kHz, keep 1)
  evaluator = evaluate_lib.Evaluator(config, run_dir, 'best')
  frames = metrics.clips_to_frames(evaluator.predict('validation'))['face']['predictions']
  np.testing.assert_allclose(prediction.raw, frames, atol=1e-5, rtol=0)
  np.testing.assert_allclose(
    prediction.smoothed, metrics.postprocess(frames, ends='shrink'), atol=1e-5, rtol=0
  )
  assert np.ptp(frames, axis=0).min() > 1e-4  # the untrained model still responds to its inputs


def test_a_dataset_of_raw_videos_gets_predicts_crops_and_predictions(
  prediction, crops, run_dir, face_video, tmp_path
):
  """`data.build --crops=detect` on a dataset with raw videos and annotations only: the crops written
  are predict's crops of the same video, byte for byte, and the evaluation of the built set gives
  predict's numbers."""
  raw = tmp_path / 'raw'
  write_aff_wild2_layout(raw, 'face', face_video[0], None, NUM_FRAMES)
  kept = raw / 'cropped_aligned' / 'face_train'  # a crop folder already there is kept as it is
  kept.mkdir(parents=True)
  (kept / '00001.jpg').write_bytes(crops[1])
  builder = build.build(
    'aff_wild2', str(raw), str(tmp_path / 'tfds'), min_valid_clips=1, crops='detect', detect_every=1
  )
  written = {int(p.stem): p.read_bytes() for p in (raw / 'cropped_aligned' / 'face').iterdir()}
  assert written == crops
  assert os.listdir(kept) == ['00001.jpg']
  assert sorted(os.listdir(raw / 'cropped_aligned')) == ['face', 'face_train']  # no temporary folder
  config = run_config()
  config.dataset.name = str(builder.data_dir)
  frames = metrics.clips_to_frames(evaluate_lib.Evaluator(config, run_dir, 'best').predict('validation'))
  np.testing.assert_allclose(prediction.raw, frames['face']['predictions'], atol=1e-5, rtol=0)


def test_detecting_crops_without_a_raw_video_names_the_video(face_video, tmp_path):
  raw = tmp_path / 'raw'
  write_aff_wild2_layout(raw, 'face', face_video[0], None, NUM_FRAMES)
  shutil.rmtree(raw / 'raw_videos')
  with pytest.raises(DataError, match=re.escape(f'validation video face: no raw video for face under {raw}')):
    build.build('aff_wild2', str(raw), str(tmp_path / 'tfds'), crops='detect')
  assert os.listdir(raw / 'cropped_aligned') == []  # nothing half-written


def test_the_synthetic_sets_raw_videos_run_through_predict(model, tiny):
  raw_dir = os.path.join(tiny.raw, 'raw_videos')
  videos = sorted(os.listdir(raw_dir))
  assert len(videos) > 2
  for name in [videos[0], next(v for v in videos if '-24-' in v)]:  # and the one written at 24 fps
    path = os.path.join(raw_dir, name)
    result = predict_lib.predict_video(model, path, show_progress=False)
    count = audio_lib.probe_media(path).num_frames
    assert result.smoothed.shape == (count, 2) and np.isfinite(result.smoothed).all()
    assert result.audio_status == audio_lib.OK


def test_a_video_without_audio_is_predicted_on_silence(model, tmp_path):
  path = str(tmp_path / 'mute.mp4')
  video_fixtures.write_face_video(path, 40, (20, 30), with_audio=False)
  result = predict_lib.predict_video(model, path, show_progress=False)
  assert result.audio_status == audio_lib.NO_AUDIO_STREAM and path in result.audio_message
  assert result.silent.all() and result.smoothed.shape == (40, 2)


def test_plot_overlay_and_challenge_files(prediction, tmp_path):
  png = predict_outputs.plot(prediction, str(tmp_path / 'face.png'))
  assert Image.open(png).size[0] > 500
  abaw = predict_outputs.write_abaw(prediction, str(tmp_path / 'face.txt'))
  with open(abaw) as f:
    lines = f.read().splitlines()
  assert lines[0] == 'image_location,valence,arousal' and lines[1].startswith('face/00001.jpg,')
  assert len(lines) == NUM_FRAMES + 1
  mp4 = predict_outputs.write_overlay(prediction, str(tmp_path / 'face.mp4'))
  with av.open(mp4) as container:
    assert container.streams.audio
    frames = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
  assert len(frames) == NUM_FRAMES
  # The face square is drawn in green where there is a face, not on the blank frames.
  green = lambda rgb: np.sum((rgb[..., 1] > 200) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80))
  assert green(frames[10]) > 100 and green(frames[45]) < 20
  assert sorted(os.listdir(tmp_path)) == ['face.mp4', 'face.png', 'face.txt']


def test_a_run_recorded_in_the_old_flat_config_layout_loads_as_before(model, run_dir, tmp_path):
  """config.json of a run from before the configs were grouped (flat keys, '' and -1 for unset)."""
  old = str(tmp_path / 'old_run')
  shutil.copytree(run_dir, old)
  with open(os.path.join(old, train_lib.RUN_CONFIG_FILE), 'w') as f:
    json.dump(old_flat_layout(model.config), f, indent=1)
  loaded = predict_lib.load_model(old)
  assert json.loads(loaded.config.to_json()) == json.loads(model.config.to_json())
  for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(model.variables), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_cached_feature_run_gets_the_encoders_its_features_were_cached_with(cached, tmp_path):
  """A run trained on cached features has no encoder in its checkpoint: predict must rebuild the
  encoders that wrote the cache. Their features of a validation window equal the cached ones."""
  run = make_run(str(tmp_path / 'cached_run'), cached, data_source.DataSource(cached).input_shapes())
  loaded = predict_lib.load_model(run)
  split = cached.dataset.eval_split
  window = next(
    iter(
      input_pipeline.create_eval_dataset(
        cached.dataset.name,
        cached.dataset.data_dir,
        global_batch_size=1,
        split=split,
        process_index=0,
        process_count=1,
      )
    )
  )
  key = (window['video_name'][0], tuple(window['end_frame'][0]))
  stored = next(  # the cache's windows are in another order
    {k: v[i] for k, v in batch.items()}
    for batch in data_source.DataSource(cached).eval_batches(split)
    for i in range(len(batch['video_name']))
    if (batch['video_name'][i], tuple(batch['end_frame'][i])) == key
  )
  model = build_model(loaded.config.model)
  video_f, audio_f = model.apply(
    jax.device_get(loaded.variables),
    {'video': window['video'], 'audio': window['audio']},
    method=IACAModel.encode,
  )
  np.testing.assert_allclose(video_f[0], stored['video_features'], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(audio_f[0], stored['audio_features'], atol=1e-5, rtol=1e-5)


def test_converted_weights_give_the_model_they_were_converted_for(model, prediction, face_video, tmp_path):
  """A converted-weights directory: the model settings from its conversion.json, the weights in place;
  the same weights as the run give the same predictions."""
  variables = jax.device_get(model.variables)
  settings = {'features': model.config.model.features, 'lstm_hidden': model.config.model.lstm_hidden}
  path = pretrained.save_converted(
    variables, str(tmp_path / 'converted'), metadata={'model_config': settings}
  )
  base = run_config()
  base.model.features, base.model.lstm_hidden = 32, 32  # replaced by conversion.json
  converted = predict_lib.load_model(path, base_config=base)
  assert converted.config.model.features == model.config.model.features
  again = predict_lib.predict_video(converted, face_video[0], detect_every=1, show_progress=False)
  np.testing.assert_allclose(again.raw, prediction.raw, atol=1e-6, rtol=0)


def run_predict(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_backend_optimization_level=0')  # one device
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, 'predict.py'), *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
  )


def test_no_output_replaces_an_input_or_another_output(tmp_path):
  for folder in ('a', 'b'):
    (tmp_path / folder).mkdir()
  videos = [str(tmp_path / 'a' / 'clip.mp4'), str(tmp_path / 'b' / 'clip.mov'), str(tmp_path / 'clip-2.mp4')]
  for v in videos:
    open(v, 'wb').close()
  out = str(tmp_path / 'out')
  plans = predict_outputs.plan_outputs(videos, out, ['csv', 'overlay'])
  names = [os.path.basename(p) for plan in plans for p in plan.values()]
  assert names == ['clip.csv', 'clip.mp4', 'clip-2.csv', 'clip-2.mp4', 'clip-2-2.csv', 'clip-2-2.mp4']
  with pytest.raises(predict_lib.PredictError, match=re.escape(f'would replace the input video {videos[0]}')):
    predict_outputs.plan_outputs(videos, str(tmp_path / 'a'), ['csv', 'overlay'])
  assert predict_outputs.plan_outputs(videos[:1], str(tmp_path / 'a'), ['csv', 'plot'])  # no .mp4 written


def test_bad_videos_are_one_clear_error_naming_the_file(face_video, run_dir, tmp_path):
  truncated = tmp_path / 'truncated.mp4'
  data = open(face_video[0], 'rb').read()
  truncated.write_bytes(data[: len(data) // 2])
  audio_only = str(tmp_path / 'audio_only.m4a')
  with av.open(audio_only, 'w', format='mp4') as out:
    stream = out.add_stream('aac', rate=16000)
    stream.layout = 'mono'
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format='flt', layout='mono')
    frame.sample_rate = 16000
    out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
  short = str(tmp_path / 'short.mp4')
  video_fixtures.write_face_video(short, 10, (0, 0))
  expected = {
    str(truncated): 'not a readable video',
    audio_only: 'has no video stream',
    short: 'has 10 frames, fewer than one clip (32 frames)',
  }
  for path, reason in expected.items():
    with pytest.raises(VideoError, match=re.escape(path) + '.*' + re.escape(reason)):
      check_video(path)
  # One command with a good video between bad ones: each bad one is one line, the good one gets its
  # files, and the command ends with the count and a non-zero status.
  output_dir = tmp_path / 'out'
  missing = str(tmp_path / 'missing.mp4')
  result = run_predict(
    f'--workdir={run_dir}', f'--output_dir={output_dir}', short, face_video[0], missing, '--noplot'
  )
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [
    f'error: {short} has 10 frames, fewer than one clip (32 frames)',
    f'error: {missing}: no such file',
    f'error: 2 of 3 videos failed ({short}, {missing}); 1 done',
  ]
  assert sorted(os.listdir(output_dir)) == ['face.csv']
  assert f'{face_video[0]}: {NUM_FRAMES} frames' in result.stdout
  # The overlay into the input's own folder would replace it: refused before any work.
  video = tmp_path / 'face.mp4'
  video.write_bytes(open(face_video[0], 'rb').read())
  before = video.read_bytes()
  result = run_predict(f'--workdir={run_dir}', f'--output_dir={tmp_path}', '--overlay', str(video))
  assert result.returncode == 1 and 'would replace the input video' in result.stderr.splitlines()[-1]
  assert video.read_bytes() == before and not (tmp_path / 'face.csv').exists()


@pytest.mark.heavy
def test_a_replica_run_predicts_the_mean_of_its_replicas(face_video, tmp_path):
  config = run_config()
  config.replicas.count = 2
  model = build_model(config.model)
  shapes = predict_lib.raw_inputs(predict_lib.model_sample_rate(config))
  state = train_lib.init_replica_state(model, shapes, train_lib.init_keys(config), optax.sgd(0.1))
  predict = lambda run: (
    predict_lib.predict_video(predict_lib.load_model(run), face_video[0], show_progress=False).raw
  )
  together = predict(make_run(str(tmp_path / 'replicas'), config, state=state))
  each = []
  for k in range(2):  # replica k alone, as a plain run
    params = replicas.unstack(state.params, k)
    plain = state.replace(step=state.step[k], params=params, opt_state=optax.sgd(0.1).init(params))
    each.append(predict(make_run(str(tmp_path / f'replica{k}'), run_config(), state=plain)))
  assert not np.allclose(each[0], each[1], atol=1e-3)  # two different models
  np.testing.assert_allclose(together, np.mean(each, axis=0), atol=1e-5)
