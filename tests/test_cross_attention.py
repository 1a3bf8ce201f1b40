"""`coattend` (hand-written backward pass, row chunks) against the formulation JAX differentiates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iaca_jax.models import IACAModel, coattention_blocks, init_variables
from iaca_jax.models.coattention_blocks import coattend
from iaca_jax.models.dropout import bernoulli, bernoulli_block

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


def test_bernoulli_block_is_the_slice_of_the_whole_mask():
  shape, key = (3, 4, 10), jax.random.key(7)
  whole = np.asarray(jax.random.bernoulli(key, 0.4, shape))
  block = jax.jit(lambda row, col: bernoulli_block(key, 0.4, shape, (row, 0, col), (2, 4, 5)))
  np.testing.assert_array_equal(np.asarray(block(1, 5)), whole[1:3, :, 5:10])
  np.testing.assert_array_equal(np.asarray(block(0, 0)), whole[:2, :, :5])


def _coattend(keys, joint, values, rng, **kwargs):
  mask = None if rng is None else bernoulli(rng, 1.0 - RATE, (keys.shape[0], D, 2 * D))
  return coattend(keys, joint, values, mask, keep=1.0 - RATE, **kwargs)


# chunk 1: 6 loop iterations; 4: rounded down to 3 (2 iterations); 6: the whole batch, no loop.
@pytest.mark.parametrize('chunk,dropout', [(1, True), (4, True), (6, True), (2, False)])
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


def test_model_outputs_and_gradients_equal_the_dense_formulation(monkeypatch):
  monkeypatch.setattr(coattention_blocks, 'CPU_CHUNK', 2)  # 2 chunks of 2 rows here (on a CPU)
  settings = dict(features=16, lstm_hidden=8, head_hidden=8, cross_attention='rjca', gating='iaca')
  batch = {
    'video_features': jax.random.normal(jax.random.key(0), (4, 8, 3, 3, 16)),
    'audio_features': jax.random.normal(jax.random.key(1), (4, 8, 16)),
  }
  blocked, dense = IACAModel(**settings), IACAModel(**settings, blocked_coattention=False)
  variables = init_variables(dense, batch, jax.random.key(2))

  def run(model):
    def loss(params, key):
      out = model.apply({'params': params}, batch, train=True, rngs={'dropout': key})[0]
      return jnp.sum(jnp.sin(out)), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  key = jax.random.key(4)
  (_, out_b), grads_b = run(blocked)(variables['params'], key)
  (_, out_d), grads_d = run(dense)(variables['params'], key)
  np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_d), atol=1e-5)
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5),
    grads_b,
    grads_d,
  )


def test_a_batch_sharded_over_devices_is_chunked_without_moving_rows():
  """Each iteration takes one row per data shard: no all-gather, and the result of one device."""
  devices = jax.devices()[:4]
  assert len(devices) == 4, 'conftest gives this process 8 CPU devices'
  sharded = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ('data',)), jax.P('data'))
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  batch = 8
  inputs = (
    jax.random.normal(k1, (batch, D, L)),
    jax.random.normal(k2, (batch, L, 2 * D)),
    jax.random.normal(k3, (batch, L, D)),
  )
  cotangent = jax.random.normal(k4, (batch, L, 2 * D))
  mask = jax.random.bernoulli(jax.random.key(3), 1.0 - RATE, (batch, D, 2 * D))

  def grads(keys, joint, values, mask, cotangent):  # per-row gradients: no reduction over the batch
    hidden, vjp = jax.vjp(lambda *a: coattend(*a, mask, keep=1.0 - RATE, chunk=4), keys, joint, values)
    return hidden, vjp(cotangent)

  args = (*inputs, mask, cotangent)
  step = jax.jit(grads)
  compiled = step.lower(*jax.device_put(args, sharded)).compile().as_text()
  assert (
    'all-gather' not in compiled and 'all-to-all' not in compiled and 'collective-permute' not in compiled
  )
  got = step(*jax.device_put(args, sharded))
  want = jax.jit(grads)(*args)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6), got, want)
