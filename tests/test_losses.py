"""CCC loss (JAX) against independent computations: NumPy, audmetric, a single-device loss."""

import audmetric
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from iaca_jax import losses, metrics


def reference_ccc(x: np.ndarray, y: np.ndarray) -> float:
  """CCC written out with NumPy's biased (population) covariance."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cov = np.cov(x, y, bias=True)
  return 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (x.mean() - y.mean()) ** 2)


def random_batch(rng: np.random.Generator, batch: int = 4, length: int = 16, invalid: float = 0.2):
  """(B, L, 2) labels in [-1, 1] with some -5 clips, correlated predictions, and the valid mask."""
  labels = rng.uniform(-1, 1, (batch, length, 2))
  preds = 0.6 * labels + 0.3 * rng.normal(size=labels.shape) + 0.1
  bad = rng.random((batch, length)) < invalid
  labels[bad] = -5.0
  preds[bad] = np.nan  # masked entries must not leak, even as NaN
  return preds.astype(np.float32), labels.astype(np.float32), ~bad


# ----------------------------------------------------------------------------- CCC values


def test_ccc_matches_audmetric_and_numpy():
  rng = np.random.default_rng(0)
  preds, labels, mask = random_batch(rng, batch=8, length=16)
  for d in range(2):
    x, y = preds[..., d][mask].astype(np.float64), labels[..., d][mask].astype(np.float64)
    want = reference_ccc(x, y)
    assert metrics.concordance_cc(x, y) == pytest.approx(want, abs=1e-12)
    assert metrics.concordance_cc(x, y) == pytest.approx(audmetric.concordance_cc(y, x), abs=1e-12)
    got = losses.masked_ccc(jnp.asarray(preds[..., d]), jnp.asarray(labels[..., d]), jnp.asarray(mask))
    assert float(got) == pytest.approx(want, abs=1e-5)
  ref_loss = 2 - sum(reference_ccc(preds[..., d][mask], labels[..., d][mask]) for d in range(2))
  loss, aux = jax.jit(losses.ccc_loss)(preds, labels, mask)
  assert float(loss) == pytest.approx(ref_loss, abs=1e-5)
  assert int(aux['n_valid']) == mask.sum()
  as_dict = {'valence': preds[..., :1], 'arousal': preds[..., 1]}  # (B, L, 1) and (B, L) both accepted
  assert float(losses.ccc_loss(as_dict, labels, mask)[0]) == pytest.approx(ref_loss, abs=1e-5)


def test_ccc_bf16_predictions_are_upcast():
  rng = np.random.default_rng(1)
  preds, labels, mask = random_batch(rng)
  bf16 = jnp.asarray(preds).astype(jnp.bfloat16)
  loss = losses.ccc_loss(bf16, labels, mask)[0]
  assert loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(
    float(losses.ccc_loss(bf16.astype(jnp.float32), labels, mask)[0]), abs=1e-6
  )


def test_ccc_near_constant_far_from_zero():
  """Two-pass statistics: a tiny variance on a large offset still gives the float64 answer."""
  rng = np.random.default_rng(2)
  y = rng.normal(size=512)
  x = 50.0 + 1e-3 * (y + rng.normal(size=512))
  got = float(
    losses.masked_ccc(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.ones(512, bool))
  )
  assert got == pytest.approx(reference_ccc(np.float32(x), np.float32(y)), rel=1e-3)


def test_moments_add_up_over_parts():
  rng = np.random.default_rng(3)
  preds, labels, mask = random_batch(rng, batch=6)
  parts = [
    losses.ccc_moments(preds[i : i + 2, :, 0], labels[i : i + 2, :, 0], mask[i : i + 2]) for i in (0, 2, 4)
  ]
  summed = jax.tree.map(lambda *v: sum(v), *parts)
  want = reference_ccc(preds[..., 0][mask], labels[..., 0][mask])
  assert float(losses.ccc_from_moments(summed)) == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------- sharded loss


def test_sharded_loss_is_exact_global_loss():
  if jax.device_count() < 8:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)')
  rng = np.random.default_rng(6)
  preds, labels, mask = random_batch(rng, batch=16, length=8)
  shift = np.repeat(np.linspace(-0.6, 0.6, 8), 2)[:, None, None]  # a different offset per device
  labels = np.where(mask[..., None], 0.3 * labels + shift, labels).astype(np.float32)
  preds = np.where(mask[..., None], preds * np.repeat(np.linspace(0.2, 1.5, 8), 2)[:, None, None], preds)
  preds = preds.astype(np.float32)
  mesh = jax.make_mesh((8,), ('data',))  # Explicit axis type in this JAX: place the inputs
  preds, labels, mask = jax.device_put((preds, labels, mask), jax.NamedSharding(mesh, P('data')))

  def sharded(p, l, m):
    fn = lambda p, l, m: losses.ccc_loss(p, l, m, axis_name='data')[0]  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=P('data'), out_specs=P())(p, l, m)

  def per_device(p, l, m):
    fn = lambda p, l, m: losses.ccc_loss(p, l, m)[0][None]  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=P('data'), out_specs=P('data'))(p, l, m)

  global_loss = float(jax.jit(lambda p, l, m: losses.ccc_loss(p, l, m)[0])(preds, labels, mask))
  assert float(jax.jit(sharded)(preds, labels, mask)) == pytest.approx(global_loss, abs=1e-5)
  naive = float(jnp.mean(jax.jit(per_device)(preds, labels, mask)))
  assert abs(naive - global_loss) > 0.01  # the naive mean of per-device losses is wrong (here by 0.035)

  grad_sharded = jax.jit(jax.grad(sharded))(preds, labels, mask)
  grad_global = jax.jit(jax.grad(lambda p, l, m: losses.ccc_loss(p, l, m)[0]))(preds, labels, mask)
  np.testing.assert_allclose(np.asarray(grad_sharded), np.asarray(grad_global), atol=1e-5)
  assert np.all(np.asarray(grad_global)[~np.asarray(mask)] == 0)


# ----------------------------------------------------------------------------- masking edge cases


def test_fully_masked_batch_has_zero_finite_gradient():
  preds = jnp.full((2, 4, 2), jnp.nan).at[0, 0].set(0.3)
  labels = jnp.full((2, 4, 2), -5.0)
  mask = jnp.zeros((2, 4), bool)
  loss_fn = jax.jit(lambda p: losses.ccc_loss(p, labels, mask)[0])
  assert float(loss_fn(preds)) == 0.0
  grad = jax.grad(loss_fn)(preds)
  assert np.all(np.asarray(grad) == 0)


def test_single_valid_clip_and_nan_outside_mask_are_finite():
  rng = np.random.default_rng(7)
  preds, labels, mask = random_batch(rng)
  one_clip = np.zeros_like(mask)
  one_clip[1, 3] = True
  for m in (mask, one_clip):
    loss, grad = jax.value_and_grad(lambda p, m=m: losses.ccc_loss(p, labels, m)[0])(jnp.asarray(preds))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~m] == 0)
