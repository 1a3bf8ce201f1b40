"""What predict.py does: any video file -> face crops and audio -> 16-clip windows -> the model ->
per-frame valence and arousal.

Every stage after the faces is the existing code: the preprocessing stage's window schedule, frame
rules and log-mels (`preprocessing.examples.video_examples`, as for a test-split video: a frame
without a face is a missing crop), the input pipeline's face decoding and normalisation, the
evaluation's model run (`inference.predict_split`) and post-processing (`metrics.clips_to_frames`,
`metrics.postprocess`). The model comes from a training run's workdir (its recorded `config.json`
and best checkpoint) or from a directory of converted weights (its `conversion.json`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tqdm

from iaca_jax import (
  face_video,
  feature_cache,
  input_pipeline,
  metrics,
  pretrained,
  replicas,
  run_config,
  streaming,
  train_lib,
)
from iaca_jax.checkpoints import Checkpoints
from iaca_jax.fileio import atomic_write
from iaca_jax.inference import predict_split
from iaca_jax.kernel_choice import build_model
from iaca_jax.models import IACAModel
from iaca_jax.preprocessing import audio as audio_lib
from iaca_jax.preprocessing import examples, windows
from iaca_jax.preprocessing import mel as mel_lib

SILENT_RMS = 1e-4  # a frame whose audio has a lower RMS counts as silent (plot shading)


class PredictError(ValueError):
  """A model source or an output that predict cannot use; the message names the file (a video
  that cannot be used raises `face_video.VideoError`)."""


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict
  trainer: train_lib.Trainer
  variables: dict
  sample_rate: int  # of the log-mels the model was trained on
  source: str  # what was loaded, for the report


def model_sample_rate(config: ml_collections.ConfigDict) -> int:
  """The log-mel sample rate of the run's dataset: `sr<rate>` in its tfds name, else 44.1 kHz."""
  match = re.search(r'sr(\d+)', str(config.dataset.name))
  return int(match.group(1)) if match else mel_lib.REFERENCE_SAMPLE_RATE


def raw_inputs(sample_rate: int, batch: int = 1) -> dict[str, np.ndarray]:
  """Zero model inputs of the raw kind: 'video' (B, 16, 8, 112, 112, 3), 'audio' (B, 16, 64, T)."""
  settings = mel_lib.mel_settings(sample_rate)
  size = examples.FACE_SIZE
  return {
    'video': np.zeros(
      (batch, windows.CLIPS_PER_WINDOW, windows.FRAMES_PER_SAMPLE, size, size, 3), np.float32
    ),
    'audio': np.zeros((batch, windows.CLIPS_PER_WINDOW) + settings.shape, np.float32),
  }


def _restore_run(config: ml_collections.ConfigDict, workdir: str, which: str) -> LoadedModel:
  """A training run: encoders as the run had them (restored, or for a cached-feature run the seeded
  initialisation and `config.pretrained` that `feature_cache` used), the rest from the checkpoint."""
  mesh = train_lib.create_mesh()
  trainer = train_lib.Trainer(build_model(config.model, mesh.devices.flat), mesh, config.replicas.count)
  model = trainer.model
  sample_rate = model_sample_rate(config)
  raw = raw_inputs(sample_rate)
  variables, shapes = {}, raw
  if config.dataset.features_dir is not None:  # no encoder in the checkpoint: set up as feature_cache did
    variables = feature_cache.encoder_variables(config, model, raw)
    video_f, audio_f = jax.eval_shape(lambda v: model.apply(v, raw, method=IACAModel.encode), variables)
    shapes = {'video_features': video_f, 'audio_features': audio_f}
  abstract = jax.eval_shape(lambda: train_lib.fresh_model_state(config, model, shapes))
  abstract = train_lib.abstract_like(abstract, trainer.replicated)
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  restored = checkpoints.restore_part(abstract, best=which == 'best')
  checkpoints.close()
  if restored is None:
    raise PredictError(f'No {which} checkpoint under {workdir}/checkpoints: train first.')
  parts = jax.device_get(restored[0])
  trained = train_lib.model_variables(parts['params'], parts['frozen_params'], parts['batch_stats'])
  variables = trainer.replicate(run_config.merge(variables, trained))
  step = int(np.max(parts['step']))  # replicas: one step each
  return LoadedModel(config, trainer, variables, sample_rate, f'{workdir} ({which} checkpoint, step {step})')


