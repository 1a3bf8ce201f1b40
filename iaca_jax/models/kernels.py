"""The kernels the model is written against, and the plain set that any backend compiles.

A `Kernels` holds how the model computes its recurring pieces: its Dense and Dropout layers, the LSTMs'
input projection, the sums of the L2 normalisation, the dense co-attention's core, and the norms and
finiteness checks of the train step. `XLA` is plain JAX and Flax (`nn.Dense`, `nn.Dropout`, the
co-attention as JAX differentiates it, `optax.tree.norm`), what a GPU or TPU should run.
`iaca_jax.cpu_kernels.cpu_kernels` computes the same values with kernels that XLA:CPU runs faster
(docs/PERFORMANCE.md). Which set a run uses is chosen once, from the devices it compiles for, by
`iaca_jax.kernel_choice.select_kernels` (`config.model.kernels`); modules receive it as a field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One set of kernels (hashable: it is a field of the model's modules).

  dense:        a Dense module class with `nn.Dense`'s fields, parameters and initialisation.
  dropout:      a Dropout module class with `nn.Dropout`'s fields, rng stream and result.
  matmul:       x (..., C) @ kernel (C, D) -> (..., D).
  add_bias:     y (..., D) + bias (D,).
  sum_trailing: (x, axes) -> the sum over x's last `axes` axes, accumulated and returned in >= float32.
  coattention:  (keys (B, d, L), joint (B, L, D), values (B, L, d), dropout, dtype=) ->
                relu(tanh(values @ dropout(tanh(keys @ joint / sqrt(D))))) (B, L, D); `dropout` is a
                module of class `dropout`, as the layer names it.
  global_norm:  a pytree -> sqrt(sum of squares of every element), a float32 scalar.
  all_finite:   x -> whether no element is NaN or infinite, a bool scalar.
  """

  name: str
  dense: type[nn.Module]
  dropout: type[nn.Module]
  matmul: Callable[[jax.Array, jax.Array], jax.Array]
  add_bias: Callable[[jax.Array, jax.Array], jax.Array]
  sum_trailing: Callable[[jax.Array, int], jax.Array]
  coattention: Callable[..., jax.Array]
  global_norm: Callable[[Any], jax.Array]
  all_finite: Callable[[jax.Array], jax.Array]


def accumulator(dtype) -> jnp.dtype:
  """The dtype sums of `dtype` are accumulated in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jnp.einsum('...c,cd->...d', x, kernel)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  return y + bias


def sum_trailing(x: jax.Array, axes: int = 1) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(x.ndim - axes, x.ndim)), dtype=accumulator(x.dtype))


def coattention(
  keys: jax.Array, joint: jax.Array, values: jax.Array, dropout: nn.Module, *, dtype: Dtype = jnp.float32
) -> jax.Array:
  """The dense co-attention's core as JAX differentiates it (the reference of the CPU kernel)."""
  affinity = jnp.einsum('bdl,blj->bdj', keys, joint) / math.sqrt(joint.shape[-1])
  affinity = dropout(jnp.tanh(affinity.astype(jnp.float32)).astype(dtype))  # (B, d, D)
  return nn.relu(jnp.tanh(jnp.einsum('bld,bdj->blj', values, affinity)))


def all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def global_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(tree).astype(jnp.float32)


XLA = Kernels(
  name='xla',
  dense=nn.Dense,
  dropout=nn.Dropout,
  matmul=matmul,
  add_bias=add_bias,
  sum_trailing=sum_trailing,
  coattention=coattention,
  global_norm=global_norm,
  all_finite=all_finite,
)
