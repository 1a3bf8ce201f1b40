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
