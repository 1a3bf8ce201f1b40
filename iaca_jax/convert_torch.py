"""Import PyTorch weights: torchvision encoders, the TSAV two-stream checkpoint, the authors' fusion model.

The only place torch appears in the project, and only inside `load_torch_checkpoint` (torch is the
optional `[torch]` extra; training code never imports it). Every tensor is mapped by an explicit name
map onto the variables of `IACAModel`; the expected shapes come from our own modules, so a checkpoint
that does not fit fails with an error naming the first missing, unexpected or wrongly shaped key.

Kinds (the layout of the converted tree, i.e. of `IACAModel` variables):
  r2plus1d_18  torchvision `r2plus1d_18` (Kinetics)      -> params/batch_stats ['encoders']['video_encoder']
  resnet18     torchvision `resnet18` (ImageNet or mono) -> params/batch_stats ['encoders']['audio_encoder']
  tsav         Kuhnke et al.'s TwoStreamAuralVisualModel  -> both encoders
               (`video_model.r2plus1d.*` with a 4-channel RGB + mask stem, `audio_model.resnet.*` 1-channel)
  fusion       the authors' fusion model (`audio_extract`, `video_attn.attn`, `video_extract`, `coattn`,
               `*_gating_fc_layer`, `Joint`, `vregressor`, `aregressor`) -> top-level params; it equals
               `IACAModel(cross_attention='rjca', rjca_iterations=2, gating='stage1', torch_layout=True)`.

Layouts: Linear (out, in) -> Dense kernel (in, out); ConvNd (out, in, *k) -> Conv kernel (*k, in, out);
LSTM `weight_ih_l{k}[_reverse]` (4H, in) -> `kernel_input` (in, 4H) with PyTorch's gate order (i, f, g, o)
kept, `bias_ih + bias_hh` -> the one fused `bias`; BatchNorm weight/bias -> params scale/bias,
running_mean/running_var -> batch_stats mean/var, `num_batches_tracked` ignored.
Stems: a 4-channel video stem keeps its RGB channels (the face-mask channel is dropped, as the authors
do); a 3-channel (ImageNet) audio stem is summed over its input channels by default (`audio_stem='sum'`:
exactly the network applied to the spectrogram repeated on 3 channels), or averaged (`'mean'`, Kuhnke
et al.'s initialisation), or refused (`'exact'`).

Command line (writes an Orbax checkpoint {'params', 'batch_stats'} plus `conversion.json`):
  python -m iaca_jax.convert_torch --kind=tsav --input=TSAV_Sub4_544k.pth.tar --output=/abs/dir
Then `load_converted(dir)` and `merge_pretrained(variables, converted)`; see docs/CONVERT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

KINDS = ('r2plus1d_18', 'resnet18', 'tsav', 'fusion')
AUDIO_STEM_MODES = ('sum', 'mean', 'exact')
TSAV_VIDEO_PREFIX = 'video_model.r2plus1d.'
TSAV_AUDIO_PREFIX = 'audio_model.resnet.'
# Checkpoint dicts that wrap the state dict under one of these keys are unwrapped (in this order).
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'network', 'module', 'params', 'weights')
METADATA_FILE = 'conversion.json'
VIDEO_OUT = ('encoders', 'video_encoder')
AUDIO_OUT = ('encoders', 'audio_encoder')

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


@dataclasses.dataclass(frozen=True)
class FusionDims:
  """Sizes of the authors' fusion model (the paper's defaults); they fix the expected shapes."""

  clips: int = 16            # L: the RJCA key Dense is L x L
  features: int = 512        # d: feature width of every stream (audio and visual channels too)
  lstm_hidden: int = 256     # per direction
  iterations: int = 2        # RJCA iterations (`coattn.dcn_layers.N`)
  head_hidden: int = 128
  positions: int = 49        # 7 x 7 visual positions

  def model_kwargs(self) -> dict[str, Any]:
    """The `IACAModel` settings under which the converted fusion weights compute the authors' model."""
    return dict(features=self.features, lstm_hidden=self.lstm_hidden, cross_attention='rjca',
                rjca_iterations=self.iterations, gating='stage1', head_hidden=self.head_hidden,
                torch_layout=True)


