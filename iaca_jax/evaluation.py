"""Evaluation protocol (SPEC 5): run the model over every window of a split once, put the clip
predictions back on frames, post-process per video and compute the split-level CCC; optionally with
the audio of a share of the clips replaced by silence (the missing-audio sweep)."""

from __future__ import annotations

import collections
from typing import Iterable, Mapping

import jax
import numpy as np

from iaca_jax import metrics

INVALID = -5.0
CLIP_KEYS = ('end_frame', 'frame_labels', 'frame_mask', 'corrupt_video', 'corrupt_audio')


def choose_silenced_clips(clip_valid: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """Exactly round(fraction * #valid clips) of the valid clips of a batch, chosen at random. (B, L) bool."""
  chosen = np.zeros(clip_valid.shape, bool)
  candidates = np.flatnonzero(clip_valid)
  count = int(round(fraction * candidates.size))
  chosen.flat[rng.choice(candidates, size=count, replace=False)] = True
  return chosen


def silence_audio(batch: Mapping[str, np.ndarray], silenced: np.ndarray,
                  silent_audio: Mapping[str, np.ndarray]) -> dict:
  """Replaces the audio input of the silenced clips: the log-mel of silence, or its encoder feature."""
  batch = dict(batch)
  for key in ('audio', 'audio_features'):
    if key in batch:
      batch[key] = np.where(silenced.reshape(silenced.shape + (1,) * (batch[key].ndim - 2)),
                            np.asarray(silent_audio[key], batch[key].dtype), batch[key])
  return batch


def predict_split(trainer, state, batches: Iterable[Mapping[str, np.ndarray]], *,
                  silence_fraction: float = 0.0, seed: int = 0,
                  silent_audio: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Clip-level predictions for every real window: arrays over windows (N, ...), names (N,).

  The batches must be global (every host reads the whole split and feeds its rows), so that every
  host ends with all predictions.
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
    predictions, aux = jax.device_get(trainer.eval_step(state, trainer.shard_batch(rows)))
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


FRAME_FLAGS = ('corrupt_video', 'corrupt_audio', 'silenced')


def to_frames(clips: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Per video, frame-indexed arrays (row j = frame j + 1): predictions (N, 2), labels (N, 2) with -5
  where invalid, and the clip flags of the clip that ends on each frame."""
  real = clips['end_frame'] > 0
  names = np.repeat(clips['video_name'][:, None], clips['end_frame'].shape[1], axis=1)[real]
  names = np.array([n.decode() if isinstance(n, bytes) else str(n) for n in names])
  flat = {k: clips[k][real] for k in ('end_frame', 'predictions', 'frame_labels', 'frame_mask') + FRAME_FLAGS}
  per_video = {}
  for video in np.unique(names):
    rows = np.flatnonzero(names == video)
    rows = rows[np.argsort(flat['end_frame'][rows], kind='stable')]
    video_frames = flat['end_frame'][rows]
    repeated = video_frames[1:][np.diff(video_frames) == 0]
    if repeated.size:
      raise ValueError(f'Video {video}: frame {repeated[0]} is predicted twice; the evaluation pipeline '
                       'must visit every window once.')
    n = int(video_frames[-1])
    index = video_frames - 1
    entry = {'predictions': np.full((n, 2), np.nan), 'labels': np.full((n, 2), INVALID)}
    entry['predictions'][index] = flat['predictions'][rows]
    valid = flat['frame_mask'][rows]
    entry['labels'][index[valid]] = flat['frame_labels'][rows][valid]
    for key in FRAME_FLAGS:
      entry[key] = np.zeros(n, bool)
      entry[key][index] = flat[key][rows]
    per_video[video] = entry
  return per_video


def score(clips: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Split-level CCC_v, CCC_a and their mean, also over clean / corrupted frames per modality."""
  videos = to_frames(clips)
  subsets = {}
  for key in FRAME_FLAGS:
    if any(v[key].any() for v in videos.values()):
      subsets[key] = {name: v[key] for name, v in videos.items()}
      subsets[f'clean_{key.split("_")[1]}' if key != 'silenced' else 'not_silenced'] = {
          name: ~v[key] for name, v in videos.items()}
  return metrics.evaluate_split({n: v['predictions'] for n, v in videos.items()},
                                {n: v['labels'] for n, v in videos.items()}, subsets=subsets)
