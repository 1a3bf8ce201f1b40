"""K independent seeds trained in one compiled step (`config.replicas.count = K`).

A replica state carries a leading replica axis (K, ...) on its step, trainable parameters, optimizer
state and, when the encoders train, their BatchNorm statistics; frozen encoder weights and the batch
are shared. The per-replica step is the plain step under `jax.vmap`, so replica k of a K-run computes
exactly what a one-model run with replica k's seeds computes.

Placement (`config.replicas.shard`): by default every device holds every replica and a share of the
batch (data parallelism, as for one model). Sharded, the mesh is ('replica', 'data'): the replica axis
is split over gcd(K, devices) device groups, each training its K / groups replicas on the batch
sharded over the group (`train_lib.create_mesh`); no gradient crosses groups.

Seeds: replica r (r = `config.replicas.first` + k) initialises from `seed + 2 r` and draws its dropout
from `seed + 2 r + 1`; replica 0 is therefore the plain run (init `seed`, dropout `seed + 1`). The data
order follows `config.seed` alone and is shared. With random (not pretrained) frozen encoders, every
replica uses replica 0's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Sharding


def replica_seeds(seed: int, first: int, count: int) -> list[tuple[int, int]]:
  """(init seed, dropout seed) of replicas first .. first + count - 1."""
  return [(seed + 2 * r, seed + 2 * r + 1) for r in range(first, first + count)]


def device_groups(config: ml_collections.ConfigDict, num_devices: int | None = None) -> int:
  """How many device groups the replicas are split over: gcd(K, devices) with
  `config.replicas.shard`, else 1 (every device holds every replica). On several hosts each group
  reads the whole batch: the processes of a group share its rows (`train_lib.batch_share`)."""
  if not config.replicas.shard or config.replicas.count == 1:
    return 1
  return math.gcd(config.replicas.count, num_devices or jax.device_count())


def stack(trees: Sequence[Any]) -> Any:
  """Per-replica trees -> one tree with a leading replica axis (K, ...)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, k: int) -> Any:
  """Replica k's slice of a tree with a leading replica axis."""
  return jax.tree.map(lambda x: x[k], tree)


def state_axes(state: Any, stats_per_replica: bool) -> Any:
  """The vmap axes of a replica TrainState: 0 on per-replica fields, None on the shared ones."""
  return state.replace(
    step=0, params=0, frozen_params=None, batch_stats=0 if stats_per_replica else None, opt_state=0
  )


def variables_axes(variables: dict, frozen_encoders: bool) -> dict:
  """The vmap axes of replica model variables (`model_variables` of a replica state)."""
  axes = {'params': {k: None if (k == 'encoders' and frozen_encoders) else 0 for k in variables['params']}}
  if 'batch_stats' in variables:
    axes['batch_stats'] = None if frozen_encoders else 0
  return axes


def shardings(tree: Any, axes: Any, per_replica: Sharding, shared: Sharding) -> Any:
  """Per leaf of `tree`: `per_replica` under a 0 of `axes` (a prefix of `tree`, as `state_axes` and
  `variables_axes` give), `shared` under a None."""
  return jax.tree.map(
    lambda axis, sub: jax.tree.map(lambda _: per_replica if axis == 0 else shared, sub),
    axes,
    tree,
    is_leaf=lambda x: x is None,
  )


class Layout(NamedTuple):
  """Where replicas live: `per_replica` shards the leading replica axis over the mesh's 'replica'
  axis (replicas sharded over devices), `shared` is replicated. With one replica shard both are the
  replicated sharding and nothing is constrained."""

  per_replica: Sharding
  shared: Sharding

  @property
  def sharded(self) -> bool:
    return self.per_replica != self.shared

  def constrain(self, tree: Any, axes: Any) -> Any:
    if not self.sharded:
      return tree
    return jax.lax.with_sharding_constraint(tree, shardings(tree, axes, self.per_replica, self.shared))


def vmap_train_step(step: Callable, stats_per_replica: bool, layout: Layout | None = None) -> Callable:
  """`step(state, batch, rng)` -> the same over replicas: state and rngs (K,) mapped, batch shared;
  every metric gains a leading (K,) axis. With a sharded `layout`, the replica axis of the state, the
  rngs and the metrics stays sharded over devices (each device steps its own replicas)."""

  def replica_step(state, batch, rngs):
    axes = state_axes(state, stats_per_replica)
    if layout is not None:
      state, rngs = layout.constrain(state, axes), layout.constrain(rngs, 0)
    new_state, step_metrics = jax.vmap(step, in_axes=(axes, None, 0), out_axes=(axes, 0))(state, batch, rngs)
    if layout is not None:
      new_state, step_metrics = layout.constrain(new_state, axes), layout.constrain(step_metrics, 0)
    return new_state, step_metrics

  return replica_step


def vmap_eval_step(step: Callable, frozen_encoders: bool, layout: Layout | None = None) -> Callable:
  """`step(variables, batch)` -> the same over replica variables; outputs gain a leading (K,) axis."""

  def replica_eval(variables, batch):
    axes = variables_axes(variables, frozen_encoders)
    if layout is not None:
      variables = layout.constrain(variables, axes)
    return jax.vmap(step, in_axes=(axes, None))(variables, batch)

  return replica_eval


def _select(mask: jax.Array, new: Any, old: Any) -> Any:
  def pick(n, o):
    return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)

  return jax.tree.map(pick, new, old)


def select_replicas(
  mask: jax.Array, new: Any, old: Any, stats_per_replica: bool, layout: Layout | None = None
) -> Any:
  """A replica TrainState taking replica k from `new` where mask[k], else from `old` (the
  best-on-validation state of each replica). Shared fields come from `new`."""
  if layout is not None:
    return layout.constrain(
      select_replicas(mask, new, old, stats_per_replica), state_axes(new, stats_per_replica)
    )
  return new.replace(
    step=_select(mask, new.step, old.step),
    params=_select(mask, new.params, old.params),
    opt_state=_select(mask, new.opt_state, old.opt_state),
    batch_stats=_select(mask, new.batch_stats, old.batch_stats) if stats_per_replica else new.batch_stats,
  )


def replica_clips(clips: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
  """Replica k's clip arrays from `inference.predict_split` over a replica model, whose model outputs
  are (N, K, L, ...) (predictions, attention scores, gates); the clip keys are shared."""
  per_replica = ('predictions', 'score_audio', 'score_video')
  return {
    key: value[:, k] if key in per_replica or key.startswith('gate_') else value
    for key, value in clips.items()
  }


def ensemble_clips(clips: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One model's clip arrays from a replica model's (N, K, L, ...) outputs: the replicas' mean
  prediction, with replica 0's attention scores and gates."""
  return dict(replica_clips(clips, 0), predictions=clips['predictions'].mean(1))