# ----------------------------------------------------------------------------------------------------
# Reading the PyTorch file.


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
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('Converting PyTorch checkpoints needs torch (CPU is enough): '
                      "pip install -e '.[torch]'.") from e
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
        'If the file comes from a trusted source, pass --trust_pickle (weights_only=False).') from e
  return to_numpy_state_dict(obj)


def _is_tensor(x: Any) -> bool:
  return isinstance(x, np.ndarray) or (hasattr(x, 'detach') and hasattr(x, 'shape') and hasattr(x, 'dtype'))


def unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
  """The state dict inside a checkpoint object (see `load_torch_checkpoint`)."""
  if hasattr(obj, 'state_dict') and callable(obj.state_dict) and not isinstance(obj, Mapping):
    obj = obj.state_dict()   # a pickled nn.Module
  if not isinstance(obj, Mapping):
    raise ConversionError(f'Expected a state dict (a mapping of names to tensors); got {type(obj).__name__}.')
  if obj and all(_is_tensor(v) for v in obj.values()):
    return obj
  for key in WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping) or hasattr(obj.get(key), 'state_dict'):
      return unwrap_state_dict(obj[key])
  tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
  if tensors and len(tensors) >= len(obj) // 2:
    return tensors   # a state dict with a few non-tensor entries (extra state)
  raise ConversionError(
      f'Found no state dict in the checkpoint: its top-level keys are {sorted(map(str, obj))[:12]}; '
      f'expected tensors, or a dict wrapping them under one of {WRAPPER_KEYS}.')


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Removes DataParallel/DistributedDataParallel's `module.` prefix (when every key has it)."""
  state = dict(state)
  while state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
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


# ----------------------------------------------------------------------------------------------------
# The name map.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """Torch key(s) -> one of our variables. `kind` names the layout transform."""

  collection: str          # 'params' | 'batch_stats'
  path: Path               # inside the collection
  keys: tuple[str, ...]    # torch keys read (several only for the LSTM's two biases)
  kind: str                # 'same' | 'linear' | 'conv' | 'sum' | 'video_stem' | 'audio_stem'

  @property
  def target(self) -> str:
    return '/'.join((self.collection,) + self.path)


class _NameMap:
  """Builds the entries of one conversion; the helpers mirror PyTorch's module types."""

  def __init__(self):
    self.entries: list[_Entry] = []
    self.optional: set[str] = set()   # keys read if present, never required (num_batches_tracked)

  def add(self, key: str, path: Path, kind: str = 'same', collection: str = 'params'):
    self.entries.append(_Entry(collection, path, (key,), kind))

  def linear(self, prefix: str, path: Path, bias: bool = True):
    self.add(f'{prefix}.weight', path + ('kernel',), 'linear')
    if bias:
      self.add(f'{prefix}.bias', path + ('bias',))

  def conv(self, prefix: str, path: Path, kind: str = 'conv'):
    self.add(f'{prefix}.weight', path + ('kernel',), kind)

  def batch_norm(self, prefix: str, path: Path):
    self.add(f'{prefix}.weight', path + ('scale',))
    self.add(f'{prefix}.bias', path + ('bias',))
    self.add(f'{prefix}.running_mean', path + ('mean',), collection='batch_stats')
    self.add(f'{prefix}.running_var', path + ('var',), collection='batch_stats')
    self.optional.add(f'{prefix}.num_batches_tracked')

  def residual_blstm(self, prefix: str, path: Path, layers: int = 2):
    for layer in range(layers):
      for suffix, direction in (('', 'forward'), ('_reverse', 'backward')):
        cell = path + ('rnn', f'layer{layer}_{direction}')
        self.add(f'{prefix}.rnn.weight_ih_l{layer}{suffix}', cell + ('kernel_input',), 'linear')
        self.add(f'{prefix}.rnn.weight_hh_l{layer}{suffix}', cell + ('kernel_hidden',), 'linear')
        self.entries.append(_Entry('params', cell + ('bias',), (
            f'{prefix}.rnn.bias_ih_l{layer}{suffix}', f'{prefix}.rnn.bias_hh_l{layer}{suffix}'), 'sum'))
    self.add(f'{prefix}.init_hidden', path + ('rnn', 'init_hidden'))
    self.linear(f'{prefix}.linear', path + ('linear',))


