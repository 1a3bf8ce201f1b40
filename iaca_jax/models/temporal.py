"""Temporal blocks: a fused-gate LSTM, a stacked bidirectional LSTM with a learnable initial state, and
the residual BLSTM block of docs/DESIGN.md §3.3 (BLSTM, concatenate with its input, dropout, Dense, L2-normalise).

The LSTM keeps PyTorch's layout (gates i, f, g, o in one (in, 4H) kernel) so that PyTorch weights map
one-to-one; the input projection of all time steps is one matmul outside the recurrence.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.models.kernels import XLA, Kernels

Dtype = Any


def l2_normalize(
  x: jnp.ndarray, axis: int | tuple[int, ...] = -1, eps: float = 1e-12, kernels: Kernels = XLA
) -> jnp.ndarray:
  """x / max(||x||, eps) (PyTorch's F.normalize) over `axis` (trailing axes), computed in float32."""
  axes = sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
  if axes != list(range(x.ndim - len(axes), x.ndim)):
    raise ValueError(f'l2_normalize normalises over trailing axes; got axis={axis} for shape {x.shape}')
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(kernels.sum_trailing(jnp.square(x32), len(axes)))
  norm = norm.reshape(norm.shape + (1,) * len(axes))
  return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def _uniform(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


class LSTMLayer(nn.Module):
  """One direction of one LSTM layer. (B, T, F) -> (B, T, H); `reverse` runs right to left."""

  hidden: int
  reverse: bool = False
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x: jnp.ndarray, h0: jnp.ndarray, c0: jnp.ndarray) -> jnp.ndarray:
    init = _uniform(self.hidden**-0.5)  # PyTorch's LSTM initialisation
    w_in = self.param('kernel_input', init, (x.shape[-1], 4 * self.hidden))
    w_hid = self.param('kernel_hidden', init, (self.hidden, 4 * self.hidden))
    bias = self.param('bias', init, (4 * self.hidden,))
    inputs = self.kernels.matmul(x.astype(self.dtype), w_in.astype(self.dtype))
    inputs = jnp.swapaxes(inputs, 0, 1)  # (T, B, 4H)
    inputs = self.kernels.add_bias(inputs.astype(jnp.float32), bias.astype(jnp.float32))
    w_hid = w_hid.astype(self.dtype)

    def step(carry, gates_in):
      h, c = carry
      gates = gates_in + jnp.dot(h.astype(self.dtype), w_hid).astype(jnp.float32)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    carry = (h0.astype(jnp.float32), c0.astype(jnp.float32))
    _, hs = jax.lax.scan(step, carry, inputs, reverse=self.reverse)
    return jnp.swapaxes(hs, 0, 1).astype(self.dtype)  # (B, T, H)


class BLSTM(nn.Module):
  """Stacked bidirectional LSTM with a learnable initial state shared by the batch.

  `init_hidden` has PyTorch's (num_layers * 2 directions) rows of h0 followed by the same rows of c0.
  (B, T, F) -> (B, T, 2 * hidden).
  """

  hidden: int
  num_layers: int = 2
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    rows = 2 * self.num_layers
    init_state = self.param('init_hidden', nn.initializers.zeros_init(), (2 * rows, self.hidden))
    batch = x.shape[0]
    state = lambda row: jnp.broadcast_to(init_state[row], (batch, self.hidden))
    for layer in range(self.num_layers):
      if layer > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
      outputs = []
      for direction in range(2):
        row = 2 * layer + direction
        lstm = LSTMLayer(
          self.hidden,
          reverse=direction == 1,
          dtype=self.dtype,
          kernels=self.kernels,
          name=f'layer{layer}_{"backward" if direction else "forward"}',
        )
        outputs.append(lstm(x, state(row), state(rows + row)))
      x = jnp.concatenate(outputs, axis=-1)
    return x


class ResidualBLSTM(nn.Module):
  """docs/DESIGN.md §3.3: [x, BLSTM(x)] -> dropout -> Dense(features) -> L2-normalise. (B, T, F) -> (B, T, features)."""

  features: int = 512
  hidden: int = 256
  num_layers: int = 2
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    rnn = BLSTM(self.hidden, self.num_layers, self.dropout, self.dtype, self.kernels, name='rnn')
    y = rnn(x, train=train)
    y = jnp.concatenate([x.astype(y.dtype), y], axis=-1)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = self.kernels.dense(self.features, dtype=self.dtype, name='linear')(y)
    return l2_normalize(y, kernels=self.kernels)
