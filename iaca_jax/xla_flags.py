"""The XLA flag the project needs before JAX starts its backends: non-finite values stay non-finite.

On CPU, jaxlib 0.10.2's XLA hands reductions fused with elementwise ops to YNNPACK (the fusion kind
`reduce`, on by default beside `individual_dot` and `individual_convolution`), whose `max` and `min`
drop NaN operands. Under `jax.jit`, `jnp.sum(jnp.maximum(x, 0), axis=(1, 2))` (a ReLU before a global
average pool) then turns a NaN into a number: the audio ResNet-18 mapped a NaN log-mel to finite
features from 16 clips a batch on, and a NaN in the data trained on silently. The flag keeps the
default's YNNPACK dots and convolutions and leaves reductions to XLA's own emitter, which propagates
NaN; this costs about 14% CPU on the fusion step (docs/PERFORMANCE.md, "YNNPACK reductions off").

XLA reads XLA_FLAGS once, when JAX starts its backends; importing `iaca_jax` adds the flag unless
XLA_FLAGS already sets the option (a user's choice stands). A process that started JAX's backends
before importing `iaca_jax` gets a warning.
"""

from __future__ import annotations

import os
import warnings

NAME = 'xla_cpu_experimental_ynn_fusion_type'
FLAG = f'--{NAME}=individual_dot,individual_convolution'  # the default kinds less `reduce`


def keep_nan_through_fusions() -> None:
  """Appends `FLAG` to XLA_FLAGS unless it names the option already."""
  flags = os.environ.get('XLA_FLAGS', '')
  if NAME in flags:
    return
  os.environ['XLA_FLAGS'] = f'{flags} {FLAG}'.strip()
  try:  # private, hence guarded: only to warn when the flag comes too late to take effect
    from jax._src.xla_bridge import backends_are_initialized
  except ImportError:
    return
  if backends_are_initialized():
    warnings.warn(
      f'JAX started its backends before iaca_jax was imported, so XLA_FLAGS={FLAG} does not apply: on a '
      'CPU a NaN input may come out as a finite number under jit. Import iaca_jax first or set the flag.',
      RuntimeWarning,
      stacklevel=3,
    )