def _r2plus1d_map(names: _NameMap, prefix: str, expected: Mapping[Path, tuple], out: Path = VIDEO_OUT):
  """torchvision r2plus1d_18 -> our R2Plus1D18 (`stem.0/1/3/4`, `layerX.Y.convZ.0.{0,1,3}`, `.convZ.1`)."""
  names.conv(f'{prefix}stem.0', out + ('stem_spatial_conv',), 'video_stem')
  names.batch_norm(f'{prefix}stem.1', out + ('stem_spatial_bn',))
  names.conv(f'{prefix}stem.3', out + ('stem_temporal_conv',))
  names.batch_norm(f'{prefix}stem.4', out + ('stem_temporal_bn',))
  for stage, block in _blocks(expected, out):
    t, f = f'{prefix}layer{stage}.{block}.', out + (f'layer{stage}_{block}',)
    for c in (1, 2):
      names.conv(f'{t}conv{c}.0.0', f + (f'conv{c}', 'spatial_conv'))
      names.batch_norm(f'{t}conv{c}.0.1', f + (f'conv{c}', 'mid_bn'))
      names.conv(f'{t}conv{c}.0.3', f + (f'conv{c}', 'temporal_conv'))
      names.batch_norm(f'{t}conv{c}.1', f + (f'bn{c}',))
    if ('params',) + f + ('downsample_conv', 'kernel') in expected:
      names.conv(f'{t}downsample.0', f + ('downsample_conv',))
      names.batch_norm(f'{t}downsample.1', f + ('downsample_bn',))


def _resnet18_map(names: _NameMap, prefix: str, expected: Mapping[Path, tuple], out: Path = AUDIO_OUT):
  """torchvision resnet18 -> our ResNet18 (`conv1`, `bn1`, `layerX.Y.{conv1,bn1,conv2,bn2,downsample}`)."""
  names.conv(f'{prefix}conv1', out + ('conv1',), 'audio_stem')
  names.batch_norm(f'{prefix}bn1', out + ('bn1',))
  for stage, block in _blocks(expected, out):
    t, f = f'{prefix}layer{stage}.{block}.', out + (f'layer{stage}_{block}',)
    for c in (1, 2):
      names.conv(f'{t}conv{c}', f + (f'conv{c}',))
      names.batch_norm(f'{t}bn{c}', f + (f'bn{c}',))
    if ('params',) + f + ('downsample_conv', 'kernel') in expected:
      names.conv(f'{t}downsample.0', f + ('downsample_conv',))
      names.batch_norm(f'{t}downsample.1', f + ('downsample_bn',))


def _blocks(expected: Mapping[Path, tuple], out: Path) -> list[tuple[int, int]]:
  """(stage, block) pairs present in our encoder, in order."""
  found = set()
  for path in expected:
    if path[1:1 + len(out)] == out and len(path) > len(out) + 1:
      m = re.fullmatch(r'layer(\d+)_(\d+)', path[1 + len(out)])
      if m:
        found.add((int(m.group(1)), int(m.group(2))))
  return sorted(found)


