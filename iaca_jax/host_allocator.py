"""Keeps freed host memory inside the process (glibc malloc), so XLA:CPU steps stop page-faulting.

XLA:CPU allocates each step's temporaries with malloc and frees them when the step ends. By default
glibc hands large blocks back to the kernel (munmap, heap trimming), so every step page-faults its
temporaries in again. Two levels of `mallopt` settings keep the memory (docs/PERFORMANCE.md, "Host
allocator", has the measurements):

- `keep`: no mmap, no trimming. Blocks come from the malloc heaps and stay there. A thread's own
  arena cannot hold a block over 64 MiB, which still goes to mmap. In the measurements it was not
  slower than glibc's defaults, and the demo step ran 15% faster.
- `one_arena`: `keep`, plus every thread shares the main arena, which grows without a size limit.
  This also keeps the big blocks, such as the 1.85 GiB temporary block of the paper-size fusion step,
  which then runs 1.4-1.5x faster. But every allocation now takes the same lock, so steps made of
  many small ops (the demo: 10-25% slower) and compilation get slower. It must be set before JAX or
  TensorFlow is imported, because a thread picks its arena on its first malloc and importing either
  starts threads.

The price of both is resident memory: the process keeps its peak heap.

`train.py`, `evaluate.py`, `python -m iaca_jax.experiments` and the benchmark call
`configure_from_env()` before their other imports. The environment variable IACA_HOST_ALLOCATOR
chooses the mode: auto (the default: `keep` unless an accelerator is expected), keep, one_arena,
default (glibc untouched). This module imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

MODES = ('auto', 'keep', 'one_arena', 'default')
ENV_VAR = 'IACA_HOST_ALLOCATOR'

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))   # -1 becomes SIZE_MAX: never trim
_SETTINGS = {'keep': _KEEP, 'one_arena': ((_M_ARENA_MAX, 1),) + _KEEP}
_DONE = {'keep': 'freed memory kept (no mmap, no trim)',
         'one_arena': 'freed memory kept in one arena (one arena, no mmap, no trim)'}
_OTHER_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')


def _is_glibc_linux() -> bool:
  return sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def _threaded_libraries_imported() -> list[str]:
  return [name for name in ('jax', 'jaxlib', 'tensorflow') if name in sys.modules]


def accelerator_expected() -> bool:
  """Whether JAX will pick a GPU/TPU: `JAX_PLATFORMS` says so, or an accelerator plugin is installed.

  Decided without importing JAX.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms.strip():
    return platforms.split(',')[0].strip().lower() != 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if list(importlib.metadata.entry_points(group='jax_plugins')):
    return True
  return importlib.util.find_spec('jax_plugins') is not None


def configure(mode: str = 'auto') -> str:
  """Sets up the host allocator of this process; returns what was done, as a line for the log.

  mode: see the module docstring. 'auto' applies 'keep' when the computation will run on the CPU (no
    accelerator expected), glibc is the allocator and no other allocator is preloaded.
  Raises ValueError for an unknown mode, and RuntimeError for 'keep' or 'one_arena' where they cannot
  take effect (not glibc; for 'one_arena', JAX or TensorFlow already imported).
  """
  if mode not in MODES:
    raise ValueError(f'host allocator mode {mode!r}: expected one of {MODES}')
  if mode == 'default':
    return 'host allocator: glibc defaults (mode "default")'
  preload = os.environ.get('LD_PRELOAD', '')
  reasons = []
  if not _is_glibc_linux():
    reasons.append('the C library is not glibc on Linux')
  elif any(name in preload for name in _OTHER_ALLOCATORS):
    reasons.append(f'another allocator is preloaded ({preload})')
  imported = _threaded_libraries_imported()
  if mode == 'one_arena' and imported:
    reasons.append(f'{", ".join(imported)} already imported: their threads hold their own arenas '
                   '(configure before importing them)')
  if mode == 'auto' and not reasons and accelerator_expected():
    reasons.append('an accelerator is expected (its temporaries live in device memory)')
  if reasons:
    if mode != 'auto':
      raise RuntimeError(f'host allocator mode "{mode}" cannot take effect: ' + '; '.join(reasons))
    return 'host allocator: glibc defaults (' + '; '.join(reasons) + ')'
  chosen = 'keep' if mode == 'auto' else mode
  libc = ctypes.CDLL(None)
  for parameter, value in _SETTINGS[chosen]:
    if libc.mallopt(parameter, value) != 1:
      raise RuntimeError(f'mallopt({parameter}, {value}) failed')
  return f'host allocator: {_DONE[chosen]}'


def configure_from_env() -> str:
  """`configure` with the mode in the environment variable IACA_HOST_ALLOCATOR (default 'auto')."""
  return configure(os.environ.get(ENV_VAR, 'auto').strip().lower() or 'auto')
