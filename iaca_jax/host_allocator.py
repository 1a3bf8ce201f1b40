"""Keeps freed host memory inside the process (glibc malloc), so XLA:CPU steps stop page-faulting.

XLA:CPU allocates each step's temporaries with malloc on its worker threads and frees them when the
step ends: 2 GiB for the paper-size fusion step. glibc serves a worker thread from a thread arena,
whose heaps cannot hold requests that large, so they come from mmap and go back with munmap, and every
step page-faults its temporaries in again (about 490,000 minor faults, a fifth of the step on a
2-core CPU; docs/PERFORMANCE.md, "Allocator"). Three `mallopt` settings keep the memory: one arena
(the main one, which grows with brk and can hold anything), no mmap, no trimming. The cost is
resident memory: the process keeps its peak heap (the fusion step: 5.1 GiB RSS instead of 3.4 GiB).

It must run before JAX or TensorFlow is imported: a thread picks its arena on its first malloc and
keeps it, and importing either starts threads. `train.py`, `evaluate.py`, `python -m
iaca_jax.experiments` and the benchmark call `configure_from_env` before their other imports; the
environment variable `IACA_HOST_ALLOCATOR` (auto, retain, default) chooses. This module imports
neither JAX nor TensorFlow.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

MODES = ('auto', 'retain', 'default')
ENV_VAR = 'IACA_HOST_ALLOCATOR'

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1 becomes SIZE_MAX: never trim
_OTHER_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')


def _is_glibc_linux() -> bool:
  return sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def _threaded_libraries_imported() -> list[str]:
  return [name for name in ('jax', 'jaxlib', 'tensorflow') if name in sys.modules]


def accelerator_expected() -> bool:
  """Whether JAX will pick a GPU/TPU: `JAX_PLATFORMS` says so, or an accelerator plugin is installed.

  Decided without importing JAX (which would be too late for `configure`).
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
  """Sets up the host allocator for this process; returns what was done, as a sentence for the log.

  mode: 'retain' keeps freed memory in the process (see the module docstring); 'default' leaves
    malloc alone; 'auto' retains when the computation will run on the CPU (no accelerator expected),
    glibc is the allocator and no other allocator is preloaded.
  Raises ValueError for an unknown mode, and RuntimeError for 'retain' where it cannot take effect
  (not glibc, or JAX/TensorFlow already imported).
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
  if imported:
    reasons.append(f'{", ".join(imported)} already imported: their threads hold their own arenas '
                   '(call configure before importing them)')
  if mode == 'auto' and not reasons and accelerator_expected():
    reasons.append('an accelerator is expected (its temporaries live in device memory)')
  if reasons:
    if mode == 'retain':
      raise RuntimeError('host allocator mode "retain" cannot take effect: ' + '; '.join(reasons))
    return 'host allocator: glibc defaults (' + '; '.join(reasons) + ')'
  libc = ctypes.CDLL(None)
  for parameter, value in _SETTINGS:
    if libc.mallopt(parameter, value) != 1:
      raise RuntimeError(f'mallopt({parameter}, {value}) failed')
  return 'host allocator: freed memory retained (one arena, no mmap, no trim)'


def configure_from_env() -> str:
  """`configure` with the mode in the environment variable IACA_HOST_ALLOCATOR (default 'auto')."""
  return configure(os.environ.get(ENV_VAR, 'auto').strip().lower() or 'auto')