def _fusion_map(names: _NameMap, dims: FusionDims):
  """The authors' fusion model (SPEC Appendix A) -> our IACAModel with rjca + stage-1 gates."""
  names.residual_blstm('audio_extract', ('audio_temporal',))
  attn = 'video_attn.attn'
  for name, bias in (('affine_audio', True), ('affine_video', True), ('affine_v', False),
                     ('affine_g', False), ('affine_h', False), ('affine_feat', True)):
    names.linear(f'{attn}.{name}', ('spatial_attention', name), bias=bias)
  names.residual_blstm('video_extract', ('video_temporal',))
  for i in range(dims.iterations):
    torch_layer, ours = f'coattn.dcn_layers.{i}', ('cross_attention', f'layer_{i}')
    for name in ('query_linear', 'key1_linear', 'key2_linear', 'value1_linear', 'value2_linear'):
      names.linear(f'{torch_layer}.dense_coattn.{name}', ours + (name,))
    names.linear(f'{torch_layer}.linears.0.0', ours + ('output1_linear',))
    names.linear(f'{torch_layer}.linears.1.0', ours + ('output2_linear',))
  names.linear('video_gating_fc_layer', ('gate', 'video_gate', 'fc'))
  names.linear('audio_gating_fc_layer', ('gate', 'audio_gate', 'fc'))
  names.residual_blstm('Joint', ('joint_temporal',))
  for torch_head, ours in (('vregressor', 'valence_head'), ('aregressor', 'arousal_head')):
    names.linear(f'{torch_head}.0', (ours, 'hidden'))
    names.linear(f'{torch_head}.3', (ours, 'output'))


# ----------------------------------------------------------------------------------------------------
# Expected shapes: taken from our own modules, so the map and the model cannot drift apart.


def _flat_shapes(variables: Mapping[str, Any]) -> dict[Path, tuple]:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(variables)).items()}


def _encoder_shapes(which: str, width: float) -> dict[Path, tuple]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from iaca_jax.models.encoders import R2Plus1D18, ResNet18  # pylint: disable=import-outside-toplevel
  if which == 'video':
    module, x, out = R2Plus1D18(width=width), jnp.zeros((1, 8, 32, 32, 3)), VIDEO_OUT
  else:
    module, x, out = ResNet18(width=width), jnp.zeros((1, 64, 32, 1)), AUDIO_OUT
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  return {(k[0],) + out + k[1:]: s for k, s in _flat_shapes(variables).items()}


def _fusion_shapes(dims: FusionDims) -> dict[Path, tuple]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from iaca_jax.models.iaca import IACAModel  # pylint: disable=import-outside-toplevel
  model = IACAModel(**dims.model_kwargs())
  inputs = {'video_features': jnp.zeros((1, dims.clips, dims.positions, 1, dims.features)),
            'audio_features': jnp.zeros((1, dims.clips, dims.features))}
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))
  return _flat_shapes(variables)


# ----------------------------------------------------------------------------------------------------
# Applying the map.


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
      tail = key[len(p):]
  hits = [k for k in state if k != key and (k == tail or k.endswith('.' + tail))]
  if not hits:
    sample = ', '.join(repr(k) for k in list(state)[:4])
    return f' The checkpoint has {len(state)} keys, e.g. {sample}.'
  other = hits[0][:len(hits[0]) - len(tail)]
  return (f" The checkpoint has {hits[0]!r}: its key prefix is {other!r}"
          f" (set the prefix option, e.g. --prefix={other}, or use the right --kind).")


def _check_shape(entry: _Entry, key: str, value: np.ndarray, expected: tuple, options: Mapping[str, Any],
                 notes: list[str]) -> np.ndarray:
  """Validates one tensor and returns it in PyTorch layout, stems already reduced to our channels."""
  want = _torch_shape(entry.kind, expected)
  got = tuple(value.shape)
  if entry.kind == 'video_stem' and len(got) == len(want) and got[:1] + got[2:] == want[:1] + want[2:]:
    if got[1] == want[1]:
      return value
    if got[1] == want[1] + 1:
      notes.append(f'{key}: kept the first {want[1]} (RGB) input channels of {got[1]}, dropped the face-mask channel')
      return value[:, :want[1]]
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
          f"on {got[1]} channels) or 'mean'.", key)
  if got != want:
    hint = ''
    if entry.kind == 'video_stem':
      hint = ' (3 RGB input channels, or 4 = RGB + face mask, whose mask channel is dropped)'
    raise ShapeMismatchError(
        f'{key!r} has shape {got}, expected {want}{hint} for {entry.target} (our shape {expected}).', key)
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


