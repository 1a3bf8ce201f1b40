"""PyTorch reference modules for the converter tests (torch only; imported after `importorskip`).

Written for these tests from docs/DESIGN.md §3 and §A and torchvision's published architectures; every
parameter name equals the one in the real state dicts, so that a state dict of these modules has the
same keys and shapes as the checkpoints the converter reads:
  - `r2plus1d_18()` / `resnet18()`: torchvision's `models.video.r2plus1d_18` / `models.resnet18`
    (torchvision itself is not importable next to the pinned torch, so the structure is rebuilt here);
  - `TwoStreamAuralVisualModel`: Kuhnke et al.'s TSAV (ABAW 2020) two-stream model, 4-channel video
    stem, 1-channel audio stem, classifier heads replaced by identities (`video_model.r2plus1d.*`,
    `audio_model.resnet.*`, `fc.1.*`);
  - `FusionModel`: the authors' fusion model (their `CAM` with RJCA and stage-1 gates), module names
    `audio_extract`, `video_extract`, `Joint`, `video_attn.attn`, `coattn.dcn_layers.N`,
    `audio_gating_fc_layer`, `video_gating_fc_layer`, `vregressor`, `aregressor`.
`randomize_(module, seed)` gives every parameter and BatchNorm running statistic non-trivial random
values so that the mapping of each tensor is really exercised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# torchvision R(2+1)D-18 (models/video/resnet.py structure)


class Conv2Plus1D(nn.Sequential):
  """(1,3,3) spatial conv, BN, ReLU, (3,1,1) temporal conv: keys `.0`, `.1`, `.3`."""

  def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1):
    super().__init__(
      nn.Conv3d(in_planes, midplanes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
      nn.BatchNorm3d(midplanes),
      nn.ReLU(inplace=True),
      nn.Conv3d(midplanes, out_planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
    )


class VideoBasicBlock(nn.Module):
  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
    self.conv1 = nn.Sequential(
      Conv2Plus1D(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True)
    )
    self.conv2 = nn.Sequential(Conv2Plus1D(planes, planes, midplanes), nn.BatchNorm3d(planes))
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    residual = x if self.downsample is None else self.downsample(x)
    return self.relu(self.conv2(self.conv1(x)) + residual)


class VideoResNet(nn.Module):
  """torchvision VideoResNet with the R(2+1)D stem and `Conv2Plus1D` blocks, [2, 2, 2, 2]."""

  def __init__(self, num_classes: int = 400, in_channels: int = 3):
    super().__init__()
    self.inplanes = 64
    self.stem = nn.Sequential(
      nn.Conv3d(in_channels, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
      nn.BatchNorm3d(45),
      nn.ReLU(inplace=True),
      nn.Conv3d(45, 64, (3, 1, 1), (1, 1, 1), (1, 0, 0), bias=False),
      nn.BatchNorm3d(64),
      nn.ReLU(inplace=True),
    )
    self.layer1 = self._make_layer(64, 2, 1)
    self.layer2 = self._make_layer(128, 2, 2)
    self.layer3 = self._make_layer(256, 2, 2)
    self.layer4 = self._make_layer(512, 2, 2)
    self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
    self.fc = nn.Linear(512, num_classes)

  def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes:
      downsample = nn.Sequential(
        nn.Conv3d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm3d(planes)
      )
    layers = [VideoBasicBlock(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes
    layers += [VideoBasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def features(self, x):
    """(N, C, T, H, W) -> the layer-4 map (N, 512, T/8, H/16, W/16), before pooling."""
    x = self.stem(x)
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  def forward(self, x):
    return self.fc(self.avgpool(self.features(x)).flatten(1))


def r2plus1d_18(num_classes: int = 400, in_channels: int = 3) -> VideoResNet:
  return VideoResNet(num_classes, in_channels)


# ----------------------------------------------------------------------------------------------------
# torchvision ResNet-18 (models/resnet.py structure)


class BasicBlock(nn.Module):
  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
  def __init__(self, num_classes: int = 1000, in_channels: int = 3):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(64, 2, 1)
    self.layer2 = self._make_layer(128, 2, 2)
    self.layer3 = self._make_layer(256, 2, 2)
    self.layer4 = self._make_layer(512, 2, 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, num_classes)

  def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes:
      downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )
    layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def features(self, x):
    """(N, C, H, W) -> globally average-pooled (N, 512)."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.avgpool(x).flatten(1)

  def forward(self, x):
    return self.fc(self.features(x))


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
  return ResNet(num_classes, in_channels)


# ----------------------------------------------------------------------------------------------------
# Kuhnke et al.'s two-stream aural-visual model (TSAV), with its heads replaced by identities.


class VideoModel(nn.Module):
  def __init__(self, num_channels: int = 4):
    super().__init__()
    self.r2plus1d = r2plus1d_18(in_channels=num_channels)
    self.r2plus1d.fc = nn.Identity()


class AudioModel(nn.Module):
  def __init__(self):
    super().__init__()
    self.resnet = resnet18(in_channels=1)
    self.resnet.fc = nn.Identity()


