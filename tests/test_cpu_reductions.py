"""`cpu_kernels.reductions` against NumPy and the XLA kernels: the same sums, NaN and infinities carried
through, and really computed as products (a reduction on a CPU is XLA's slow reduce-window loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iaca_jax.cpu_kernels import cpu_kernels, reductions
from iaca_jax.models import XLA
from iaca_jax.models.temporal import l2_normalize

CPU = cpu_kernels()


def _x(shape, seed=0):
  return np.array(jax.random.normal(jax.random.key(seed), shape), np.float32)


def test_sums_equal_numpy():
  x = _x((3, 5, 7, 11))
  np.testing.assert_allclose(
    jax.jit(reductions.sum_leading)(x), x.astype(np.float64).sum((0, 1, 2)), rtol=1e-5
  )
  for axes in (1, 2, 3):
    got = jax.jit(reductions.sum_trailing, static_argnums=1)(x, axes)
    want = x.astype(np.float64).sum(tuple(range(4 - axes, 4)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  tree = {'a': x, 'b': [_x((13,), 1), np.float32(2.5)]}
  want = np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in jax.tree.leaves(tree)))
  np.testing.assert_allclose(jax.jit(reductions.global_norm)(tree), want, rtol=1e-6)
  np.testing.assert_allclose(reductions.global_norm(tree), optax.tree.norm(tree), rtol=1e-6)
  assert float(reductions.global_norm({})) == 0.0


def test_the_kernel_set_equals_the_xla_kernels():
  x = _x((3, 5, 7, 11))
  for axes in (1, 2, 3):
    got, want = (jax.jit(k.sum_trailing, static_argnums=1)(x, axes) for k in (CPU, XLA))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  tree = {'a': x, 'b': [_x((13,), 1), np.float32(2.5)]}
  np.testing.assert_allclose(jax.jit(CPU.global_norm)(tree), jax.jit(XLA.global_norm)(tree), rtol=1e-6)
  x[1, 2, 3, 4] = np.nan
  for k in (CPU, XLA):
    assert not bool(jax.jit(k.all_finite)(x)) and bool(jax.jit(k.all_finite)(np.zeros((3, 4), np.float32)))


def test_bfloat16_sums_accumulate_in_float32():
  x = jnp.full((4096, 2), 1.0, jnp.bfloat16)  # 4096 ones: a bfloat16 accumulator would stop at 256
  assert reductions.sum_leading(x).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(jax.jit(reductions.sum_leading)(x), np.float32), [4096, 4096])
  np.testing.assert_array_equal(jax.jit(reductions.sum_trailing)(x.T), [4096, 4096])


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_carried_through(bad):
  x = _x((64, 40, 8))
  x[17, 33, 5] = bad
  leading = np.asarray(jax.jit(reductions.sum_leading)(x))
  assert not np.isfinite(leading[5]) and np.isfinite(np.delete(leading, 5)).all()
  assert np.isnan(leading[5]) == np.isnan(bad)
  trailing = np.asarray(jax.jit(reductions.sum_trailing, static_argnums=1)(x, 2))
  assert not np.isfinite(trailing[17]) and np.isfinite(np.delete(trailing, 17)).all()
  assert not np.isfinite(float(jax.jit(reductions.global_norm)({'x': x})))
  assert not bool(jax.jit(reductions.all_finite)(x))
  x[17, 33, 5] = 3e38  # finite, though its square is not
  assert bool(jax.jit(reductions.all_finite)(x))
  assert bool(jax.jit(reductions.all_finite)(np.float32(1.0))) and not reductions.all_finite(np.float32(bad))
  assert bool(jax.jit(reductions.all_finite)(np.ones((3, 4), np.uint8)))
  frames = np.zeros((2, 5, 9, 3), np.float32)  # rows of several trailing axes (9 * 3 < 256)
  assert bool(jax.jit(reductions.all_finite)(frames))
  frames[1, 4, 8, 2] = bad
  assert not bool(jax.jit(reductions.all_finite)(frames))


def test_sums_are_products_on_a_cpu():
  x = jnp.ones((64, 40, 8))
  cpu_l2_normalize = lambda x: l2_normalize(x, kernels=CPU)
  for fn in (reductions.sum_leading, reductions.sum_trailing, cpu_l2_normalize, reductions.all_finite):
    hlo = jax.jit(fn).lower(x).as_text()
    assert 'dot_general' in hlo, fn
    # all_finite reduces only the (2560,) row results, not x.
    assert ('stablehlo.reduce' in hlo) == (fn is reductions.all_finite), fn
  assert 'dot_general' not in jax.jit(l2_normalize).lower(x).as_text()  # the XLA kernels: a plain sum


@pytest.mark.parametrize('kernels', [XLA, CPU], ids=lambda k: k.name)
def test_l2_normalize_equals_numpy(kernels):
  x = _x((2, 3, 4, 5, 6))
  for axis in (-1, (-3, -2, -1)):
    axes = (axis,) if isinstance(axis, int) else axis
    want = x / np.maximum(np.sqrt(np.sum(np.square(x.astype(np.float64)), axis=axes, keepdims=True)), 1e-12)
    got = jax.jit(lambda x, axis=axis: l2_normalize(x, axis, kernels=kernels))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(l2_normalize(np.zeros((2, 3), np.float32)), 0.0)
  with pytest.raises(ValueError, match='trailing axes'):
    l2_normalize(x, axis=(1, 2))
