"""Converted (PyTorch-origin) weights, without torch: read, write, check and merge them.

A converted checkpoint is a directory holding an Orbax checkpoint of {'params', 'batch_stats'} (the
variables of `IACAModel` they cover) and `conversion.json` (where the weights come from and the
model settings they need). `python -m iaca_jax.conversion` writes one (docs/CONVERT.md); training,
feature caching and evaluation read it with `load_converted` and put it in place with
`merge_pretrained`. Torch is never imported here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from flax.core import unfreeze

METADATA_FILE = 'conversion.json'

Path = tuple[str, ...]


class ConversionError(ValueError):
  """A checkpoint that does not match the expected layout. `key` names the offending key."""

  def __init__(self, message: str, key: str | None = None):
    super().__init__(message)
    self.key = key


class MissingKeyError(ConversionError):
  pass


class UnexpectedKeyError(ConversionError):
  pass


class ShapeMismatchError(ConversionError):
  pass


def nest_variables(flat: Mapping[Path, np.ndarray]) -> dict[str, Any]:
  tree = traverse_util.unflatten_dict(dict(flat))
  return {'params': tree.get('params', {}), 'batch_stats': tree.get('batch_stats', {})}


def count_parameters(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def save_converted(
  converted: Mapping[str, Any],
  output: str,
  *,
  metadata: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> str:
  """Writes {'params', 'batch_stats'} as an Orbax checkpoint at `output` (made absolute).

  The checkpoint is written into a hidden sibling directory and renamed into place at the end, so a
  failed conversion never leaves a directory that looks complete. Returns the absolute path.
  """
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output) and not overwrite:
    raise FileExistsError(f'{output} exists; pass overwrite=True (--overwrite) to replace it.')
  parent, name = os.path.split(output)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.partial-', dir=parent)
  try:
    tree = {
      'params': dict(converted.get('params', {})),
      'batch_stats': dict(converted.get('batch_stats', {})),
    }
    tree = _map_leaves(lambda x: np.asarray(x), tree)
    checkpoint_dir = os.path.join(staging, 'checkpoint')
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(checkpoint_dir, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    with open(os.path.join(checkpoint_dir, METADATA_FILE), 'w') as f:
      json.dump(dict(metadata or {}), f, indent=2, sort_keys=True)
    if os.path.exists(output):
      os.rename(output, os.path.join(staging, 'replaced'))
    os.rename(checkpoint_dir, output)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return output


def _map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)


def load_converted(path: str) -> dict[str, Any]:
  """Reads a checkpoint written by `save_converted`: {'params': ..., 'batch_stats': ...} of NumPy arrays."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No converted checkpoint at {path} (python -m iaca_jax.conversion writes one).')
  checkpointer = ocp.StandardCheckpointer()
  restored = checkpointer.restore(path)
  checkpointer.close()
  restored = _map_leaves(np.asarray, dict(restored))
  return {'params': restored.get('params', {}) or {}, 'batch_stats': restored.get('batch_stats', {}) or {}}


def read_conversion_metadata(path: str) -> dict[str, Any]:
  """The `conversion.json` written next to the arrays (kind, source, model settings, notes)."""
  with open(os.path.join(os.path.abspath(path), METADATA_FILE)) as f:
    return json.load(f)