class TwoStreamAuralVisualModel(nn.Module):
  """State dict: `video_model.r2plus1d.*` (4-channel stem), `audio_model.resnet.*`, `fc.1.*`."""

  def __init__(self, num_channels: int = 4):
    super().__init__()
    self.audio_model = AudioModel()
    self.video_model = VideoModel(num_channels)
    self.fc = nn.Sequential(nn.Dropout(0.0), nn.Linear(1024, 17))


# ----------------------------------------------------------------------------------------------------
# The authors' fusion model (docs/DESIGN.md §A).


class ResidualBLSTM(nn.Module):
  """[x, BLSTM(x)] -> dropout -> `linear` -> L2-normalise; learnable initial state `init_hidden`."""

  def __init__(self, input_size: int, features: int, num_layers: int = 2, dropout: float = 0.1):
    super().__init__()
    self.hidden = features // 2
    self.num_layers = num_layers
    self.rnn = nn.LSTM(
      input_size, self.hidden, num_layers=num_layers, dropout=dropout, bidirectional=True, batch_first=True
    )
    self.linear = nn.Linear(input_size + features, features)
    self.dropout = nn.Dropout(dropout)
    self.init_hidden = nn.Parameter(nn.init.xavier_uniform_(torch.empty(4 * num_layers, self.hidden)))

  def forward(self, x):
    rows, batch = 2 * self.num_layers, x.shape[0]
    h0 = self.init_hidden[:rows, None, :].expand(rows, batch, self.hidden).contiguous()
    c0 = self.init_hidden[rows:, None, :].expand(rows, batch, self.hidden).contiguous()
    y, _ = self.rnn(x, (h0, c0))
    return F.normalize(self.linear(self.dropout(torch.cat([x, y], dim=-1))), dim=-1)


class PositionAttention(nn.Module):
  """Audio-guided attention over the 49 rows of each clip's channel-major 25088 vector."""

  def __init__(self, dim: int = 512, positions: int = 49, channels: int = 512):
    super().__init__()
    self.positions, self.channels = positions, channels
    self.affine_audio = nn.Linear(dim, dim)
    self.affine_video = nn.Linear(channels, dim)
    self.affine_v = nn.Linear(dim, positions, bias=False)
    self.affine_g = nn.Linear(dim, positions, bias=False)
    self.affine_h = nn.Linear(positions, 1, bias=False)
    self.affine_feat = nn.Linear(channels, dim)

  def forward(self, video, audio):
    """video (B, L, P*C) channel-major, audio (B, L, dim) -> (B, L, dim); also alpha (B*L, P)."""
    b, l = video.shape[:2]
    values = video.reshape(b * l, self.positions, self.channels)  # rows: chunks of C (the quirk)
    u = torch.relu(self.affine_video(values))  # (N, P, dim)
    g = torch.relu(self.affine_audio(audio.reshape(b * l, -1)))  # (N, dim)
    content = self.affine_v(u) + self.affine_g(g)[:, :, None]  # audio term indexed by the row
    z = self.affine_h(torch.tanh(content))[..., 0]  # (N, P)
    alpha = torch.softmax(z, dim=-1)
    attended = torch.einsum('np,npc->nc', alpha, values)
    return self.affine_feat(attended.reshape(b, l, self.channels)), alpha


class SpatialAttention(nn.Module):
  """Holder giving the key prefix `video_attn.attn.*`."""

  def __init__(self, dim: int = 512, positions: int = 49, channels: int = 512):
    super().__init__()
    self.attn = PositionAttention(dim, positions, channels)

  def forward(self, video, audio):
    return self.attn(video, audio)[0]


class DenseCoAttention(nn.Module):
  def __init__(self, dim1: int, dim2: int, clips: int, dropout: float):
    super().__init__()
    dim = dim1 + dim2
    self.query_linear = nn.Linear(dim, dim)
    self.key1_linear = nn.Linear(clips, clips)
    self.key2_linear = nn.Linear(clips, clips)
    self.value1_linear = nn.Linear(dim1, dim1)
    self.value2_linear = nn.Linear(dim2, dim2)
    self.dropouts = nn.ModuleList([nn.Dropout(dropout) for _ in range(2)])

  def forward(self, x1, x2):
    joint = self.query_linear(torch.cat([x1, x2], dim=-1))  # (B, L, D)
    scale = math.sqrt(joint.shape[-1])
    out = []
    for x, key, value, drop in (
      (x1, self.key1_linear, self.value1_linear, self.dropouts[0]),
      (x2, self.key2_linear, self.value2_linear, self.dropouts[1]),
    ):
      k = key(x.transpose(1, 2))  # (B, d, L), Linear over L
      s = drop(torch.tanh(torch.bmm(k, joint) / scale))  # (B, d, D)
      out.append(torch.relu(torch.tanh(torch.bmm(value(x), s))))  # (B, L, D)
    return out[0], out[1]


