"""The host allocator setting: measured with the kernel's page-fault counter in fresh processes."""

import json
import os
import subprocess
import sys

import jax
import pytest

from iaca_jax import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose temporary (a reversed copy of a (rows, 4096) float32 matrix, fed to a matrix
# product) XLA allocates and frees on every call; its output is a scalar, so the faults counted are the
# temporary's.
_PROBE = r'''
import json, os, resource, sys
from iaca_jax import host_allocator
message = host_allocator.configure(sys.argv[1])
rows = int(sys.argv[2])
assert 'jax' not in sys.modules
import jax, jax.numpy as jnp
a = jnp.linspace(-1.0, 1.0, rows * 4096, dtype=jnp.float32).reshape(rows, 4096)
f = jax.jit(lambda a: (jnp.flip(a * 2.0, 0) @ jnp.ones((4096, 1)))[0, 0])
for _ in range(10):   # to a steady state: a temporary may be freed after the next call allocates
  f(a).block_until_ready()
faults = []
for _ in range(11):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'message': message, 'faults': sorted(faults)[5]}))
'''


def _probe(mode: str, megabytes: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  env.pop('LD_PRELOAD', None)
  rows = megabytes * 2**20 // (4 * 4096)
  out = subprocess.run([sys.executable, '-c', _PROBE, mode, str(rows)], env=env, capture_output=True,
                       text=True, check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(not host_allocator._is_glibc_linux(), reason='glibc only')


@glibc_only
def test_keep_removes_the_page_faults_of_per_call_temporaries():
  # 40 MiB: over glibc's largest mmap threshold (32 MiB), under a thread arena's heap size (64 MiB).
  default, kept = _probe('default', 40), _probe('auto', 40)
  assert 'kept (no mmap' in kept['message'], kept
  assert default['faults'] > 40 * 256 // 2, default      # 256 pages a MiB: mapped afresh every call
  assert kept['faults'] < default['faults'] / 20, (default, kept)


@glibc_only
def test_one_arena_also_keeps_blocks_too_big_for_a_thread_arena():
  kept, one_arena = _probe('keep', 128), _probe('one_arena', 128)
  assert 'one arena' in one_arena['message'], one_arena
  assert kept['faults'] > 128 * 256 // 2, kept
  assert one_arena['faults'] < kept['faults'] / 20, (kept, one_arena)


def test_auto_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not host_allocator.accelerator_expected()
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert host_allocator.accelerator_expected()


def test_too_late_or_unknown_is_an_error(monkeypatch):
  jax.devices()   # this process has imported JAX and started its threads
  with pytest.raises(RuntimeError, match='already imported'):
    host_allocator.configure('one_arena')
  assert 'glibc defaults' in host_allocator.configure('default')
  with pytest.raises(ValueError, match='expected one of'):
    host_allocator.configure('tcmalloc')
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert 'accelerator is expected' in host_allocator.configure('auto')
