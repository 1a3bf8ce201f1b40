"""What evaluate.py does: restore a checkpoint's model (no optimizer), score a split, the
missing-audio sweep, the attention-score figure and the challenge submission file.

A run of K replicas (`config.replicas.count`) is scored replica by replica from one pass over the data;
tables give each replica and the mean with its 95% t-interval over replicas (`iaca_jax.stats`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from iaca_jax import (
  data_source,
  distributed,
  inference,
  input_pipeline,
  metrics,
  replicas,
  reports,
  run_config,
  stats,
  train_lib,
)
from iaca_jax.checkpoints import Checkpoints
from iaca_jax.fileio import atomic_write
from iaca_jax.kernel_choice import build_model
from iaca_jax.preprocessing.errors import first_line

MISSING_AUDIO_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def run_settings(
  workdir: str, given: ml_collections.ConfigDict, overrides: dict
) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The settings to evaluate the run in `workdir` with, and notes for the user: its recorded
  config.json with the command line's evaluation settings (`run_config.for_evaluation`; ValueError
  for other model settings), or for a run that recorded none, `given` (the command line's config)."""
  path = os.path.join(workdir, train_lib.RUN_CONFIG_FILE)
  if os.path.isfile(path):
    return run_config.for_evaluation(run_config.read(path), given, overrides)
  notes = []
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    notes.append(f'{workdir} has no {train_lib.RUN_CONFIG_FILE}: the settings are those of the command line')
  return given, notes


class Evaluator:
  """A restored model with its data source; `which` is 'best' or 'latest'.

  Only the parameters and BatchNorm statistics are restored (no optimizer state is built or read).
  """

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: str, which: str = 'best', protocol: str = 'challenge'
  ):
    self.config, self.protocol, self.replicas = config, protocol, config.replicas.count
    mesh = train_lib.create_mesh()
    self.model = build_model(config.model, mesh.devices.flat)
    self.trainer = train_lib.Trainer(self.model, mesh, config.replicas.count)
    self.data = data_source.DataSource(config)
    missing = FileNotFoundError(
      f'No {which} checkpoint under {workdir}/checkpoints: train first (python train.py --workdir {workdir} ...).'
    )
    if not os.path.isdir(os.path.join(workdir, 'checkpoints', which)):  # before Orbax creates folders
      raise missing
    checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
    abstract = train_lib.abstract_model_state(config, self.model, self.data, self.trainer)
    try:
      restored = checkpoints.restore_part(abstract, best=which == 'best')
    except (TypeError, ValueError) as e:  # Orbax: another tree structure, or other shapes
      raise ValueError(
        f'the {which} checkpoint in {workdir} does not fit the model these settings build '
        f'({first_line(e)}); '
        'evaluate with the settings the run was trained with'
      ) from None
    finally:
      checkpoints.close()
    if restored is None:
      raise missing
    parts, self.meta = restored
    self.variables = train_lib.model_variables(parts['params'], parts['frozen_params'], parts['batch_stats'])
    self.steps = np.atleast_1d(jax.device_get(parts['step'])).astype(int).tolist()  # one per replica
    self.step = max(self.steps)

  def predict_all(self, split: str, **kwargs) -> dict:
    """`inference.predict_split` over `split` (kwargs: silence_fraction, seed); replica models give
    (N, K, ...) model outputs."""
    batches = self.data.eval_batches(split)
    if kwargs.get('silence_fraction', 0) > 0:
      kwargs.setdefault('silent_audio', self.data.silent_audio())
    return inference.predict_split(self.trainer, self.variables, batches, **kwargs)

  def predict_each(self, split: str, **kwargs) -> list[dict]:
    """One clip dict per replica (one pass over the data)."""
    clips = self.predict_all(split, **kwargs)
    if self.replicas == 1:
      return [clips]
    return [replicas.replica_clips(clips, k) for k in range(self.replicas)]

  def predict(self, split: str, **kwargs) -> dict:
    """One model's clip outputs: the model, or of K replicas the ensemble (mean prediction; the
    attention scores and gates of replica 0)."""
    clips = self.predict_all(split, **kwargs)
    if self.replicas == 1:
      return clips
    return replicas.ensemble_clips(clips)

  def score_each(self, split: str, **kwargs) -> list[dict]:
    """`metrics.score_clips` of every replica (a list of one for a plain run)."""
    return [metrics.score_clips(c, self.protocol) for c in self.predict_each(split, **kwargs)]


def predict_each_intervened(
  config: ml_collections.ConfigDict, workdir: str, split: str, interceptor: Callable
) -> list[dict]:
  """`Evaluator.predict_each` of the run's best checkpoint with `interceptor`
  (`flax.linen.intercept_methods`) changing what the traced model computes: a counterfactual."""
  train_lib.forget_compiled_steps()  # traced without the interceptor
  try:
    with nn.intercept_methods(interceptor):
      return Evaluator(config, workdir, 'best').predict_each(split)
  finally:
    train_lib.forget_compiled_steps()  # traced with it


def summarize(per_replica: list[dict]) -> dict:
  """Scores of K replicas -> the mean of each score, `<key>_low` / `<key>_high` (95% t-interval over
  replicas; NaN for one replica) and the list under 'replicas'. A plain run: its scores unchanged."""
  if len(per_replica) == 1:
    return dict(per_replica[0])
  out = {}
  for key in per_replica[0]:
    mean, low, high = stats.t_interval([s[key] for s in per_replica])
    out[key] = mean
    if not key.endswith('n_frames'):
      out[f'{key}_low'], out[f'{key}_high'] = low, high
  out['replicas'] = per_replica
  return out