def merge_pretrained(variables: Mapping[str, Any], converted: Mapping[str, Any]) -> dict[str, Any]:
  """Returns a copy of a model's `variables` with every converted array put in place.

  Every converted array must name an existing variable of the same shape (the error names the first
  that does not); variables the conversion does not cover (e.g. the fusion model around converted
  encoders, or the stage-2 gate around the authors' stage-1 model) keep their values. Arrays take the
  dtype of the variable they replace.
  """
  flat_vars = traverse_util.flatten_dict(unfreeze(dict(variables)))
  flat_conv = traverse_util.flatten_dict(
    {c: unfreeze(dict(t)) for c, t in converted.items() if isinstance(t, Mapping) and t}
  )
  if not flat_conv:
    raise ConversionError('The converted weights are empty.')
  for path, value in flat_conv.items():
    name = '/'.join(path)
    if path not in flat_vars:
      near = [p for p in flat_vars if p[:2] == path[:2]]
      hint = (
        ' The model has no such subtree: initialise it on raw inputs for encoder weights, and with '
        "torch_layout=True, cross_attention='rjca', gating='stage1' or 'iaca' for the fusion weights."
        if not near
        else f' Nearby: {"/".join(near[0])}.'
      )
      raise ConversionError(f'Converted variable {name} does not exist in the model.{hint}', name)
    target = flat_vars[path]
    if tuple(np.shape(value)) != tuple(target.shape):
      raise ShapeMismatchError(
        f'Converted variable {name} has shape {tuple(np.shape(value))}, the model has {tuple(target.shape)}.',
        name,
      )
    flat_vars[path] = jnp.asarray(value, dtype=target.dtype)
  left = uncovered_variables(variables, converted)
  if left:
    warnings.warn(
      f'The converted weights leave {len(left)} variable(s) at their random initialisation inside the '
      f'parts they convert: {", ".join(left[:12])}{" ..." if len(left) > 12 else ""}.',
      stacklevel=2,
    )
  return traverse_util.unflatten_dict(flat_vars)


def uncovered_variables(variables: Mapping[str, Any], converted: Mapping[str, Any]) -> list[str]:
  """Variables of the model's top-level parts that `converted` touches but does not cover (e.g. the
  stage-2 gate inside `gate` when the authors' stage-1 weights are loaded), as 'collection/path'."""
  flat_vars = traverse_util.flatten_dict(unfreeze(dict(variables)))
  flat_conv = traverse_util.flatten_dict({c: unfreeze(dict(t)) for c, t in converted.items() if t})
  touched = {path[1] for path in flat_conv if len(path) > 1}
  return sorted('/'.join(p) for p in flat_vars if len(p) > 1 and p[1] in touched and p not in flat_conv)


def check_model_settings(path: str, model_config: Mapping[str, Any]) -> None:
  """Raises ConversionError, listing every difference, when `model_config` (config.model) differs
  from the settings the converted weights at `path` need (`model_config` in conversion.json).

  The authors' stage-1 fusion weights also fit gating='iaca' (stage 1 plus a freshly initialised
  stage 2, which `merge_pretrained` names in a warning).
  """
  try:
    needed = read_conversion_metadata(path).get('model_config', {})
  except FileNotFoundError:
    warnings.warn(
      f'{path} has no {METADATA_FILE}: the model settings its weights need are not checked.', stacklevel=2
    )
    return
  differences = []
  for key, want in sorted(needed.items()):
    have = model_config.get(key)
    if key == 'gating' and want == 'stage1' and have in ('stage1', 'iaca'):
      continue
    if have != want:
      differences.append(f'{key}={have!r} (the weights need {want!r})')
  if differences:
    raise ConversionError(
      f'The converted weights in {path} were made for other model settings: {"; ".join(differences)}. '
      'Set them with --config.model.<key>=<value>.'
    )


def load_for_model(path: str, model_config: Mapping[str, Any]) -> dict[str, Any]:
  """`load_converted(path)` after `check_model_settings(path, model_config)`."""
  check_model_settings(path, model_config)
  return load_converted(path)


def combine_converted(*converted: Mapping[str, Any]) -> dict[str, Any]:
  """One tree from several converted trees with disjoint variables (e.g. TSAV encoders + fusion)."""
  flat: dict[Path, Any] = {}
  for tree in converted:
    for path, value in traverse_util.flatten_dict({c: dict(t) for c, t in tree.items() if t}).items():
      if path in flat:
        raise ConversionError(
          f'{"/".join(path)} is converted twice; combine disjoint conversions only.', '/'.join(path)
        )
      flat[path] = value
  return nest_variables(flat)
