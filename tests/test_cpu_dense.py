"""`cpu_kernels.dense.Dense` against `flax.linen.Dense` (the XLA kernels' Dense): the same parameters,
outputs and gradients."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from iaca_jax.cpu_kernels import dense
from iaca_jax.cpu_kernels.dense import Dense, kernel_gradient, matmul


@pytest.mark.parametrize('use_bias,dtype', [(True, jnp.float32), (False, jnp.float32), (True, jnp.bfloat16)])
def test_dense_equals_flax_dense(use_bias, dtype):
  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))  # rows over three leading axes
  cotangent = jax.random.normal(jax.random.key(1), (3, 4, 5, 7))
  ours, theirs = (cls(7, use_bias=use_bias, dtype=dtype) for cls in (Dense, nn.Dense))
  params = theirs.init(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, params)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(2), x), params)

  def grads(module):
    loss = lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * cotangent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  (want, want_grads), (got, got_grads) = grads(theirs), grads(ours)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(got), float(want), rtol=tolerance)
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tolerance, atol=tolerance
    ),
    got_grads,
    want_grads,
  )
  assert ('bias' in params['params']) == use_bias


def test_other_dot_generals_are_refused():
  with pytest.raises(ValueError, match='default precision'):
    Dense(3, precision=jax.lax.Precision.HIGHEST).init(jax.random.key(0), jnp.ones((2, 4)))


def _products(jaxpr) -> int:
  """dot_general equations of a jaxpr, its sub-jaxprs included (a custom_vjp's forward among them)."""
  return sum(
    (e.primitive.name == 'dot_general')
    + sum(_products(sub) for sub in jax.extend.core.jaxprs_in_params(e.params))
    for e in jaxpr.eqns
  )


def test_only_the_gradients_asked_for_are_computed():
  x, kernel = jnp.ones((4, 3)), jnp.ones((3, 2))
  loss = lambda x, kernel: jnp.sum(matmul(x, kernel))
  products = lambda argnums: _products(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(x, kernel).jaxpr)
  assert products(1) == 2  # forward + kernel gradient
  assert products(0) == 2  # forward + input gradient
  assert products((0, 1)) == 3


# (rows, x columns, grad columns): grad copied transposed (affine_v's shape, scaled down); x copied
# transposed; comparable sizes, no copy.
@pytest.mark.parametrize('rows,c,d', [(96, 40, 3), (96, 3, 40), (96, 8, 12)])
def test_kernel_gradient_equals_numpy(rows, c, d):
  x = np.random.default_rng(0).standard_normal((rows, c), np.float32)
  grad = np.random.default_rng(1).standard_normal((rows, d), np.float32)
  got = jax.jit(kernel_gradient)(x, grad)
  np.testing.assert_allclose(np.asarray(got), x.astype(np.float64).T @ grad, rtol=1e-5, atol=1e-5)


def test_a_small_operand_is_copied_transposed_into_a_plain_product(monkeypatch):
  """The point of the copy: XLA must not fold the transposes back into a product over both operands'
  first axis (Eigen's x^T g on a CPU). Above the size limit no copy is made."""
  x, grad = jnp.ones((96, 40)), jnp.ones((96, 3))
  hlo = lambda: jax.jit(lambda *a: kernel_gradient(*a)).lower(x, grad).compile().as_text()  # traced anew
  contracting_first_axes = 'lhs_contracting_dims={0}, rhs_contracting_dims={0}'
  assert contracting_first_axes not in hlo()
  monkeypatch.setattr(dense, 'TRANSPOSED_COPY_BYTES', 0)
  assert contracting_first_axes in hlo()
