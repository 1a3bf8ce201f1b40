"""`models.dense.Dense` against `flax.linen.Dense`: the same parameters, outputs and gradients."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from iaca_jax.models.dense import Dense, matmul


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