class DenseCoAttentionSubLayer(nn.Module):
  def __init__(self, dim1: int, dim2: int, clips: int, dropout: float):
    super().__init__()
    self.dense_coattn = DenseCoAttention(dim1, dim2, clips, dropout)
    self.linears = nn.ModuleList(
      [nn.Sequential(nn.Linear(dim1 + dim2, dim), nn.ReLU(), nn.Dropout(dropout)) for dim in (dim1, dim2)]
    )

  def forward(self, x1, x2):
    h1, h2 = self.dense_coattn(x1, x2)
    return x1 + self.linears[0](h1), x2 + self.linears[1](h2)


class DenseCoAttentionStack(nn.Module):
  def __init__(self, dim1: int, dim2: int, clips: int, layers: int, dropout: float):
    super().__init__()
    self.dcn_layers = nn.ModuleList(
      [DenseCoAttentionSubLayer(dim1, dim2, clips, dropout) for _ in range(layers)]
    )

  def forward(self, x1, x2):
    for layer in self.dcn_layers:
      x1, x2 = layer(x1, x2)
    return x1, x2


def stage1_gate(fc: nn.Linear, x, attended, temperature: float = 0.1):
  """ReLU(w0 x + w1 attended), w = softmax(fc(attended) / T); returns (gated, w)."""
  w = torch.softmax(fc(attended) / temperature, dim=-1)
  return torch.relu(w[..., :1] * x + w[..., 1:] * attended), w


class FusionModel(nn.Module):
  """The authors' fusion model (their `CAM`): RJCA with 2 iterations and stage-1 gates."""

  def __init__(
    self,
    features: int = 512,
    clips: int = 16,
    positions: int = 49,
    iterations: int = 2,
    head_hidden: int = 128,
  ):
    super().__init__()
    d = features
    self.positions = positions
    self.audio_extract = ResidualBLSTM(d, d, 2, 0.1)
    self.video_attn = SpatialAttention(d, positions, d)
    self.video_extract = ResidualBLSTM(d, d, 2, 0.1)
    self.coattn = DenseCoAttentionStack(d, d, clips, iterations, 0.6)
    self.audio_gating_fc_layer = nn.Linear(d, 2)
    self.video_gating_fc_layer = nn.Linear(d, 2)
    self.Joint = ResidualBLSTM(2 * d, d, 2, 0.0)
    head = lambda: nn.Sequential(
      nn.Linear(d, head_hidden), nn.ReLU(), nn.Dropout(0.6), nn.Linear(head_hidden, 1)
    )
    self.vregressor = head()
    self.aregressor = head()

  def forward(self, audio, video):
    """audio (B, L, d), video (B, L, P*C) channel-major -> valence (B, L), arousal (B, L)."""
    video = F.normalize(video, dim=-1)
    audio = F.normalize(audio, dim=-1)
    audio = self.audio_extract(audio)
    video = self.video_extract(self.video_attn(video, audio))
    att_video, att_audio = self.coattn(video, audio)
    gated_video, _ = stage1_gate(self.video_gating_fc_layer, video, att_video)
    gated_audio, _ = stage1_gate(self.audio_gating_fc_layer, audio, att_audio)
    joint = self.Joint(torch.cat([gated_video, gated_audio], dim=-1))
    return self.vregressor(joint)[..., 0], self.aregressor(joint)[..., 0]


# ----------------------------------------------------------------------------------------------------


def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
  """Non-trivial random values for every parameter and BN running statistic; eval() mode.

  Weights are uniform with variance-preserving scales (He scale for the convolutions); biases,
  `init_hidden`, BatchNorm affine parameters and running statistics get random values away from their
  defaults (0 / 1), so that a missed or swapped mapping shows in the outputs.
  """
  gen = torch.Generator().manual_seed(seed)
  rand = lambda t, lo, hi: lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=t.dtype)
  bn_params = set()
  with torch.no_grad():
    for prefix, m in module.named_modules():
      if isinstance(m, nn.modules.batchnorm._BatchNorm):
        bn_params.update(f'{prefix}.{n}' if prefix else n for n in ('weight', 'bias'))
        m.weight.copy_(rand(m.weight, 0.5, 1.5))
        m.bias.copy_(rand(m.bias, -0.2, 0.2))
        m.running_mean.copy_(rand(m.running_mean, -0.2, 0.2))
        m.running_var.copy_(rand(m.running_var, 0.5, 1.5))
        m.num_batches_tracked.fill_(7)
    for name, p in module.named_parameters():
      if name in bn_params:
        continue
      if name.endswith('init_hidden'):
        p.copy_(rand(p, -0.5, 0.5))
      elif p.ndim >= 2:
        fan_in = math.prod(p.shape[1:])
        gain = 6.0 if p.ndim >= 3 else 3.0  # He scale for the convolutions (followed by ReLU)
        bound = scale * math.sqrt(gain / fan_in)
        p.copy_(rand(p, -bound, bound))
      else:
        p.copy_(rand(p, -0.2 * scale, 0.2 * scale))
  return module.eval()
