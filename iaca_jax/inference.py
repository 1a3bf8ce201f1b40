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


NAME_BYTES = 256  # video names travel between processes as fixed-width byte rows


def _names_to_rows(names: np.ndarray) -> np.ndarray:
  """(B,) bytes -> (B, NAME_BYTES) uint8."""
  too_long = [n for n in names if len(n) > NAME_BYTES]
  if too_long:
    raise ValueError(f'Video name {too_long[0][:80]!r}... is longer than {NAME_BYTES} bytes')
  return np.asarray(names, dtype=f'S{NAME_BYTES}').view(np.uint8).reshape(len(names), NAME_BYTES)


def _rows_to_names(rows: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(rows).view(f'S{NAME_BYTES}').reshape(-1).astype(object)


def window_indices(batch: Mapping[str, np.ndarray], first: int) -> np.ndarray:
  """(B,) int32 positions in the split of a batch's windows, -1 for padding: the real windows of an
  evaluation batch come first, numbered from `first` on."""
  valid = np.asarray(batch['valid_window'], bool)
  return np.where(valid, first + np.cumsum(valid) - 1, -1).astype(np.int32)


class RowGatherer:
  """This process's rows of host arrays -> the rows of every process, on every process, placed as
  `shard_batch` places a batch (so they line up with the outputs of a replicated step). One process:
  the arrays themselves."""

  def __init__(self, data_sharding: Any, replicated: Any, share_count: int | None = None):
    """`share_count`: the processes' rows are 1/share_count of a batch each (`Trainer.batch_share`;
    default one share per process)."""
    self.data_sharding = data_sharding
    self.share_count = jax.process_count() if share_count is None else share_count
    self._identity = jax.jit(lambda tree: tree, out_shardings=replicated)

  def __call__(self, local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if jax.process_count() == 1:
      return {k: np.asarray(v) for k, v in local.items()}
    names = {k for k, v in local.items() if np.asarray(v).dtype == object}
    arrays = {k: _names_to_rows(v) if k in names else np.asarray(v) for k, v in local.items()}
    global_arrays = {
      k: jax.make_array_from_process_local_data(
        self.data_sharding, v, (v.shape[0] * self.share_count,) + v.shape[1:]
      )
      for k, v in arrays.items()
    }
    gathered = jax.device_get(self._identity(global_arrays))
    return {k: _rows_to_names(v) if k in names else v for k, v in gathered.items()}


def predict_split(
  trainer: Any,
  variables: Mapping[str, Any],
  batches: Iterable[Mapping[str, np.ndarray]],
  *,
  silence_fraction: float = 0.0,
  seed: int = 0,
  silent_audio: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """Clip-level outputs for every real window of the split, on every process.

  Args:
    trainer: a `train_lib.Trainer` (its compiled `eval_step`, `shard_batch` and shardings).
    variables: the model variables (`TrainState.variables()`).
    batches: this process's evaluation batches (`create_eval_dataset`: its share of the split, the
      same number of batches on every process); `batches.first_window` is the split position of
      its first window. The outputs of every process are gathered to every process.
    silence_fraction: share of the valid clips of each (per-process) batch whose audio is replaced
      by `silent_audio` (chosen with `seed` and the process's share of the batch).

  Returns:
    arrays over the N real windows (model outputs (N, K, L, ...) from a K-replica trainer):
    `predictions` (N, L, 2), `score_audio` / `score_video` (N, L),
    `gate_<name>` (N, L, K), `silenced` (N, L), the clip keys and `video_name` (N,).
  """
  # Processes that feed the same rows (replica groups) silence the same clips.
  share, share_count = trainer.batch_share()
  rng = np.random.default_rng([seed, share] if share else seed)
  gather = RowGatherer(trainer.data_sharding, trainer.replicated, share_count)
  first = getattr(batches, 'first_window', 0)
  collected = collections.defaultdict(list)
  for batch in batches:
    clip_valid = batch['end_frame'] > 0
    silenced = choose_silenced_clips(clip_valid, silence_fraction, rng)
    if silence_fraction > 0:
      batch = silence_audio(batch, silenced, silent_audio)
    index = window_indices(batch, first)
    first += int(np.sum(batch['valid_window']))
    predictions, aux = jax.device_get(trainer.eval_step(variables, trainer.shard_batch(batch)))
    if getattr(trainer, 'replicas', 1) > 1:  # (K, B, ...) -> (B, K, ...): rows first, like the clip keys
      predictions, aux = jax.tree.map(lambda x: np.moveaxis(x, 0, 1), (predictions, aux))
    host = {k: batch[k] for k in CLIP_KEYS + ('video_name',)}
    rows = gather({**host, 'silenced': silenced, 'window_index': index})
    outputs = {
      'predictions': predictions,
      'score_audio': aux['score_audio'],
      'score_video': aux['score_video'],
    }
    outputs.update({f'gate_{name}': gate for name, gate in aux['gates'].items()})
    for key, value in {**rows, **outputs}.items():
      collected[key].append(value)
  clips = {k: np.concatenate(v) for k, v in collected.items()}
  index = clips.pop('window_index')
  order = np.flatnonzero(index >= 0)
  order = order[np.argsort(index[order], kind='stable')]
  return {k: v[order] for k, v in clips.items()}
