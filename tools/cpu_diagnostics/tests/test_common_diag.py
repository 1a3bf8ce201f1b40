"""The trace and HLO accounting of tools/cpu_diagnostics/common_diag.py that the diagnostics' figures
rest on, and the allocator settings of host_allocator.py. Run on its own (not part of `pytest tests`):

    .venv/bin/python -m pytest -q tools/cpu_diagnostics/tests
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common_diag  # noqa: E402
import host_allocator  # noqa: E402


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
  got = common_diag.occupancy(events, names)
  expected = _occupancy_by_sampling(events, names, 200)
  assert got.keys() == expected.keys()
  for k in expected:
    assert abs(got[k] - expected[k]) < 1e-9, (k, got, expected)
  assert common_diag.occupancy(events, {'nothing'}) == {}


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
  found = {p for products in common_diag.hlo_products(hlo).values() for p in products}
  expected = {2 * 64 * 32 * 16, 2 * 4 * 8 * 16 * 8, 2 * 8 * 16 * 16}
  assert {common_diag.product_flops(p) for p in found} == expected, found
  assert all(p[0] == 'f32' for p in found)


def test_product_contraction_names_the_contracted_and_batch_axes():
  assert common_diag.product_contraction(('f32', (8, 16), (16, 4), ((1,), (0,), (), ()))) == '1.0'
  assert (
    common_diag.product_contraction(('f32', (2, 8, 16), (2, 4, 16), ((2,), (2,), (0,), (0,)))) == '2.2;0.0'
  )


def test_host_allocator_modes_set_the_environment_of_the_benchmark():
  keep = host_allocator.makefile_host_malloc()
  assert 'glibc.malloc.mmap_max=0' in keep
  base = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1', 'LD_PRELOAD': 'libx.so', 'PATH': '/bin'}
  env = lambda mode, lib=None: host_allocator.environment(mode, base, keep, lib)
  assert env('keep')['GLIBC_TUNABLES'] == keep
  assert env('one_arena')['GLIBC_TUNABLES'] == f'{keep}:glibc.malloc.arena_max=1'
  assert 'GLIBC_TUNABLES' not in env('default') and env('default')['LD_PRELOAD'] == 'libx.so'
  tcmalloc = env('tcmalloc', '/usr/lib/libtcmalloc_minimal.so.4')
  assert 'GLIBC_TUNABLES' not in tcmalloc
  assert tcmalloc['LD_PRELOAD'] == 'libx.so /usr/lib/libtcmalloc_minimal.so.4'
  assert base['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'  # not changed in place


def test_write_run_records_the_command_and_the_machine(tmp_path):
  import json

  path = common_diag.write_run(str(tmp_path / 'run.json'), 'unused.json', answer=42)
  with open(path) as f:
    result = json.load(f)
  assert result['answer'] == 42 and result['command'].startswith('python ')
  assert 'backend' in result['machine']
