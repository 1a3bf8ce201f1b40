"""Running a model over every window of a split, optionally with the audio of some clips silenced.

The output of `predict_split` (per-clip predictions, attention scores, gate values and the clip
flags) feeds the metrics (`metrics.score_clips`), the reports and the submission file.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from iaca_jax.input_pipeline import CLIP_KEYS


def choose_silenced_clips(clip_valid: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """Exactly round(fraction * #valid clips) of the valid clips of a batch, chosen at random. (B, L) bool."""
  chosen = np.zeros(clip_valid.shape, bool)
  candidates = np.flatnonzero(clip_valid)
  count = int(round(fraction * candidates.size))
  chosen.flat[rng.choice(candidates, size=count, replace=False)] = True
  return chosen


def silence_audio(
  batch: Mapping[str, np.ndarray], silenced: np.ndarray, silent_audio: Mapping[str, np.ndarray]
) -> dict:
  """Replaces the audio input of the silenced (B, L) clips: the log-mel of silence (64, frames), or
  its encoder feature (C,), whichever the batch carries."""
  batch = dict(batch)
  for key in ('audio', 'audio_features'):
    if key in batch:
      batch[key] = np.where(
        silenced.reshape(silenced.shape + (1,) * (batch[key].ndim - 2)),
        np.asarray(silent_audio[key], batch[key].dtype),
        batch[key],
      )
  return batch


def predict_split(
  trainer: Any,
  variables: Mapping[str, Any],
  batches: Iterable[Mapping[str, np.ndarray]],
  *,
  silence_fraction: float = 0.0,
  seed: int = 0,
  silent_audio: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """Clip-level outputs for every real window of `batches`.

  Args:
    trainer: a `train_lib.Trainer` (its compiled `eval_step` and `shard_batch`).
    variables: the model variables (`TrainState.variables()`).
    batches: global evaluation batches: every host reads the whole split and feeds its rows, so
      that every host ends with all predictions.
    silence_fraction: share of the valid clips of each batch whose audio is replaced by
      `silent_audio` (chosen with `seed`).

  Returns:
    arrays over the N real windows (model outputs (N, K, L, ...) from a K-replica trainer):
    `predictions` (N, L, 2), `score_audio` / `score_video` (N, L),
    `gate_<name>` (N, L, K), `silenced` (N, L), the clip keys and `video_name` (N,).
  """
  rng = np.random.default_rng(seed)
  collected = collections.defaultdict(list)
  for batch in batches:
    rows_per_host = len(batch['valid_window']) // jax.process_count()
    local = slice(jax.process_index() * rows_per_host, (jax.process_index() + 1) * rows_per_host)
    clip_valid = batch['end_frame'] > 0
    silenced = choose_silenced_clips(clip_valid, silence_fraction, rng)
    if silence_fraction > 0:
      batch = silence_audio(batch, silenced, silent_audio)
    rows = {k: v[local] for k, v in batch.items()}
    predictions, aux = jax.device_get(trainer.eval_step(variables, trainer.shard_batch(rows)))
    if getattr(trainer, 'replicas', 1) > 1:  # (K, B, ...) -> (B, K, ...): rows first, like the clip keys
      predictions, aux = jax.tree.map(lambda x: np.moveaxis(x, 0, 1), (predictions, aux))
    keep = np.asarray(batch['valid_window'], bool)
    collected['predictions'].append(predictions[keep])
    collected['silenced'].append(silenced[keep])
    for key in ('score_audio', 'score_video'):
      collected[key].append(aux[key][keep])
    for name, gate in aux['gates'].items():
      collected[f'gate_{name}'].append(gate[keep])
    for key in CLIP_KEYS + ('video_name',):
      collected[key].append(np.asarray(batch[key])[keep])
  return {k: np.concatenate(v) for k, v in collected.items()}
