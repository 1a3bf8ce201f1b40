"""`cpu_kernels.dropout` (FusedDropout, bernoulli) against jax.random.bernoulli and nn.Dropout (the XLA
kernels' dropout): equal bit for bit, alone and in the model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iaca_jax.cpu_kernels import cpu_kernels
from iaca_jax.cpu_kernels.dropout import FusedDropout, bernoulli
from iaca_jax.models import XLA, IACAModel, init_variables

SHAPES = [(1,), (7,), (3, 5, 7), (2, 33, 65), (1, 1, 3, 1)]
RATES = [0.1, 0.5, 0.6, 0.9]
KEYS = {'typed': lambda seed: jax.random.key(seed), 'raw': lambda seed: jax.random.PRNGKey(seed)}


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('key_kind', sorted(KEYS))
def test_bernoulli_equals_jax_random_bernoulli(shape, key_kind):
  for seed, p in enumerate(RATES):
    key = KEYS[key_kind](seed)
    want = jax.jit(lambda k, p=p: jax.random.bernoulli(k, p, shape))(key)
    got = jax.jit(lambda k, p=p: bernoulli(k, p, shape))(key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('rate', [0.0, *RATES, 1.0])
def test_fused_dropout_equals_nn_dropout(rate):
  x = jax.random.normal(jax.random.key(0), (4, 9, 11))
  rngs = {'dropout': jax.random.key(3)}
  fused = FusedDropout(rate, deterministic=False).apply({}, x, rngs=rngs)
  plain = nn.Dropout(rate, deterministic=False).apply({}, x, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(fused), np.asarray(plain))
  np.testing.assert_array_equal(
    np.asarray(FusedDropout(rate, deterministic=True).apply({}, x)), np.asarray(x)
  )
  if 0.0 < rate < 1.0:  # the mask alone: nn.Dropout's kept elements, from the same stream
    mask = FusedDropout(rate, deterministic=False).apply({}, x.shape, rngs=rngs, method='keep_mask')
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(plain) != 0)
  assert FusedDropout(rate, deterministic=True).apply({}, x.shape, method='keep_mask') is None


def test_fallbacks_still_equal_jax_random():
  shape, p = (5, 6), 0.4
  with jax.threefry_partitionable(False):  # the non-partitionable hash is not the one written out
    key = jax.random.key(1)
    np.testing.assert_array_equal(
      np.asarray(bernoulli(key, p, shape)), np.asarray(jax.random.bernoulli(key, p, shape))
    )
  rbg = jax.random.key(2, impl='rbg')  # another PRNG implementation
  np.testing.assert_array_equal(
    np.asarray(bernoulli(rbg, p, shape)), np.asarray(jax.random.bernoulli(rbg, p, shape))
  )


def test_the_dropout_kernel_gives_the_models_training_outputs_bit_for_bit():
  """The CPU kernels with FusedDropout against the same CPU kernels with nn.Dropout: the same masks."""
  settings = dict(features=16, lstm_hidden=8, head_hidden=8, cross_attention='rjca', gating='iaca')
  batch = {
    'video_features': jax.random.normal(jax.random.key(0), (2, 4, 3, 3, 8)),
    'audio_features': jax.random.normal(jax.random.key(1), (2, 4, 8)),
  }
  cpu = cpu_kernels()
  fused = IACAModel(**settings, kernels=cpu)
  plain = IACAModel(
    **settings, kernels=dataclasses.replace(cpu, dropout=nn.Dropout, coattention=XLA.coattention)
  )
  variables = init_variables(fused, batch, jax.random.key(2))
  run = lambda model: jax.jit(lambda v, key: model.apply(v, batch, train=True, rngs={'dropout': key})[0])
  fused_fn, plain_fn = run(fused), run(plain)
  out_fused, out_plain = fused_fn(variables, jax.random.key(4)), plain_fn(variables, jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(out_fused), np.asarray(out_plain))
  # Dropout is on: another dropout key changes the outputs.
  assert not np.array_equal(np.asarray(plain_fn(variables, jax.random.key(5))), np.asarray(out_plain))
  assert jnp.all(jnp.isfinite(out_fused))
