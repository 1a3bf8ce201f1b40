"""Kernels that XLA:CPU runs faster than the plain ones, with the same values (docs/PERFORMANCE.md,
"CPU kernels").

Each piece here has a test against the plain kernel of `iaca_jax.models.kernels` (tests/test_cpu_*.py):
  dense.Dense, matmul, add_bias  `nn.Dense` with its kernel and bias gradients written out
  reductions                     large sums as products with a vector of ones
  dropout.FusedDropout           `nn.Dropout` with its threefry mask as one fused expression (same bits)
  coattention                    the dense co-attention's core with a hand-written backward pass, in
                                 row chunks on one device
A run gets them through `iaca_jax.kernel_choice.select_kernels` ('auto' on CPU devices, or 'cpu').
"""

from __future__ import annotations

import functools

from iaca_jax.cpu_kernels import coattention, dense, dropout, reductions
from iaca_jax.models import kernels
from iaca_jax.models.kernels import Kernels


@functools.cache
def cpu_kernels(mesh_devices: int = 1) -> Kernels:
  """The CPU kernel set for a mesh of `mesh_devices` devices (cached: one object per size, so that
  models built twice compare equal and share their compiled steps).

  On several devices two pieces are left plain, because XLA's partitioner would gather a batch that is
  sharded over the devices (each device would compute every row; tests/test_train_lib.py checks the
  compiled step): the co-attention runs the batch in one piece instead of a loop over row chunks, and
  the LSTMs' input projection and bias, whose gradients' rows come time first, are XLA's.
  """
  one_device = mesh_devices == 1
  chunk = coattention.CPU_CHUNK if one_device else None
  return Kernels(
    name='cpu',
    dense=dense.Dense,
    dropout=dropout.FusedDropout,
    matmul=dense.matmul if one_device else kernels.matmul,
    add_bias=dense.add_bias if one_device else kernels.add_bias,
    sum_trailing=reductions.sum_trailing,
    coattention=functools.partial(coattention.coattention, chunk=chunk),
    global_norm=reductions.global_norm,
    all_finite=reductions.all_finite,
  )


__all__ = ['cpu_kernels']
