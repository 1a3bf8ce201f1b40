"""Reading a PyTorch checkpoint file into a {name: float32 NumPy array} state dict.

The only module of the project that imports torch (the optional `[torch]` extra), and only inside
`load_torch_checkpoint`, so that everything else in `iaca_jax.conversion` works on plain arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from iaca_jax.pretrained import ConversionError

# Checkpoint dicts that wrap the state dict under one of these keys are unwrapped (in this order).
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'network', 'module', 'params', 'weights')


def _numpy_safe_globals() -> list[Any]:
  """numpy scalar/dtype reconstructors, allowed by `torch.load(weights_only=True)` for the scalars
  (e.g. the best validation CCC) that training scripts save next to their state dicts."""
  core = getattr(np, '_core', None) or np.core
  dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
  return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def load_torch_checkpoint(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint on CPU and returns its state dict as float32 NumPy arrays.

  Accepts a raw state dict, a dict wrapping it (`state_dict`, `model`, `net`, ...) or a pickled
  module; strips DataParallel's `module.` prefix. Loads with `weights_only=True` (no code execution)
  unless `trust_pickle` (only for files from a trusted source).
  """
  try:
    import torch  # lazy: torch is an optional extra, needed only to read .pt files
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "Converting PyTorch checkpoints needs torch (CPU is enough): pip install -e '.[torch]'."
    ) from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint file at {path!r}.')
  try:
    if trust_pickle:
      obj = torch.load(path, map_location='cpu', weights_only=False)
    else:
      with torch.serialization.safe_globals(_numpy_safe_globals()):
        obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises pickle.UnpicklingError and RuntimeError subclasses
    if trust_pickle:
      raise
    raise ConversionError(
      f'torch.load(weights_only=True) could not read {path!r} ({type(e).__name__}: {str(e)[:300]}). '
      'If the file comes from a trusted source, pass --trust_pickle (weights_only=False).'
    ) from e
  return to_numpy_state_dict(obj)


def _is_tensor(x: Any) -> bool:
  return isinstance(x, np.ndarray) or (hasattr(x, 'detach') and hasattr(x, 'shape') and hasattr(x, 'dtype'))


def unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
  """The state dict inside a checkpoint object (see `load_torch_checkpoint`)."""
  if hasattr(obj, 'state_dict') and callable(obj.state_dict) and not isinstance(obj, Mapping):
    obj = obj.state_dict()  # a pickled nn.Module
  if not isinstance(obj, Mapping):
    raise ConversionError(f'Expected a state dict (a mapping of names to tensors); got {type(obj).__name__}.')
  if obj and all(_is_tensor(v) for v in obj.values()):
    return obj
  for key in WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping) or hasattr(obj.get(key), 'state_dict'):
      return unwrap_state_dict(obj[key])
  tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
  if tensors and len(tensors) >= len(obj) // 2:
    return tensors  # a state dict with a few non-tensor entries (extra state)
  raise ConversionError(
    f'Found no state dict in the checkpoint: its top-level keys are {sorted(map(str, obj))[:12]}; '
    f'expected tensors, or a dict wrapping them under one of {WRAPPER_KEYS}.'
  )


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Removes DataParallel/DistributedDataParallel's `module.` prefix (when every key has it)."""
  state = dict(state)
  while state and all(k.startswith('module.') for k in state):
    state = {k[len('module.') :]: v for k, v in state.items()}
  return state


def to_numpy_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """Checkpoint object -> {name: ndarray}; floating tensors as float32 (bf16/fp16 upcast)."""
  out = {}
  for key, value in strip_module_prefix(unwrap_state_dict(obj)).items():
    if hasattr(value, 'detach'):
      value = value.detach().cpu()
      value = value.float().numpy() if value.is_floating_point() else value.numpy()
    value = np.asarray(value)
    out[str(key)] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  return out