def _apply_map(state: Mapping[str, np.ndarray], names: _NameMap, expected: Mapping[Path, tuple], *,
               scopes: Sequence[str], dropped: Sequence[str], options: Mapping[str, Any],
               notes: list[str]) -> dict[Path, np.ndarray]:
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
            f'{entry.target}).' + _suggest_prefix(state, key, scopes), key)
      values.append(_check_shape(entry, key, state[key], expected[full], options, notes))
      used.add(key)
    value = _transform(entry.kind, values).astype(np.float32)
    if value.shape != expected[full]:  # only reachable through a bug in the map
      raise ConversionError(f'Internal: {entry.keys} became {value.shape}, {entry.target} is {expected[full]}.')
    flat[full] = value
  uncovered = [p for p in expected if p not in flat]
  if uncovered:
    raise ConversionError(f'Internal: no PyTorch key maps to {"/".join(uncovered[0])}.')
  drop = [re.compile(p) for p in dropped]
  unexpected = [k for k in state
                if k not in used and k not in names.optional and any(k.startswith(s) for s in scopes)
                and not any(p.search(k) for p in drop)]
  if unexpected:
    key = unexpected[0]
    raise UnexpectedKeyError(
        f'Unexpected key {key!r} of shape {tuple(np.shape(state[key]))} ({len(unexpected)} unexpected in '
        'all): it has no place in our model. Pass --ignore=REGEX to leave it out deliberately.', key)
  return flat


def _nest(flat: Mapping[Path, np.ndarray]) -> dict[str, Any]:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  tree = traverse_util.unflatten_dict(dict(flat))
  return {'params': tree.get('params', {}), 'batch_stats': tree.get('batch_stats', {})}


def convert_state_dict(state_dict: Any, kind: str, *, prefix: str = '', video_prefix: str = TSAV_VIDEO_PREFIX,
                       audio_prefix: str = TSAV_AUDIO_PREFIX, audio_stem: str = 'sum', width: float = 1.0,
                       dims: FusionDims | None = None, ignore: Iterable[str] = (),
                       notes: list[str] | None = None) -> dict[str, Any]:
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
  names = _NameMap()
  ignore = list(ignore)
  if kind == 'r2plus1d_18':
    expected = _encoder_shapes('video', width)
    _r2plus1d_map(names, prefix, expected)
    scopes, dropped = [prefix], ignore + [rf'^{re.escape(prefix)}fc\.']
  elif kind == 'resnet18':
    expected = _encoder_shapes('audio', width)
    _resnet18_map(names, prefix, expected)
    scopes, dropped = [prefix], ignore + [rf'^{re.escape(prefix)}fc\.']
  elif kind == 'tsav':
    expected = {**_encoder_shapes('video', width), **_encoder_shapes('audio', width)}
    _r2plus1d_map(names, video_prefix, expected)
    _resnet18_map(names, audio_prefix, expected)
    # The two-stream head `fc.*` and the sub-models' classifiers are dropped; nothing else may be left.
    scopes = ['']
    dropped = ignore + [r'^fc\.', rf'^{re.escape(video_prefix)}fc\.', rf'^{re.escape(audio_prefix)}fc\.']
  else:
    dims = dims or FusionDims()
    expected = _fusion_shapes(dims)
    _fusion_map(names, dims)
    scopes, dropped = [''], ignore
  flat = _apply_map(state, names, expected, scopes=scopes, dropped=dropped, options=options, notes=notes)
  return _nest(flat)