def score_split(evaluator: Evaluator, split: str, output_dir: str) -> dict:
  """Split-level CCC (all frames and the clean/corrupted subsets), written as JSON and Markdown; for
  replicas each replica's scores and their mean with its 95% t-interval."""
  per_replica = evaluator.score_each(split)
  scores = summarize(per_replica)
  scores['protocol'] = evaluator.protocol
  if distributed.is_main_process():
    atomic_write(os.path.join(output_dir, f'metrics_{split}.json'), json.dumps(scores, indent=1))
    table = reports.metrics_table(scores) if len(per_replica) == 1 else reports.replica_table(per_replica)
    atomic_write(os.path.join(output_dir, f'metrics_{split}.md'), table)
  return scores


def missing_audio_sweep(
  evaluator: Evaluator,
  split: str,
  output_dir: str,
  fractions: Sequence[float] = MISSING_AUDIO_FRACTIONS,
  seeds: Sequence[int] = (0, 1, 2),
  label: str = 'model',
) -> dict:
  """CCC with the audio of a random share of the clips silenced (the paper's Fig. 3).

  Per fraction: `<key>_mean` and `<key>_std` over the silencing seeds (and replicas); for K > 1
  replicas also `<key>_low` / `<key>_high`, the 95% t-interval over replicas of each replica's mean
  over the silencing seeds, and `<key>_replicas` those K means."""
  rows = []
  keys = ('ccc_valence', 'ccc_arousal', 'ccc_mean')
  for fraction in fractions:
    runs = []  # [seed][replica] scores
    shares = []
    for seed in seeds:
      each = evaluator.predict_each(split, silence_fraction=fraction, seed=seed)
      runs.append([metrics.score_clips(c, evaluator.protocol) for c in each])
      shares.append(float(each[0]['silenced'][each[0]['end_frame'] > 0].mean()))
    row = {'fraction': fraction, 'seeds': list(seeds)}
    row['silenced_share_mean'], row['silenced_share_std'] = float(np.mean(shares)), float(np.std(shares))
    for k in keys:
      values = np.array([[r[k] for r in per_seed] for per_seed in runs])  # (seeds, replicas)
      row[f'{k}_mean'], row[f'{k}_std'] = float(values.mean()), float(values.std())
      if values.shape[1] > 1:
        per_replica = values.mean(0)
        _, row[f'{k}_low'], row[f'{k}_high'] = stats.t_interval(per_replica)
        row[f'{k}_replicas'] = per_replica.tolist()
    rows.append(row)
  result = {'label': label, 'split': split, 'rows': rows}
  if distributed.is_main_process():
    atomic_write(os.path.join(output_dir, 'missing_audio.json'), json.dumps(result, indent=1))
    atomic_write(os.path.join(output_dir, 'missing_audio.md'), reports.missing_audio_table([result]))
    reports.plot_missing_audio([result], os.path.join(output_dir, 'missing_audio.png'))
  return result


def find_window(config: ml_collections.ConfigDict, video: str, split: str) -> dict:
  """The first window of `video` in the source shards (faces and log-mels) whose clips are all real."""
  batches = input_pipeline.create_eval_dataset(
    config.dataset.name,
    config.dataset.data_dir,
    global_batch_size=1,
    split=split,
    features=['video', 'audio', 'video_name', 'end_frame'],
    process_index=0,
    process_count=1,
  )
  fallback = None
  for batch in batches:
    if batch['video_name'][0].decode() != video:
      if fallback is not None:
        break
      continue
    window = {k: v[0] for k, v in batch.items()}
    if fallback is None:
      fallback = window
    if np.all(window['end_frame'] > 0) and window['end_frame'][0] > 1:
      return window
  if fallback is None:
    raise ValueError(f'Video {video!r} is not in the {split} split of {config.dataset.name}.')
  return fallback


def attention_figure(
  evaluator: Evaluator, video: str, split: str, output_dir: str, clips: dict | None = None
) -> str:
  """`reports.attention_figure` for the first full window of `video`; returns the PNG's path.
  `clips`: the split's predictions when the caller already has them."""
  clips = evaluator.predict(split) if clips is None else clips
  path = os.path.join(output_dir, f'attention_{video}.png')
  if distributed.is_main_process():
    reports.attention_figure(find_window(evaluator.config, video, split), clips, video, path)
  return path


def submission_lines(video: str, smoothed: np.ndarray) -> list[str]:
  """The challenge file's rows of one video, `<video>/<frame, 5 digits>.jpg,valence,arousal`, from
  its post-processed (N, 2) predictions."""
  return [f'{video}/{i + 1:05d}.jpg,{v:.6f},{a:.6f}' for i, (v, a) in enumerate(smoothed)]


def write_submission(evaluator: Evaluator, split: str, output_dir: str) -> str:
  """The challenge file: `image_location,valence,arousal`, one post-processed row per frame."""
  videos = metrics.clips_to_frames(evaluator.predict(split))
  lines = ['image_location,valence,arousal']
  for name in sorted(videos):
    predictions = videos[name]['predictions']
    if np.isnan(predictions).any():
      raise ValueError(f'Video {name}: {int(np.isnan(predictions).any(-1).sum())} frames have no prediction.')
    lines += submission_lines(name, metrics.postprocess(predictions))
  path = os.path.join(output_dir, f'submission_{split}.csv')
  if distributed.is_main_process():
    atomic_write(path, '\n'.join(lines) + '\n')
  return path
