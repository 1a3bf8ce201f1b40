"""Visual and audio encoders: R(2+1)D-18 and a 1-channel-stem ResNet-18 (torchvision's block structure).

Both follow torchvision's `r2plus1d_18` / `resnet18` without the classifier: at `width=1.0` and
`blocks_per_stage=2` the parameter counts equal torchvision's (tests/test_models.py states them).
Submodule names mirror torchvision's state-dict structure so that the PyTorch conversion (`iaca_jax.conversion`) is a name map.
Inputs are channels-last: video (N, T, H, W, 3), spectrogram (N, H=mels, W=time, 1).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch BatchNorm: momentum 0.1 on the new value == Flax momentum 0.9 on the running value.
EPSILON = 1e-5


class RunningAverageBatchNorm(nn.Module):
  """BatchNorm on its running averages as one per-channel affine map in the compute dtype: the same
  variables as `nn.BatchNorm` (params scale, bias; batch_stats mean, var) and its value up to the
  rounding of that dtype.

  Why not nn.BatchNorm: it normalises in float32 whatever its dtype, so a bf16 encoder's every
  activation is written once more in float32 (plus its layout copies): the frozen R(2+1)D-18 at 8
  sequences per TPU v5e chip needed 14.97 GiB of temporaries and 169 GB of memory traffic a step
  (docs/SCALING.md, "What the compiles found").
  """

  dtype: Dtype = jnp.float32
  epsilon: float = EPSILON

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    features = x.shape[-1]
    mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32)).value
    var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32)).value
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)  # (C,) in float32
    shift = bias - mean * multiplier
    return x.astype(self.dtype) * multiplier.astype(self.dtype) + shift.astype(self.dtype)


def _BatchNorm(
  *, use_running_average: bool, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.Module:
  """nn.BatchNorm with PyTorch's momentum and epsilon; on running averages in a low-precision dtype,
  `RunningAverageBatchNorm` (float32 runs keep nn.BatchNorm, bit for bit)."""
  if use_running_average and jnp.dtype(dtype) != jnp.float32:
    return RunningAverageBatchNorm(dtype=dtype, name=name)
  return nn.BatchNorm(
    use_running_average=use_running_average, momentum=0.9, epsilon=EPSILON, dtype=dtype, name=name
  )


BASE_WIDTHS = (64, 128, 256, 512)
R2PLUS1D_STEM_WIDTH = 45


class FactoredConv3D(nn.Module):
  """A 3-D convolution whose kernel is purely spatial (1, kh, kw) or purely temporal (kt, 1, 1), run
  as the equivalent 2-D convolution: XLA's CPU backend runs those 2-7x faster than 3-D ones.

  The parameter is `kernel` (kt, kh, kw, in, out), as `nn.Conv` names and initialises it, so weights
  map one-to-one from PyTorch's Conv3d. Input (N, T, H, W, C); padding is symmetric per axis.
  """

  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int] = (1, 1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kt, kh, kw = self.kernel_size
    st, sh, sw = self.strides
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features))
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    n, t, h, w, c = x.shape
    conv2d = lambda y, k, strides, pad: jax.lax.conv_general_dilated(
      y, k, strides, pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    if kt == 1 and st == 1:  # spatial: fold time into the batch
      y = conv2d(x.reshape(n * t, h, w, c), kernel[0], (sh, sw), ((kh // 2,) * 2, (kw // 2,) * 2))
      return y.reshape(n, t, *y.shape[1:])
    if kh == kw == 1:  # temporal (or 1x1x1): fold space
      x = x[:, :, ::sh, ::sw]
      h, w = x.shape[2:4]
      y = conv2d(x.reshape(n, t, h * w, c), kernel[:, 0], (st, 1), ((kt // 2,) * 2, (0, 0)))
      return y.reshape(n, y.shape[1], h, w, -1)
    raise ValueError(f'FactoredConv3D needs a (1, kh, kw) or (kt, 1, 1) kernel, got {self.kernel_size}.')


class Conv2D(nn.Module):
  """`nn.Conv` without bias for NHWC maps (same `kernel` parameter, initialiser and result), except
  that a kernel window covering at least as many positions as the output map runs as patches @ kernel.

  XLA swaps the operands of such a convolution (the activation becomes the kernel), and its CPU
  backend then runs it ~100x slower than the equivalent matmul: the 3x3 convs of the audio
  ResNet-18's last stage, on a 2x4 map, took 1.6 s each at 32 clips (docs/PERFORMANCE.md).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kh, kw = self.kernel_size
    sh, sw = self.strides
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    (pt, pb), (pl, pr) = self.padding
    n, h, w, c = x.shape
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    if oh * ow > kh * kw or kh * kw == 1:
      return jax.lax.conv_general_dilated(
        x, kernel, self.strides, self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    patches = jnp.stack(
      [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
      ],
      axis=3,
    )  # (N, oh, ow, kh*kw, C)
    return jnp.einsum('nhwkc,kco->nhwo', patches, kernel.reshape(kh * kw, c, self.features))


def scaled_widths(width: float) -> tuple[int, ...]:
  """Channel counts of the four stages at a width multiplier (1.0 = torchvision)."""
  return tuple(max(1, int(round(c * width))) for c in BASE_WIDTHS)


def r2plus1d_mid_channels(in_channels: int, out_channels: int) -> int:
  """torchvision's midplanes: keeps the (2+1)D block's parameter count equal to a full 3x3x3 conv."""
  return (in_channels * out_channels * 27) // (in_channels * 9 + 3 * out_channels)


class Conv2Plus1D(nn.Module):
  """A 1x3x3 spatial conv, BatchNorm, ReLU, then a 3x1x1 temporal conv (torchvision `Conv2Plus1D`)."""

  mid_channels: int
  out_channels: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    s = self.stride
    x = FactoredConv3D(self.mid_channels, (1, 3, 3), (1, s, s), self.dtype, name='spatial_conv')(x)
    x = _BatchNorm(use_running_average=not train or self.frozen_bn, dtype=self.dtype, name='mid_bn')(x)
    x = nn.relu(x)
    return FactoredConv3D(self.out_channels, (3, 1, 1), (s, 1, 1), self.dtype, name='temporal_conv')(x)


class BasicBlock3D(nn.Module):
  """Residual block of two (2+1)D convs; a strided 1x1x1 conv shortcut when the shape changes."""

  channels: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    bn = functools.partial(_BatchNorm, use_running_average=not train or self.frozen_bn, dtype=self.dtype)
    conv = functools.partial(
      Conv2Plus1D,
      r2plus1d_mid_channels(x.shape[-1], self.channels),
      self.channels,
      frozen_bn=self.frozen_bn,
      dtype=self.dtype,
    )
    y = nn.relu(bn(name='bn1')(conv(stride=self.stride, name='conv1')(x, train=train)))
    y = bn(name='bn2')(conv(stride=1, name='conv2')(y, train=train))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = FactoredConv3D(self.channels, (1, 1, 1), (self.stride,) * 3, self.dtype, name='downsample_conv')(x)
      x = bn(name='downsample_bn')(x)
    return nn.relu(y + x)


class R2Plus1D18(nn.Module):
  """R(2+1)D-18 trunk; returns the layer-4 feature map without pooling.

  Input (N, T, H, W, 3); output (N, T/8, H/16, W/16, 512 * width): (N, 1, 7, 7, 512) for 8x112x112 clips.
  """

  width: float = 1.0
  blocks_per_stage: int = 2
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    bn = functools.partial(_BatchNorm, use_running_average=not train or self.frozen_bn, dtype=self.dtype)
    widths = scaled_widths(self.width)
    stem = max(1, int(round(R2PLUS1D_STEM_WIDTH * self.width)))
    x = x.astype(self.dtype)
    x = FactoredConv3D(stem, (1, 7, 7), (1, 2, 2), self.dtype, name='stem_spatial_conv')(x)
    x = nn.relu(bn(name='stem_spatial_bn')(x))
    x = FactoredConv3D(widths[0], (3, 1, 1), (1, 1, 1), self.dtype, name='stem_temporal_conv')(x)
    x = nn.relu(bn(name='stem_temporal_bn')(x))
    for stage, channels in enumerate(widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock3D(channels, stride, self.frozen_bn, self.dtype, name=f'layer{stage + 1}_{block}')(
          x, train=train
        )
    return x


class BasicBlock2D(nn.Module):
  """ResNet basic block: two 3x3 convs with BatchNorm; a strided 1x1 conv shortcut when needed."""

  channels: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    bn = functools.partial(_BatchNorm, use_running_average=not train or self.frozen_bn, dtype=self.dtype)
    conv = functools.partial(Conv2D, self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)
    y = nn.relu(bn(name='bn1')(conv(strides=(self.stride, self.stride), name='conv1')(x)))
    y = bn(name='bn2')(conv(name='conv2')(y))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = Conv2D(self.channels, (1, 1), (self.stride, self.stride), dtype=self.dtype, name='downsample_conv')(
        x
      )
      x = bn(name='downsample_bn')(x)
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """ResNet-18 trunk with global average pooling.

  Input (N, H, W, C_in) (a log-mel is (N, 64, 104, 1)); output (N, 512 * width).
  """

  width: float = 1.0
  blocks_per_stage: int = 2
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    bn = functools.partial(_BatchNorm, use_running_average=not train or self.frozen_bn, dtype=self.dtype)
    widths = scaled_widths(self.width)
    x = x.astype(self.dtype)
    x = Conv2D(widths[0], (7, 7), (2, 2), padding=((3, 3), (3, 3)), dtype=self.dtype, name='conv1')(x)
    x = nn.relu(bn(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, channels in enumerate(widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock2D(channels, stride, self.frozen_bn, self.dtype, name=f'layer{stage + 1}_{block}')(
          x, train=train
        )
    return jnp.mean(x, axis=(1, 2))