# ----------------------------------------------------------------------------------------------------
# Orbax checkpoint of the converted tree, and merging into a model's variables.


def count_parameters(tree: Any) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def save_converted(converted: Mapping[str, Any], output: str, *, metadata: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> str:
  """Writes {'params', 'batch_stats'} as an Orbax checkpoint at `output` (made absolute).

  The checkpoint is written into a hidden sibling directory and renamed into place at the end, so a
  failed conversion never leaves a directory that looks complete. Returns the absolute path.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output) and not overwrite:
    raise FileExistsError(f'{output} exists; pass overwrite=True (--overwrite) to replace it.')
  parent, name = os.path.split(output)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.partial-', dir=parent)
  try:
    tree = {'params': dict(converted.get('params', {})), 'batch_stats': dict(converted.get('batch_stats', {}))}
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
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No converted checkpoint at {path} (python -m iaca_jax.convert_torch writes one).')
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
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from flax.core import unfreeze  # pylint: disable=import-outside-toplevel
  flat_vars = traverse_util.flatten_dict(unfreeze(dict(variables)))
  flat_conv = traverse_util.flatten_dict(
      {c: unfreeze(dict(t)) for c, t in converted.items() if isinstance(t, Mapping) and t})
  if not flat_conv:
    raise ConversionError('The converted weights are empty.')
  for path, value in flat_conv.items():
    name = '/'.join(path)
    if path not in flat_vars:
      near = [p for p in flat_vars if p[:2] == path[:2]]
      hint = (' The model has no such subtree: initialise it on raw inputs for encoder weights, and with '
              "torch_layout=True, cross_attention='rjca', gating='stage1' or 'iaca' for the fusion weights."
              if not near else f" Nearby: {'/'.join(near[0])}.")
      raise ConversionError(f'Converted variable {name} does not exist in the model.{hint}', name)
    target = flat_vars[path]
    if tuple(np.shape(value)) != tuple(target.shape):
      raise ShapeMismatchError(
          f'Converted variable {name} has shape {tuple(np.shape(value))}, the model has {tuple(target.shape)}.',
          name)
    flat_vars[path] = jnp.asarray(value, dtype=target.dtype)
  return traverse_util.unflatten_dict(flat_vars)


def combine_converted(*converted: Mapping[str, Any]) -> dict[str, Any]:
  """One tree from several converted trees with disjoint variables (e.g. TSAV encoders + fusion)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat: dict[Path, Any] = {}
  for tree in converted:
    for path, value in traverse_util.flatten_dict({c: dict(t) for c, t in tree.items() if t}).items():
      if path in flat:
        raise ConversionError(f'{"/".join(path)} is converted twice; combine disjoint conversions only.',
                              '/'.join(path))
      flat[path] = value
  return _nest(flat)


# ----------------------------------------------------------------------------------------------------
# Command line.


def _read_metadata_or_empty(path: str) -> dict[str, Any]:
  try:
    meta = read_conversion_metadata(path)
  except FileNotFoundError:
    return {}
  return {k: meta[k] for k in ('kind', 'input', 'input_sha256', 'model_config') if k in meta}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def convert_checkpoint(input_path: str, output: str, kind: str, *, trust_pickle: bool = False,
                       overwrite: bool = False, also: Sequence[str] = (), **kwargs) -> dict[str, Any]:
  """Reads `input_path`, converts it (`convert_state_dict` kwargs), writes `output`; returns the metadata.

  also: directories of earlier conversions to include in the same checkpoint (disjoint variables).
  """
  state = load_torch_checkpoint(input_path, trust_pickle=trust_pickle)
  notes: list[str] = []
  converted = convert_state_dict(state, kind, notes=notes, **kwargs)
  included = []
  for path in also:
    converted = combine_converted(converted, load_converted(path))
    included.append({'path': os.path.abspath(path), **_read_metadata_or_empty(path)})
  dims = kwargs.get('dims') or FusionDims()
  metadata = {
      'kind': kind,
      'input': os.path.abspath(input_path),
      'input_sha256': _sha256(input_path),
      'num_torch_tensors': len(state),
      'num_params': count_parameters(converted['params']),
      'num_batch_stats': count_parameters(converted['batch_stats']),
      'options': {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                  for k, v in kwargs.items() if k != 'notes'},
      'notes': notes,
      'included': included,
      'model_config': {},   # the IACAModel settings these weights need
  }
  for entry in included:
    metadata['model_config'].update(entry.get('model_config', {}))
  metadata['model_config'].update(
      dims.model_kwargs() if kind == 'fusion' else
      {'encoder_width': kwargs.get('width', 1.0), 'encoder_blocks_per_stage': 2})
  metadata['output'] = save_converted(converted, output, metadata=metadata, overwrite=overwrite)
  return metadata


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m iaca_jax.convert_torch',
      description='Convert a PyTorch checkpoint (CPU) into an Orbax checkpoint of IACAModel variables.')
  p.add_argument('--kind', required=True, choices=KINDS, help='layout of the PyTorch checkpoint')
  p.add_argument('--input', required=True, help='PyTorch checkpoint file (.pt/.pth/.pth.tar)')
  p.add_argument('--output', required=True, help='directory to write (made absolute; must not exist)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  p.add_argument('--prefix', default='', help="r2plus1d_18/resnet18: key prefix of the encoder, e.g. "
                 f"'{TSAV_VIDEO_PREFIX}' (keys outside it are left out)")
  p.add_argument('--video_prefix', default=TSAV_VIDEO_PREFIX, help='tsav: prefix of the R(2+1)D-18 keys')
  p.add_argument('--audio_prefix', default=TSAV_AUDIO_PREFIX, help='tsav: prefix of the ResNet-18 keys')
  p.add_argument('--audio_stem', default='sum', choices=AUDIO_STEM_MODES,
                 help='a 3-channel ResNet-18 stem for the 1-channel audio encoder: sum (default) or mean '
                      'over input channels, or exact (refuse)')
  p.add_argument('--width', type=float, default=1.0, help='encoder width multiplier (1.0 = torchvision)')
  p.add_argument('--ignore', action='append', default=[], metavar='REGEX',
                 help='leave out keys matching REGEX (repeatable)')
  defaults = FusionDims()
  for field in dataclasses.fields(FusionDims):
    p.add_argument(f'--{field.name}', type=int, default=getattr(defaults, field.name),
                   help=f'fusion: {field.name} (default {getattr(defaults, field.name)})')
  p.add_argument('--also', action='append', default=[], metavar='DIR',
                 help='an earlier converted directory to include in --output (repeatable), e.g. the TSAV '
                      'encoders next to the fusion model')
  p.add_argument('--trust_pickle', action='store_true',
                 help='torch.load(weights_only=False): only for checkpoints from a trusted source')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  kwargs: dict[str, Any] = dict(audio_stem=args.audio_stem, width=args.width, ignore=args.ignore)
  if args.kind in ('r2plus1d_18', 'resnet18'):
    kwargs['prefix'] = args.prefix
  elif args.kind == 'tsav':
    kwargs.update(video_prefix=args.video_prefix, audio_prefix=args.audio_prefix)
  else:
    kwargs['dims'] = FusionDims(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FusionDims)})
  try:
    metadata = convert_checkpoint(args.input, args.output, args.kind, trust_pickle=args.trust_pickle,
                                  overwrite=args.overwrite, also=args.also, **kwargs)
  except (ConversionError, FileExistsError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for note in metadata['notes']:
    print(f'note: {note}')
  print(f"wrote {metadata['num_params']:,} parameters and {metadata['num_batch_stats']:,} BatchNorm statistics "
        f"({args.kind}) to {metadata['output']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
