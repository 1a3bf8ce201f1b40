"""The trace accounting of bench/common.py that the benchmark tools' figures rest on."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))

import common  # noqa: E402


def _occupancy_by_sampling(events, names, end_us):
  """Threads inside a named event at every microsecond, counted by brute force."""
  active = np.zeros((end_us, 8), bool)
  threads = {}
  for event in events:
    if event['name'] in names:
      column = threads.setdefault(event['tid'], len(threads))
      active[event['ts'] : event['ts'] + event['dur'], column] = True
  counts = active.sum(axis=1)
  first, last = np.flatnonzero(counts)[[0, -1]]
  window = counts[first : last + 1]
  return {k: np.count_nonzero(window == k) * 1e-6 for k in np.unique(window)}


def test_occupancy_counts_threads_inside_ops_with_nesting_and_gaps():
  ev = lambda name, tid, ts, dur: dict(name=name, pid=1, tid=tid, ts=ts, dur=dur)
  events = [
    ev('while', 1, 10, 50),  # a loop on thread 1 ...
    ev('body', 1, 12, 20),  # ... and an op of its body, nested: counted once
    ev('dot', 2, 40, 40),  # overlaps the loop on thread 2
    ev('add', 2, 95, 5),  # after a 15 us gap with no op anywhere
    ev('add', 2, 100, 10),  # touches the one before: no gap
    ev('ThunkExecutor::Execute', 3, 0, 200),  # not an op: ignored
  ]
  names = {'while', 'body', 'dot', 'add'}
  got = common.occupancy(events, names)
  expected = _occupancy_by_sampling(events, names, 200)
  assert got.keys() == expected.keys()
  for k in expected:
    assert abs(got[k] - expected[k]) < 1e-9, (k, got, expected)
  assert common.occupancy(events, {'nothing'}) == {}


def test_hlo_products_finds_every_product_with_its_flops():
  import jax
  import jax.numpy as jnp

  def program(x, w, a, b, h, u):
    plain = x @ w  # (64, 32) x (32, 16)
    batched = jnp.einsum('bij,bjk->bik', a, b)  # 4 x (8, 16) x (16, 8)
    looped = jax.lax.scan(lambda c, _: (jnp.tanh(c @ u), None), h, None, length=3)[0]  # (8, 16) x (16, 16)
    return plain.sum() + batched.sum() + looped.sum()

  shapes = [(64, 32), (32, 16), (4, 8, 16), (4, 16, 8), (8, 16), (16, 16)]
  args = [jnp.ones(s, jnp.float32) for s in shapes]
  hlo = jax.jit(program).lower(*args).compile().as_text()
  found = {p for products in common.hlo_products(hlo).values() for p in products}
  expected = {2 * 64 * 32 * 16, 2 * 4 * 8 * 16 * 8, 2 * 8 * 16 * 16}
  assert {common.product_flops(p) for p in found} == expected, found
  assert all(p[0] == 'f32' for p in found)


def test_product_contraction_names_the_contracted_and_batch_axes():
  assert common.product_contraction(('f32', (8, 16), (16, 4), ((1,), (0,), (), ()))) == '1.0'
  assert common.product_contraction(('f32', (2, 8, 16), (2, 4, 16), ((2,), (2,), (0,), (0,)))) == '2.2;0.0'


def test_write_json_leaves_the_old_file_whole_when_writing_fails(tmp_path):
  path = tmp_path / 'result.json'
  common.write_json(str(path), {'a': 1})
  with pytest.raises(RuntimeError):
    common.write_json(str(path), {'a': _Unwritable()})
  assert path.read_text() == '{\n "a": 1\n}'
  assert [p.name for p in tmp_path.iterdir()] == ['result.json']


class _Unwritable:
  def item(self):
    raise RuntimeError('cannot be written')
