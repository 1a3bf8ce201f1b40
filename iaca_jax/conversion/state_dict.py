"""PyTorch state dict -> `IACAModel` variables: applies a name map and checks every shape.

The expected shapes come from our own modules (via `jax.eval_shape`), so the map and the model cannot
drift apart, and a checkpoint that does not fit fails with an error naming the first missing,
unexpected or wrongly shaped key. The maps themselves are in `name_maps`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from iaca_jax.conversion.name_maps import (
  AUDIO_OUT,
  AUDIO_STEM_MODES,
  KINDS,
  TSAV_AUDIO_PREFIX,
  TSAV_VIDEO_PREFIX,
  VIDEO_OUT,
  Entry,
  FusionDims,
  NameMap,
  fusion_map,
  r2plus1d_map,
  resnet18_map,
)
from iaca_jax.conversion.torch_checkpoint import to_numpy_state_dict
from iaca_jax.models.encoders import R2Plus1D18, ResNet18
from iaca_jax.models.iaca import IACAModel
from iaca_jax.pretrained import (
  ConversionError,
  MissingKeyError,
  Path,
  ShapeMismatchError,
  UnexpectedKeyError,
  nest_variables,
)


def _flat_shapes(variables: Mapping[str, Any]) -> dict[Path, tuple]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(variables)).items()}


def _encoder_shapes(which: str, width: float) -> dict[Path, tuple]:
  if which == 'video':
    module, x, out = R2Plus1D18(width=width), jnp.zeros((1, 8, 32, 32, 3)), VIDEO_OUT
  else:
    module, x, out = ResNet18(width=width), jnp.zeros((1, 64, 32, 1)), AUDIO_OUT
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  return {(k[0],) + out + k[1:]: s for k, s in _flat_shapes(variables).items()}


def _fusion_shapes(dims: FusionDims) -> dict[Path, tuple]:
  model = IACAModel(**dims.model_kwargs())
  inputs = {
    'video_features': jnp.zeros((1, dims.clips, dims.positions, 1, dims.features)),
    'audio_features': jnp.zeros((1, dims.clips, dims.features)),
  }
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))
  return _flat_shapes(variables)


def _torch_shape(kind: str, flax_shape: tuple) -> tuple:
  """The PyTorch shape that becomes `flax_shape` under `kind`."""
  if kind == 'linear':
    return tuple(reversed(flax_shape))
  if kind in ('conv', 'video_stem', 'audio_stem'):
    return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])
  return tuple(flax_shape)


def _suggest_prefix(state: Mapping[str, Any], key: str, prefixes: Sequence[str]) -> str:
  tail = key
  for p in prefixes:
    if p and key.startswith(p):
      tail = key[len(p) :]
  hits = [k for k in state if k != key and (k == tail or k.endswith('.' + tail))]
  if not hits:
    sample = ', '.join(repr(k) for k in list(state)[:4])
    return f' The checkpoint has {len(state)} keys, e.g. {sample}.'
  other = hits[0][: len(hits[0]) - len(tail)]
  return (
    f' The checkpoint has {hits[0]!r}: its key prefix is {other!r}'
    f' (set the prefix option, e.g. --prefix={other}, or use the right --kind).'
  )


def _check_shape(
  entry: Entry, key: str, value: np.ndarray, expected: tuple, options: Mapping[str, Any], notes: list[str]
) -> np.ndarray:
  """Validates one tensor and returns it in PyTorch layout, stems already reduced to our channels."""
  want = _torch_shape(entry.kind, expected)
  got = tuple(value.shape)
  if entry.kind == 'video_stem' and len(got) == len(want) and got[:1] + got[2:] == want[:1] + want[2:]:
    if got[1] == want[1]:
      return value
    if got[1] == want[1] + 1:
      notes.append(
        f'{key}: kept the first {want[1]} (RGB) input channels of {got[1]}, dropped the face-mask channel'
      )
      return value[:, : want[1]]
  if entry.kind == 'audio_stem' and len(got) == len(want) and got[:1] + got[2:] == want[:1] + want[2:]:
    if got[1] == want[1]:
      return value
    mode = options.get('audio_stem', 'sum')
    if want[1] == 1 and got[1] > 1 and mode != 'exact':
      notes.append(f'{key}: {got[1]}-channel stem reduced to 1 input channel by {mode} over channels')
      return value.sum(1, keepdims=True) if mode == 'sum' else value.mean(1, keepdims=True)
    if want[1] == 1 and got[1] > 1:
      raise ShapeMismatchError(
        f'{key!r} has shape {got}: a {got[1]}-channel stem, but the audio encoder takes 1 channel and '
        "audio_stem='exact' was asked. Use audio_stem='sum' (the network on the spectrogram repeated "
        f"on {got[1]} channels) or 'mean'.",
        key,
      )
  if got != want:
    hint = ''
    if entry.kind == 'video_stem':
      hint = ' (3 RGB input channels, or 4 = RGB + face mask, whose mask channel is dropped)'
    raise ShapeMismatchError(
      f'{key!r} has shape {got}, expected {want}{hint} for {entry.target} (our shape {expected}).', key
    )
  return value


def _transform(kind: str, values: Sequence[np.ndarray]) -> np.ndarray:
  if kind == 'sum':
    return values[0] + values[1]
  value = values[0]
  if kind == 'linear':
    return np.ascontiguousarray(value.T)
  if kind in ('conv', 'video_stem', 'audio_stem'):
    return np.ascontiguousarray(np.transpose(value, (*range(2, value.ndim), 1, 0)))
  return np.array(value)


def _apply_map(
  state: Mapping[str, np.ndarray],
  names: NameMap,
  expected: Mapping[Path, tuple],
  *,
  scopes: Sequence[str],
  dropped: Sequence[str],
  options: Mapping[str, Any],
  notes: list[str],
) -> dict[Path, np.ndarray]:
  """Reads every entry; then every key not read must be dropped by rule, else it is unexpected.

  scopes: key prefixes this conversion owns (keys outside them are left out, e.g. the audio half of
    a TSAV file converted as `r2plus1d_18`);
  dropped: regexes of keys that are deliberately left out (e.g. classifier heads).
  Every variable in `expected` must be covered by the map.
  """
  flat, used = {}, set()
  for entry in names.entries:
    full = (entry.collection,) + entry.path
    if full not in expected:
      raise ConversionError(f'Internal: the name map targets {entry.target}, which our model does not have.')
    values = []
    for key in entry.keys:
      if key not in state:
        raise MissingKeyError(
          f'Missing key {key!r} (expected shape {_torch_shape(entry.kind, expected[full])}, for '
          f'{entry.target}).' + _suggest_prefix(state, key, scopes),
          key,
        )
      values.append(_check_shape(entry, key, state[key], expected[full], options, notes))
      used.add(key)
    value = _transform(entry.kind, values).astype(np.float32)
    if value.shape != expected[full]:  # only reachable through a bug in the map
      raise ConversionError(
        f'Internal: {entry.keys} became {value.shape}, {entry.target} is {expected[full]}.'
      )
    flat[full] = value
  uncovered = [p for p in expected if p not in flat]
  if uncovered:
    raise ConversionError(f'Internal: no PyTorch key maps to {"/".join(uncovered[0])}.')
  drop = [re.compile(p) for p in dropped]
  unexpected = [
    k
    for k in state
    if k not in used
    and k not in names.optional
    and any(k.startswith(s) for s in scopes)
    and not any(p.search(k) for p in drop)
  ]
  if unexpected:
    key = unexpected[0]
    raise UnexpectedKeyError(
      f'Unexpected key {key!r} of shape {tuple(np.shape(state[key]))} ({len(unexpected)} unexpected in '
      'all): it has no place in our model. Pass --ignore=REGEX to leave it out deliberately.',
      key,
    )
  return flat


def convert_state_dict(
  state_dict: Any,
  kind: str,
  *,
  prefix: str = '',
  video_prefix: str = TSAV_VIDEO_PREFIX,
  audio_prefix: str = TSAV_AUDIO_PREFIX,
  audio_stem: str = 'sum',
  width: float = 1.0,
  dims: FusionDims | None = None,
  ignore: Iterable[str] = (),
  notes: list[str] | None = None,
) -> dict[str, Any]:
  """PyTorch state dict (tensors or arrays, possibly wrapped) -> {'params': ..., 'batch_stats': ...}.

  kind: one of KINDS. prefix: key prefix of the encoder for `r2plus1d_18` / `resnet18` (keys outside it
  are left out); video_prefix / audio_prefix: the TSAV sub-model prefixes. audio_stem: see the module
  docstring. width: encoder width (1.0 = torchvision). dims: the fusion model's sizes. ignore: extra
  regexes of keys to leave out. notes: if given, receives a line for every layout decision taken.
  Raises MissingKeyError / UnexpectedKeyError / ShapeMismatchError naming the first offending key.
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown kind {kind!r}; expected one of {KINDS}.')
  if audio_stem not in AUDIO_STEM_MODES:
    raise ValueError(f'Unknown audio_stem {audio_stem!r}; expected one of {AUDIO_STEM_MODES}.')
  state = to_numpy_state_dict(state_dict)
  notes = [] if notes is None else notes
  options = {'audio_stem': audio_stem}
  names = NameMap()
  ignore = list(ignore)
  if kind == 'r2plus1d_18':
    expected = _encoder_shapes('video', width)
    r2plus1d_map(names, prefix, expected)
    scopes, dropped = [prefix], ignore + [rf'^{re.escape(prefix)}fc\.']
  elif kind == 'resnet18':
    expected = _encoder_shapes('audio', width)
    resnet18_map(names, prefix, expected)
    scopes, dropped = [prefix], ignore + [rf'^{re.escape(prefix)}fc\.']
  elif kind == 'tsav':
    expected = {**_encoder_shapes('video', width), **_encoder_shapes('audio', width)}
    r2plus1d_map(names, video_prefix, expected)
    resnet18_map(names, audio_prefix, expected)
    # The two-stream head `fc.*` and the sub-models' classifiers are dropped; nothing else may be left.
    scopes = ['']
    dropped = ignore + [r'^fc\.', rf'^{re.escape(video_prefix)}fc\.', rf'^{re.escape(audio_prefix)}fc\.']
  else:
    dims = dims or FusionDims()
    expected = _fusion_shapes(dims)
    fusion_map(names, dims)
    scopes, dropped = [''], ignore
  flat = _apply_map(state, names, expected, scopes=scopes, dropped=dropped, options=options, notes=notes)
  return nest_variables(flat)
