"""The process settings the project's entry points make, in one explicit call before JAX starts.

`configure_process()` (called first by train.py, evaluate.py, predict.py, cache_features.py,
experiments.py and the tests' conftest) makes three settings:

1. Non-finite values stay non-finite on XLA:CPU (`XLA_FLAGS`). jaxlib 0.10.2's XLA:CPU hands
   reductions fused with elementwise ops to YNNPACK (the fusion kind `reduce`, on by default beside
   `individual_dot` and `individual_convolution`), whose `max` and `min` drop NaN operands. Under
   `jax.jit`, `jnp.sum(jnp.maximum(x, 0), axis=(1, 2))` (a ReLU before a global average pool) then
   turns a NaN into a number: the audio ResNet-18 mapped a NaN log-mel to finite features, and a NaN
   in the data trained on silently. `FLAG` keeps YNNPACK's dots and convolutions and leaves
   reductions to XLA's own emitter, which propagates NaN (about 14% CPU on the fusion step). A user's
   XLA_FLAGS that names the option stands.
2. Single-device CPU computations run in the calling thread (`jax_cpu_enable_async_dispatch` off)
   unless IACA_CPU_ASYNC_DISPATCH=1. Asynchronous dispatch runs each step on a worker thread, whose
   glibc arena (heaps of at most 64 MiB) serves a step's temporaries (one 1.85 GiB block for the
   paper-size fusion step) from mmap, page-faulted in again every step whatever GLIBC_TUNABLES say.
   Run inline, they come from the main arena, which the Makefile's HOST_MALLOC keeps
   (docs/PERFORMANCE.md). The input pipeline's threads keep reading during the step.

3. Compiled programs are kept between commands in JAX's persistent compilation cache, in
   `$XDG_CACHE_HOME/iaca_jax/jit` (`~/.cache/iaca_jax/jit`), so that the second predict.py or
   evaluate.py of a model loads its programs instead of compiling them again (docs/PREDICT.md has the
   start-up before and after). JAX_COMPILATION_CACHE_DIR chooses another folder; IACA_JIT_CACHE=0
   turns the cache off. A cache entry's key holds the program, the XLA flags, the devices and the
   jax version, so a hit is the same executable.

XLA reads XLA_FLAGS once, when JAX starts its backends: a call after that warns.
"""

from __future__ import annotations

import os
import warnings

NAME = 'xla_cpu_experimental_ynn_fusion_type'
FLAG = f'--{NAME}=individual_dot,individual_convolution'  # the default kinds less `reduce`
ASYNC_DISPATCH_ENV = 'IACA_CPU_ASYNC_DISPATCH'
JIT_CACHE_ENV = 'IACA_JIT_CACHE'


def _backends_started() -> bool:
  try:  # private, hence guarded: only to warn when the settings come too late to take effect
    from jax._src.xla_bridge import backends_are_initialized
  except ImportError:
    return False
  return backends_are_initialized()


def keep_nan_through_fusions() -> None:
  """Appends `FLAG` to XLA_FLAGS unless it names the option already."""
  flags = os.environ.get('XLA_FLAGS', '')
  if NAME in flags:
    return
  os.environ['XLA_FLAGS'] = f'{flags} {FLAG}'.strip()
  if _backends_started():
    warnings.warn(
      f'JAX started its backends before iaca_jax.runtime.configure_process(), so XLA_FLAGS={FLAG} does '
      'not apply: on a CPU a NaN input may come out as a finite number under jit. Call it first or set '
      'the flag yourself.',
      RuntimeWarning,
      stacklevel=3,
    )


def run_cpu_steps_inline() -> None:
  """`jax_cpu_enable_async_dispatch` off unless IACA_CPU_ASYNC_DISPATCH=1 (see the module's text)."""
  if os.environ.get(ASYNC_DISPATCH_ENV, '0') != '1':
    import jax

    jax.config.update('jax_cpu_enable_async_dispatch', False)


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/iaca_jax/jit`, `~/.cache/iaca_jax/jit` without it."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'iaca_jax', 'jit')


def keep_compiled_programs() -> str | None:
  """JAX's persistent compilation cache on, in JAX_COMPILATION_CACHE_DIR or `default_cache_dir()`,
  unless IACA_JIT_CACHE=0. Returns the folder (None when off)."""
  if os.environ.get(JIT_CACHE_ENV, '1') == '0':
    return None
  import jax

  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR') or default_cache_dir()
  jax.config.update('jax_compilation_cache_dir', folder)
  return folder


def configure_process() -> None:
  """The three settings of this module; call it before anything uses JAX's devices."""
  keep_nan_through_fusions()
  run_cpu_steps_inline()
  keep_compiled_programs()
