"""A CPU kernel: `nn.Dense` with its kernel gradient written out, for layers applied to many rows
(docs/PERFORMANCE.md, "CPU kernels").

JAX derives the kernel gradient of x @ W as a product contracting the rows of x and of the output
gradient g. On a CPU, XLA lays that product out as a transposed copy of g and a product outside
YNNPACK: for the spatial attention's `affine_video` (50,176 rows of 512 at the paper's size) the
two took ~175 ms of the fusion train step. `matmul` states the gradient as x^T g over flattened rows,
with no transposed copy of a large operand. Every Dense layer of the fusion model and the LSTMs' input
projections use it. `add_bias` takes the bias gradient (a sum over all rows) as a product too
(cpu_kernels/reductions.py). Values and gradients are those of `nn.Dense` (tests/test_cpu_dense.py).

XLA:CPU runs a product that contracts the first axis of both operands (x^T g) in Eigen, not in
YNNPACK. Where one operand is small, `kernel_gradient` copies that one transposed and runs a plain
product, which YNNPACK takes: `affine_v`'s kernel gradient (50,176 rows, 49 outputs) took 10 ms
against 35 ms.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from iaca_jax.cpu_kernels.reductions import sum_leading


@jax.custom_vjp
def matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """x (..., C) @ kernel (C, D) -> (..., D)."""
  return jnp.einsum('...c,cd->...d', x, kernel)


def _matmul_forward(x, kernel):
  # With symbolic zeros JAX says which inputs need a gradient: none is computed that is not needed
  # (the input features of the first layers), also outside jit, where XLA would not drop it.
  needs_x, needs_kernel = x.perturbed, kernel.perturbed
  x, kernel = x.value, kernel.value
  return matmul(x, kernel), (x if needs_kernel else None, kernel if needs_x else None)


def _matmul_backward(residuals, grad):
  x, kernel = residuals
  if isinstance(grad, jax.custom_derivatives.SymbolicZero):
    return None, None
  grad_x = None if kernel is None else jnp.einsum('...d,cd->...c', grad, kernel)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  grad_kernel = None if x is None else kernel_gradient(rows(x), rows(grad))
  return grad_x, grad_kernel


matmul.defvjp(_matmul_forward, _matmul_backward, symbolic_zeros=True)


# The transposed copy pays for itself when the operand copied is small, and small against the other:
# then it stays in the last-level cache and its copy costs little beside the product. For operands of
# comparable size (the 1,024-row layers) XLA fused the copy with the operand's producer and the step
# gained nothing; for two large ones (`affine_video`, 98 MiB each) Eigen's own x^T g was as fast.
TRANSPOSED_COPY_BYTES = 32 * 2**20
TRANSPOSED_COPY_RATIO = 4


def kernel_gradient(x: jnp.ndarray, grad: jnp.ndarray) -> jnp.ndarray:
  """x^T grad over rows: x (n, c), grad (n, d) -> (c, d), in their dtype.

  When the smaller operand is at most `TRANSPOSED_COPY_BYTES` and at most
  1 / `TRANSPOSED_COPY_RATIO` of the other, that operand is copied transposed and the product is a
  plain one. The optimisation barriers keep XLA from folding the transposes back into the product,
  which would send it to Eigen again.
  """
  small, large = sorted((x, grad), key=lambda a: a.size)
  if (
    small.size * small.dtype.itemsize > TRANSPOSED_COPY_BYTES
    or large.size < TRANSPOSED_COPY_RATIO * small.size
  ):
    return jnp.einsum('nc,nd->cd', x, grad)
  barrier = jax.lax.optimization_barrier
  if small is x:
    return jnp.einsum('cn,nd->cd', barrier(x.T), grad)
  return barrier(jnp.einsum('dn,nc->dc', barrier(grad.T), x)).T


@jax.custom_vjp
def add_bias(y: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """y (..., D) + bias (D,) of the same dtype; the bias gradient is `reductions.sum_leading`."""
  if bias.ndim != 1 or y.shape[-1:] != bias.shape or y.dtype != bias.dtype:
    raise ValueError(
      f'add_bias needs y (..., D) and bias (D,) of one dtype; got {y.shape} {y.dtype}, '
      f'{bias.shape} {bias.dtype}'
    )
  return y + bias


def _add_bias_forward(y, bias):
  return add_bias(y, bias), None


def _add_bias_backward(_, grad):
  return grad, sum_leading(grad)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


class Dense(nn.Dense):
  """`nn.Dense` (same fields, parameters and initialisation) whose product is `matmul`.

  Only the default `precision` and `dot_general` are supported (the XLA kernels take any).
  """

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    if self.precision is not None or self.dot_general is not None or self.dot_general_cls is not None:
      raise ValueError(
        'the CPU kernels\' Dense supports the default precision and dot_general only; use kernels="xla"'
      )
    kernel = self.param('kernel', self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    outputs = matmul(inputs, kernel)
    return outputs if bias is None else add_bias(outputs, bias)
