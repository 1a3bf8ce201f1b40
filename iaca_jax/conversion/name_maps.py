"""Name maps from PyTorch state dicts onto `IACAModel` variables (applied and checked in `state_dict`).

Every tensor is mapped by an explicit entry: torch key(s), our variable, and the layout transform.

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
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from iaca_jax.pretrained import Path

KINDS = ('r2plus1d_18', 'resnet18', 'tsav', 'fusion')
AUDIO_STEM_MODES = ('sum', 'mean', 'exact')
TSAV_VIDEO_PREFIX = 'video_model.r2plus1d.'
TSAV_AUDIO_PREFIX = 'audio_model.resnet.'
VIDEO_OUT = ('encoders', 'video_encoder')
AUDIO_OUT = ('encoders', 'audio_encoder')


@dataclasses.dataclass(frozen=True)
class FusionDims:
  """Sizes of the authors' fusion model (the paper's defaults); they fix the expected shapes."""

  clips: int = 16  # L: the RJCA key Dense is L x L
  features: int = 512  # d: feature width of every stream (audio and visual channels too)
  lstm_hidden: int = 256  # per direction
  iterations: int = 2  # RJCA iterations (`coattn.dcn_layers.N`)
  head_hidden: int = 128
  positions: int = 49  # 7 x 7 visual positions

  def model_kwargs(self) -> dict[str, Any]:
    """The `IACAModel` settings under which the converted fusion weights compute the authors' model."""
    return dict(
      features=self.features,
      lstm_hidden=self.lstm_hidden,
      cross_attention='rjca',
      rjca_iterations=self.iterations,
      gating='stage1',
      head_hidden=self.head_hidden,
      torch_layout=True,
    )


@dataclasses.dataclass(frozen=True)
class Entry:
  """Torch key(s) -> one of our variables. `kind` names the layout transform."""

  collection: str  # 'params' | 'batch_stats'
  path: Path  # inside the collection
  keys: tuple[str, ...]  # torch keys read (several only for the LSTM's two biases)
  kind: str  # 'same' | 'linear' | 'conv' | 'sum' | 'video_stem' | 'audio_stem'

  @property
  def target(self) -> str:
    return '/'.join((self.collection,) + self.path)


class NameMap:
  """Builds the entries of one conversion; the helpers mirror PyTorch's module types."""

  def __init__(self):
    self.entries: list[Entry] = []
    self.optional: set[str] = set()  # keys read if present, never required (num_batches_tracked)

  def add(self, key: str, path: Path, kind: str = 'same', collection: str = 'params'):
    self.entries.append(Entry(collection, path, (key,), kind))

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
        self.entries.append(
          Entry(
            'params',
            cell + ('bias',),
            (f'{prefix}.rnn.bias_ih_l{layer}{suffix}', f'{prefix}.rnn.bias_hh_l{layer}{suffix}'),
            'sum',
          )
        )
    self.add(f'{prefix}.init_hidden', path + ('rnn', 'init_hidden'))
    self.linear(f'{prefix}.linear', path + ('linear',))


def r2plus1d_map(names: NameMap, prefix: str, expected: Mapping[Path, tuple], out: Path = VIDEO_OUT):
  """torchvision r2plus1d_18 -> our R2Plus1D18 (`stem.0/1/3/4`, `layerX.Y.convZ.0.{0,1,3}`, `.convZ.1`)."""
  names.conv(f'{prefix}stem.0', out + ('stem_spatial_conv',), 'video_stem')
  names.batch_norm(f'{prefix}stem.1', out + ('stem_spatial_bn',))
  names.conv(f'{prefix}stem.3', out + ('stem_temporal_conv',))
  names.batch_norm(f'{prefix}stem.4', out + ('stem_temporal_bn',))
  for stage, block in encoder_blocks(expected, out):
    t, f = f'{prefix}layer{stage}.{block}.', out + (f'layer{stage}_{block}',)
    for c in (1, 2):
      names.conv(f'{t}conv{c}.0.0', f + (f'conv{c}', 'spatial_conv'))
      names.batch_norm(f'{t}conv{c}.0.1', f + (f'conv{c}', 'mid_bn'))
      names.conv(f'{t}conv{c}.0.3', f + (f'conv{c}', 'temporal_conv'))
      names.batch_norm(f'{t}conv{c}.1', f + (f'bn{c}',))
    if ('params',) + f + ('downsample_conv', 'kernel') in expected:
      names.conv(f'{t}downsample.0', f + ('downsample_conv',))
      names.batch_norm(f'{t}downsample.1', f + ('downsample_bn',))


def resnet18_map(names: NameMap, prefix: str, expected: Mapping[Path, tuple], out: Path = AUDIO_OUT):
  """torchvision resnet18 -> our ResNet18 (`conv1`, `bn1`, `layerX.Y.{conv1,bn1,conv2,bn2,downsample}`)."""
  names.conv(f'{prefix}conv1', out + ('conv1',), 'audio_stem')
  names.batch_norm(f'{prefix}bn1', out + ('bn1',))
  for stage, block in encoder_blocks(expected, out):
    t, f = f'{prefix}layer{stage}.{block}.', out + (f'layer{stage}_{block}',)
    for c in (1, 2):
      names.conv(f'{t}conv{c}', f + (f'conv{c}',))
      names.batch_norm(f'{t}bn{c}', f + (f'bn{c}',))
    if ('params',) + f + ('downsample_conv', 'kernel') in expected:
      names.conv(f'{t}downsample.0', f + ('downsample_conv',))
      names.batch_norm(f'{t}downsample.1', f + ('downsample_bn',))


def encoder_blocks(expected: Mapping[Path, tuple], out: Path) -> list[tuple[int, int]]:
  """(stage, block) pairs present in our encoder, in order."""
  found = set()
  for path in expected:
    if path[1 : 1 + len(out)] == out and len(path) > len(out) + 1:
      m = re.fullmatch(r'layer(\d+)_(\d+)', path[1 + len(out)])
      if m:
        found.add((int(m.group(1)), int(m.group(2))))
  return sorted(found)


def fusion_map(names: NameMap, dims: FusionDims):
  """The authors' fusion model (docs/DESIGN.md §A) -> our IACAModel with rjca + stage-1 gates."""
  names.residual_blstm('audio_extract', ('audio_temporal',))
  attn = 'video_attn.attn'
  for name, bias in (
    ('affine_audio', True),
    ('affine_video', True),
    ('affine_v', False),
    ('affine_g', False),
    ('affine_h', False),
    ('affine_feat', True),
  ):
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
