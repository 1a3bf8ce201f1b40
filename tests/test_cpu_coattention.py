"""`cpu_kernels.coattention` (hand-written backward pass, row chunks) against the formulation JAX
differentiates (the XLA kernels' co-attention), alone and in the model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iaca_jax.cpu_kernels import cpu_kernels
from iaca_jax.cpu_kernels.coattention import coattend
from iaca_jax.cpu_kernels.dropout import bernoulli
from iaca_jax.models import XLA, IACAModel, init_variables

B, D, L = 6, 8, 5  # batch, features d, clips; the affinity is (B, d, 2d)
RATE = 0.6


def dense_coattention(keys, joint, values, rate, rng):
  """The authors' formulation with the whole (B, d, 2d) affinity and `jax.random.bernoulli`'s mask."""
  affinity = jnp.tanh(jnp.einsum('bdl,blj->bdj', keys, joint) / math.sqrt(joint.shape[-1]))
  if rng is not None:
    mask = jax.random.bernoulli(rng, 1.0 - rate, affinity.shape)
    affinity = jnp.where(mask, affinity / (1.0 - rate), 0.0)
  return jax.nn.relu(jnp.tanh(jnp.einsum('bld,bdj->blj', values, affinity)))


def _inputs():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return (
    jax.random.normal(k1, (B, D, L)),
    jax.random.normal(k2, (B, L, 2 * D)),
    jax.random.normal(k3, (B, L, D)),
  )


def _coattend(keys, joint, values, rng, **kwargs):
  mask = None if rng is None else bernoulli(rng, 1.0 - RATE, (keys.shape[0], D, 2 * D))
  return coattend(keys, joint, values, mask, keep=1.0 - RATE, **kwargs)


# chunk 1: 6 loop iterations; 4: rounded down to 3 (2 iterations); None: the whole batch, no loop.
@pytest.mark.parametrize('chunk,dropout', [(1, True), (4, True), (None, True), (2, False)])
def test_chunks_equal_the_whole_affinity(chunk, dropout):
  inputs = _inputs()
  rng = jax.random.key(3) if dropout else None
  cotangent = jax.random.normal(jax.random.key(1), (B, L, 2 * D))

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda args: jnp.sum(fn(*args) * cotangent)))

  want, want_grads = loss(lambda *a: dense_coattention(*a, RATE, rng))(inputs)
  got, got_grads = loss(lambda *a: _coattend(*a, rng, chunk=chunk))(inputs)
  hidden = jax.jit(lambda *a: _coattend(*a, rng, chunk=chunk))(*inputs)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(dense_coattention(*inputs, RATE, rng)), atol=1e-5)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
  if dropout:  # the mask matters: another key changes the result
    other = _coattend(*inputs, jax.random.key(4), chunk=chunk)
    assert not np.allclose(np.asarray(other), np.asarray(hidden))


def test_bfloat16_compute_follows_the_float32_gradients():
  """In bf16 the hand-written backward pass stays within bf16 rounding of the fp32 gradients."""
  inputs, rng = _inputs(), jax.random.key(3)
  cotangent = jax.random.normal(jax.random.key(1), (B, L, 2 * D))
  grads = lambda fn: jax.jit(jax.grad(lambda args: jnp.sum(fn(*args).astype(jnp.float32) * cotangent)))
  want = grads(lambda *a: dense_coattention(*a, RATE, rng))(inputs)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), inputs)
  got = grads(lambda *a: _coattend(*a, rng, dtype=jnp.bfloat16, chunk=2))(half)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) / float(jnp.max(jnp.abs(w)))
    assert err < 0.05, err


def test_model_outputs_and_gradients_equal_the_xla_kernels():
  """The one-device set (row chunks of 1). The several-device set is checked against it in
  tests/test_train_lib.py (8 devices = 1 device)."""
  settings = dict(features=16, lstm_hidden=8, head_hidden=8, cross_attention='rjca', gating='iaca')
  batch = {
    'video_features': jax.random.normal(jax.random.key(0), (4, 8, 3, 3, 16)),
    'audio_features': jax.random.normal(jax.random.key(1), (4, 8, 16)),
  }
  cpu, xla = IACAModel(**settings, kernels=cpu_kernels(1)), IACAModel(**settings, kernels=XLA)
  variables = init_variables(xla, batch, jax.random.key(2))

  def run(model):
    def loss(params, key):
      out = model.apply({'params': params}, batch, train=True, rngs={'dropout': key})[0]
      return jnp.sum(jnp.sin(out)), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  key = jax.random.key(4)
  (_, out_cpu), grads_cpu = run(cpu)(variables['params'], key)
  (_, out_xla), grads_xla = run(xla)(variables['params'], key)
  np.testing.assert_allclose(np.asarray(out_cpu), np.asarray(out_xla), atol=1e-5)
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5),
    grads_cpu,
    grads_xla,
  )
