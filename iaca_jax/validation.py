"""Validation during training: the scores of a state on the eval split (per replica), what a
validation writes, and the best-so-far bookkeeping that picks the best checkpoint of each replica."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from iaca_jax import inference, metrics
from iaca_jax import replicas as replicas_lib
from iaca_jax.data_source import DataSource
from iaca_jax.train_state import TrainState


def evaluate_state(trainer, state: TrainState, data: DataSource, split: str) -> dict | list[dict]:
  """`metrics.score_clips` of the state on `split` (one dict per replica for a replica state), computed
  on every process from the predictions of all; checked equal across processes (they decide which
  checkpoints every process saves). `trainer`: the run's `train_lib.Trainer` (not imported here:
  train_lib imports this module)."""
  clips = inference.predict_split(trainer, state.variables(), data.eval_batches(split))
  if trainer.replicas == 1:
    scores = metrics.score_clips(clips)
  else:
    scores = [metrics.score_clips(replicas_lib.replica_clips(clips, k)) for k in range(trainer.replicas)]
  if jax.process_count() > 1:
    flat = [s[k] for s in ([scores] if isinstance(scores, dict) else scores) for k in sorted(s)]
    bits = np.array(flat, np.float64).view(np.uint32)  # exact, no x64
    multihost_utils.assert_equal(bits, f'validation metrics differ across processes: {scores}')
  return scores


def scalars(scores: dict | list[dict]) -> dict[str, float]:
  """What a validation writes: the scores, or for replicas their mean and each replica's ccc_mean."""
  if isinstance(scores, dict):
    return {f'validation/{k}': v for k, v in scores.items()}
  out = {f'validation/{k}': float(np.mean([s[k] for s in scores])) for k in scores[0]}
  out.update({f'validation/replica_{k}/ccc_mean': s['ccc_mean'] for k, s in enumerate(scores)})
  return out


def initial_meta(replicas: int) -> dict:
  if replicas == 1:
    return {'best_score': -np.inf, 'best_step': -1, 'best_metrics': {}}
  return {'best_score': [-np.inf] * replicas, 'best_step': [-1] * replicas, 'best_metrics': [{}] * replicas}


def improved_replicas(meta: dict, scores: dict | list[dict], step: int) -> np.ndarray:
  """Which replicas beat their best validation score (CCC_v + CCC_a); `meta` updated for them.
  Returns (K,) bool, or a (1,) array for a plain run."""
  plain = isinstance(scores, dict)
  scores = [scores] if plain else scores
  improved = np.zeros(len(scores), bool)
  for k, s in enumerate(scores):
    score = s['ccc_valence'] + s['ccc_arousal']
    best = meta['best_score'] if plain else meta['best_score'][k]
    if np.isfinite(score) and score > best:
      improved[k] = True
      if plain:
        meta.update(best_score=float(score), best_step=step, best_metrics=s)
      else:
        meta['best_score'][k], meta['best_step'][k], meta['best_metrics'][k] = float(score), step, s
  return improved
