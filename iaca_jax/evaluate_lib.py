"""What evaluate.py does: restore a checkpoint's model (no optimizer), score a split, the
missing-audio sweep, the attention-score figure and the challenge submission file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from iaca_jax import data_source, distributed, inference, input_pipeline, metrics, reports, train_lib
from iaca_jax.checkpoints import Checkpoints
from iaca_jax.fileio import atomic_write
from iaca_jax.models import build_model

MISSING_AUDIO_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


class Evaluator:
  """A restored model with its data source; `which` is 'best' or 'latest'.

  Only the parameters and BatchNorm statistics are restored (no optimizer state is built or read).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, which: str = 'best'):
    self.config = config
    self.model = build_model(config.model)
    self.trainer = train_lib.Trainer(self.model, train_lib.create_mesh())
    self.data = data_source.DataSource(config)
    missing = FileNotFoundError(
      f'No {which} checkpoint under {workdir}/checkpoints: train first (python train.py --workdir {workdir} ...).'
    )
    if not os.path.isdir(os.path.join(workdir, 'checkpoints', which)):  # before Orbax creates folders
      raise missing
    checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
    abstract = train_lib.abstract_model_state(config, self.model, self.data, self.trainer)
    restored = checkpoints.restore_part(abstract, best=which == 'best')
    checkpoints.close()
    if restored is None:
      raise missing
    parts, self.meta = restored
    self.variables = train_lib.model_variables(parts['params'], parts['frozen_params'], parts['batch_stats'])
    self.step = int(jax.device_get(parts['step']))

  def predict(self, split: str, **kwargs) -> dict:
    """`inference.predict_split` over `split` (kwargs: silence_fraction, seed)."""
    batches = self.data.eval_batches(split)
    if kwargs.get('silence_fraction', 0) > 0:
      kwargs.setdefault('silent_audio', self.data.silent_audio())
    return inference.predict_split(self.trainer, self.variables, batches, **kwargs)


def score_split(evaluator: Evaluator, split: str, output_dir: str) -> dict:
  """Split-level CCC (all frames and the clean/corrupted subsets), written as JSON and Markdown."""
  scores = metrics.score_clips(evaluator.predict(split))
  if distributed.is_main_process():
    atomic_write(os.path.join(output_dir, f'metrics_{split}.json'), json.dumps(scores, indent=1))
    atomic_write(os.path.join(output_dir, f'metrics_{split}.md'), reports.metrics_table(scores))
  return scores


def missing_audio_sweep(
  evaluator: Evaluator,
  split: str,
  output_dir: str,
  fractions: Sequence[float] = MISSING_AUDIO_FRACTIONS,
  seeds: Sequence[int] = (0, 1, 2),
  label: str = 'model',
) -> dict:
  """CCC with the audio of a random share of the clips silenced (the paper's Fig. 3)."""
  rows = []
  for fraction in fractions:
    runs = []
    for seed in seeds:
      clips = evaluator.predict(split, silence_fraction=fraction, seed=seed)
      runs.append(metrics.score_clips(clips))
      runs[-1]['silenced_share'] = float(clips['silenced'][clips['end_frame'] > 0].mean())
    rows.append(
      {
        'fraction': fraction,
        'seeds': list(seeds),
        **{
          f'{k}_{stat}': float(fn([r[k] for r in runs]))
          for k in ('ccc_valence', 'ccc_arousal', 'ccc_mean', 'silenced_share')
          for stat, fn in (('mean', np.mean), ('std', np.std))
        },
      }
    )
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
