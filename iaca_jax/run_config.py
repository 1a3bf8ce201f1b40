"""A run's recorded config (`<workdir>/config.json`, `train_lib.RUN_CONFIG_FILE`) read back.

Runs recorded before the configs were grouped (configs/default.py: dataset, model, optimizer,
schedule, training, evaluation, replicas, cluster) hold the loop, optimiser, replica and cluster
settings as flat top-level keys, with sentinels for unset values ('' for no path, -1 for no step
limit or process id, 0 for no process count). `from_dict` moves those keys to their groups and turns
the sentinels into None; a config in the grouped layout is returned as it is.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

# Flat key of the old layout -> (group, key) of the grouped one.
FLAT_KEYS = {
  'batch_size': ('dataset', 'batch_size'),
  'prefetch_batches': ('dataset', 'prefetch_batches'),
  'learning_rate': ('optimizer', 'learning_rate'),
  'weight_decay': ('optimizer', 'weight_decay'),
  'lr_decay': ('schedule', 'decay'),
  'lr_decay_every_epochs': ('schedule', 'decay_every_epochs'),
  'lr_decay_start_epoch': ('schedule', 'decay_start_epoch'),
  'num_epochs': ('training', 'num_epochs'),
  'max_steps': ('training', 'max_steps'),
  'log_every_steps': ('training', 'log_every_steps'),
  'checkpoint_every_steps': ('training', 'checkpoint_every_steps'),
  'keep_checkpoints': ('training', 'keep_checkpoints'),
  'max_steps_in_flight': ('training', 'max_steps_in_flight'),
  'eval_every_epochs': ('evaluation', 'every_epochs'),
  'replicas': ('replicas', 'count'),
  'first_replica': ('replicas', 'first'),
  'shard_replicas': ('replicas', 'shard'),
  'distributed': ('cluster', 'distributed'),
  'coordinator_address': ('cluster', 'coordinator_address'),
  'num_processes': ('cluster', 'num_processes'),
  'process_id': ('cluster', 'process_id'),
  'distributed_timeout_s': ('cluster', 'timeout_s'),
}
# (group, key) -> whether an old value means "unset" (None in the grouped layout), as the old code
# tested it.
UNSET = {
  (None, 'pretrained'): lambda v: v == '',
  ('dataset', 'features_dir'): lambda v: v == '',
  ('training', 'max_steps'): lambda v: v <= 0,
  ('cluster', 'coordinator_address'): lambda v: v == '',
  ('cluster', 'num_processes'): lambda v: v == 0,
  ('cluster', 'process_id'): lambda v: v == -1,
}


def is_flat(config: dict[str, Any]) -> bool:
  """Whether `config` is in the old flat layout (e.g. `replicas` a number, not a group)."""
  return any(key in config and not isinstance(config[key], dict) for key in FLAT_KEYS)


def from_dict(config: dict[str, Any]) -> ml_collections.ConfigDict:
  """The config of a run, in the grouped layout whatever layout `config` (a plain dict) has."""
  if not is_flat(config):
    return ml_collections.ConfigDict(config)
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items() if k not in FLAT_KEYS}
  for old, (group, key) in FLAT_KEYS.items():
    if old in config:
      out.setdefault(group, {})[key] = config[old]
  for (group, key), unset in UNSET.items():
    values = out if group is None else out.get(group, {})
    if values.get(key) is not None and unset(values[key]):
      values[key] = None
  return ml_collections.ConfigDict(out)


def read(path: str) -> ml_collections.ConfigDict:
  """The config recorded at `path` (a run's config.json), in the grouped layout."""
  with open(path) as f:
    return from_dict(json.load(f))


# What evaluate.py takes from the command line over a run's recorded settings. A `--config.` key under
# one of these may differ from the run's (what is evaluated, and how it is computed):
EVALUATION_SETTINGS = (
  'dataset.name',
  'dataset.data_dir',
  'dataset.eval_split',
  'dataset.features_dir',
  'dataset.features_dtype',
  'dataset.batch_size',
  'dataset.prefetch_batches',
  'model.kernels',
  'model.dtype',
  'evaluation',
  'cluster',
)
# ... these only train, and evaluation ignores them:
TRAINING_SETTINGS = (
  'seed',
  'pretrained',
  'dataset.train_split',
  'dataset.jitter',
  'dataset.shuffle_buffer',
  'optimizer',
  'schedule',
  'training',
  'replicas.first',
  'replicas.shard',
)
# ... and every other one (the model's settings, replicas.count) builds the model the checkpoint fits.


def _under(key: str, settings: tuple[str, ...]) -> bool:
  return any(key == s or key.startswith(s + '.') for s in settings)


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def _get(tree: dict[str, Any], key: str) -> Any:
  for name in key.split('.'):
    tree = tree[name]
  return tree


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
  *groups, name = key.split('.')
  for group in groups:
    tree = tree.setdefault(group, {})
  tree[name] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
  """`base` with every leaf of `update` put in place (nested dicts merged)."""
  out = dict(base)
  for key, value in update.items():
    out[key] = (
      merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    )
  return out


def for_evaluation(
  recorded: ml_collections.ConfigDict, given: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config to evaluate a run with: its `recorded` settings (fields it lacks, from an older
  layout, from `given`), `given`'s cluster (this launch's processes) and the command line's
  `overrides` ({key: value}) of `EVALUATION_SETTINGS`.

  Raises ValueError naming every override that would build another model than the run's, with both
  values; returns notes on the other overrides that differ from the run's settings (used or ignored).
  """
  run = recorded.to_dict()
  config = merge(given.to_dict(), {k: v for k, v in run.items() if k != 'cluster'})
  config['cluster'] = given.cluster.to_dict()
  conflicts, used, ignored = [], [], []
  for key, value in sorted(overrides.items()):
    if _under(key, ('cluster',)):  # this launch's, whatever the run's were
      continue
    try:
      have = _get(run, key)
    except (KeyError, TypeError):  # a field the run's config does not record
      _set(config, key, value)
      continue
    if _plain(value) == _plain(have):
      continue
    difference = f'{key}={value!r} (the run: {have!r})'
    if key == 'dataset.features_dir' and (value is None) != (have is None):
      conflicts.append(difference)  # cached features or the encoders: another model input
    elif _under(key, EVALUATION_SETTINGS):
      _set(config, key, value)
      used.append(difference)
    elif _under(key, TRAINING_SETTINGS):
      ignored.append(difference)
    else:
      conflicts.append(difference)
  if conflicts:
    raise ValueError(
      f'the run was trained with other model settings than the command line gives: {", ".join(conflicts)}. '
      "Its settings come from its config.json: leave these out or give the run's values"
    )
  notes = []
  if used:
    notes.append(f"evaluating with settings other than the run's: {', '.join(used)}")
  if ignored:
    notes.append(f'ignored (training only): {", ".join(ignored)}')
  return ml_collections.ConfigDict(config), notes