def _load_converted(path: str, base: ml_collections.ConfigDict) -> LoadedModel:
  """Converted weights: `base` with the model settings of `conversion.json`."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.model.update(pretrained.read_conversion_metadata(path).get('model_config', {}))
  config.pretrained = path
  mesh = train_lib.create_mesh()
  model = build_model(config.model, mesh.devices.flat)
  trainer = train_lib.Trainer(model, mesh)
  sample_rate = model_sample_rate(config)
  variables = feature_cache.encoder_variables(config, model, raw_inputs(sample_rate))
  return LoadedModel(config, trainer, trainer.replicate(variables), sample_rate, f'converted weights {path}')


def write_run(workdir: str, config: ml_collections.ConfigDict, state: train_lib.TrainState) -> str:
  """A workdir as train.py leaves it for `load_model` and evaluate.py: the config and `state` as the
  best checkpoint (e.g. a state trained in a notebook, to predict with). Returns `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  atomic_write(os.path.join(workdir, train_lib.RUN_CONFIG_FILE), config.to_json(indent=1))
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  checkpoints.save(int(np.max(jax.device_get(state.step))), state, {'best_score': 0.0}, best=True)
  checkpoints.wait()
  checkpoints.close()
  return workdir


def load_model(
  source: str, *, which: str = 'best', base_config: ml_collections.ConfigDict | None = None
) -> LoadedModel:
  """The model of a training run's workdir, or of a converted-weights directory (then `base_config`
  gives everything but the model settings, e.g. configs/default.py)."""
  source = os.path.abspath(os.path.expanduser(source))
  config_path = os.path.join(source, train_lib.RUN_CONFIG_FILE)
  if os.path.isfile(config_path):
    return _restore_run(run_config.read(config_path), source, which)  # also a run of the flat layout
  if os.path.isfile(os.path.join(source, pretrained.METADATA_FILE)):
    if base_config is None:
      raise PredictError(f'{source} holds converted weights: a base config is needed for them.')
    return _load_converted(source, base_config)
  if os.path.isdir(os.path.join(source, 'checkpoints')):
    raise PredictError(
      f'{source} has checkpoints but no {train_lib.RUN_CONFIG_FILE} (runs record their config since '
      'predict.py exists): retrain, or train one step more with the same command to write it.'
    )
  raise PredictError(
    f'{source} is neither a training workdir (with {train_lib.RUN_CONFIG_FILE}) nor converted weights '
    f'(with {pretrained.METADATA_FILE}).'
  )


def frame_bounds(num_frames: int, fps: float, sample_rate: int) -> np.ndarray:
  """(N + 1,) int64: the track index of each frame's first sample, and of the end of the last."""
  return np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64)


def _batches(windows_iter, name: str, batch_size: int) -> Iterator[dict]:
  """Windows of `video_examples` -> the evaluation pipeline's batches (faces decoded and normalised
  by `input_pipeline`), padded with invalid windows to `batch_size`."""
  rows = []

  def stack(rows):
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    pad = batch_size - len(rows)
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    return batch

  for _, example in windows_iter:
    window = {k: np.asarray(v) for k, v in input_pipeline.prepare_eval_window(example).items()}
    window['video_name'] = np.asarray(name.encode(), object)
    rows.append(window)
    if len(rows) == batch_size:
      yield stack(rows)
      rows = []
  if rows:
    yield stack(rows)


@dataclasses.dataclass
class VideoPrediction:
  """Per-frame results of one video (N frames)."""

  faces: face_video.VideoFaces
  raw: np.ndarray  # (N, 2) valence, arousal: the prediction of the clip ending on each frame
  smoothed: np.ndarray  # (N, 2) clipped and moving-averaged as evaluated, the ends not pulled to 0
  silent: np.ndarray  # bool (N,): the frame's audio is missing or below SILENT_RMS
  audio_status: str  # `preprocessing.audio` status of the track
  audio_message: str  # what is wrong with the track, naming the file; '' when nothing is

  @property
  def face(self) -> np.ndarray:
    """bool (N,): the frame has a face."""
    return self.faces.track.present


def _run_model(
  model: LoadedModel, video: face_video.VideoFaces, name: str, batch_size: int, progress: tqdm.tqdm | None
) -> tuple[dict[str, np.ndarray], audio_lib.AudioStream, np.ndarray]:
  """The second pass: the video's crops and audio streamed through the windows and the model.
  Returns the clip outputs of `predict_split`, the audio stream (read to its end) and the silent
  frames."""
  sample_rate = model.sample_rate
  settings = mel_lib.mel_settings(sample_rate)
  stream = audio_lib.AudioStream(video.path, sample_rate, video_start=video.video_start)
  keep_samples = int(np.ceil(streaming.KEEP_FRAMES * sample_rate / video.fps)) + settings.clip_samples
  audio = streaming.SlidingAudio(stream, keep_samples, frame_bounds(video.num_frames, video.fps, sample_rate))
  crop_iter = face_video.face_crops(video, progress)
  try:
    crops = streaming.SlidingCrops(np.flatnonzero(video.track.present) + 1, crop_iter)
    item = examples.VideoInput(name, video.num_frames, video.fps, crops, audio, audio_path=video.path)
    windows_iter = examples.video_examples(item, settings, train=False, stats=examples.BuildStats())
    outputs = predict_split(model.trainer, model.variables, _batches(windows_iter, name, batch_size))
  finally:
    crop_iter.close()  # the frames after the last face need no second decoding
  if progress is not None:
    progress.update(progress.total - progress.n)
  audio.read_all()
  return outputs, stream, audio.silent_frames(SILENT_RMS)


def predict_video(
  model: LoadedModel, path: str, *, batch_size: int = 0, show_progress: bool = True, **face_options
) -> VideoPrediction:
  """Per-frame valence and arousal of the video at `path` (see the module docstring).

  Two passes over the frames: the face track (`face_video.detect_faces`), then the crops and the
  audio streamed through the windows and the model (`streaming`): memory does not grow with the
  video's length, but for a few numbers per frame.

  Args:
    model: from `load_model`.
    path: any video file PyAV reads.
    batch_size: windows per model call (default: the device count); a multiple of the device count.
    face_options: `face_video.detect_faces` options (detector, detect_every, detect_size, crop_scale).
  """
  name = os.path.splitext(os.path.basename(path))[0]
  batch_size = batch_size or jax.device_count()
  count = face_video.check_video(path)  # the frame count from the packets; errors before any decoding
  bar = lambda what, total: tqdm.tqdm(
    total=total, desc=f'{name}: {what}', unit='frame', disable=not show_progress, leave=False
  )
  with bar('faces', count) as progress:
    video = face_video.detect_faces(path, progress=progress, **face_options)
  with bar('model', video.num_frames) as progress:
    outputs, stream, silent = _run_model(model, video, name, batch_size, progress)
  if model.trainer.replicas > 1:  # the replicas' mean prediction, as evaluate.py's submission
    outputs = replicas.ensemble_clips(outputs)
  frames = metrics.clips_to_frames(outputs)[name]['predictions']
  if frames.shape[0] != video.num_frames or np.isnan(frames).any():
    raise RuntimeError(f'{path}: the windows did not predict every frame once')  # a bug, not bad input
  status, message = stream.finish(expected_duration=video.num_frames / video.fps)
  return VideoPrediction(video, frames, metrics.postprocess(frames, ends='shrink'), silent, status, message)
