"""The host allocator setting of the Makefile (GLIBC_TUNABLES), measured with the kernel's page-fault
counter in fresh processes: it must keep XLA:CPU's per-call temporaries in the process."""

import json
import os
import platform
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_ARENA = 'glibc.malloc.arena_max=1'

# A jitted function whose temporary (a reversed copy of a (rows, 4096) float32 matrix, fed to a matrix
# product) XLA allocates and frees on every call; its output is a scalar, so the faults counted are the
# temporary's.
_PROBE = r"""
import json, resource, sys
rows = int(sys.argv[1])
if sys.argv[2] == 'entry_point':  # as train.py and the other entry points set JAX up
  sys.path.insert(0, sys.argv[3])
  from iaca_jax import runtime
  runtime.configure_process()  # every entry point's main calls it first
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
print(json.dumps({'faults': sorted(faults)[5]}))
"""


def makefile_host_malloc() -> str:
  """The HOST_MALLOC default of the Makefile: what `make demo`, `make test` and `make bench` run under."""
  with open(os.path.join(ROOT, 'Makefile')) as f:
    match = re.search(r'^HOST_MALLOC \?= (\S+)$', f.read(), re.MULTILINE)
  assert match, 'the Makefile sets HOST_MALLOC'
  return match.group(1)


def _faults(tunables: str | None, megabytes: int, setup: str = 'plain') -> int:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  for name in ('XLA_FLAGS', 'LD_PRELOAD', 'GLIBC_TUNABLES', 'IACA_CPU_ASYNC_DISPATCH'):
    env.pop(name, None)
  if tunables:
    env['GLIBC_TUNABLES'] = tunables
  rows = megabytes * 2**20 // (4 * 4096)
  out = subprocess.run(
    [sys.executable, '-c', _PROBE, str(rows), setup, ROOT],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])['faults']


glibc_only = pytest.mark.skipif(
  not (sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'), reason='glibc only'
)


@glibc_only
def test_makefile_setting_removes_the_page_faults_of_per_call_temporaries():
  # 40 MiB: over glibc's largest mmap threshold (32 MiB), under a thread arena's heap size (64 MiB).
  default, kept = _faults(None, 40), _faults(makefile_host_malloc(), 40)
  assert default > 40 * 256 // 2, default  # 256 pages a MiB: mapped afresh every call
  assert kept < default / 20, (default, kept)


@glibc_only
def test_one_arena_also_keeps_blocks_too_big_for_a_thread_arena():
  kept = _faults(makefile_host_malloc(), 128)
  one_arena = _faults(f'{makefile_host_malloc()}:{ONE_ARENA}', 128)
  assert kept > 128 * 256 // 2, kept
  assert one_arena < kept / 20, (kept, one_arena)


@glibc_only
def test_entry_points_keep_blocks_too_big_for_a_thread_arena():
  # Asynchronous dispatch runs a step on a worker thread, whose arena cannot keep a 128 MiB block;
  # the entry points run single-device CPU steps inline, in the main thread's arena, which can.
  kept = _faults(makefile_host_malloc(), 128)
  inline = _faults(makefile_host_malloc(), 128, setup='entry_point')
  assert kept > 128 * 256 // 2, kept
  assert inline < kept / 20, (kept, inline)
