"""XLA options for every step the project compiles: non-finite values must stay non-finite.

On CPU, jaxlib 0.10.2's XLA hands reductions fused with elementwise ops to YNNPACK, whose `max` and
`min` drop NaN operands. Under `jax.jit`, `jnp.sum(jnp.maximum(x, 0), axis=(1, 2))` (a ReLU before
a global average pool) then turns a NaN into a number: the audio ResNet-18 mapped a NaN log-mel to
finite features from 16 clips a batch on, and a NaN in the data trained on silently. With YNNPACK
fusions off, every op propagates NaN as it does eagerly at small sizes; the step time on the demo
and fusion models is unchanged within noise (docs/PERFORMANCE.md, "Compiler options").
"""

from __future__ import annotations

import jax

_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}  # no YNNPACK fusions (an empty set)


def compiler_options() -> dict[str, str] | None:
  """`jax.jit(..., compiler_options=...)` for the current default backend (None off the CPU)."""
  return dict(_CPU_OPTIONS) if jax.default_backend() == 'cpu' else None
