"""TPU slices this host does not have: their devices (for an ahead-of-time compile) and their chips.

`topology_devices('v5e:16x16')` asks libtpu (`pip install -e '.[tpu]'`) for the devices of a named
slice, which any CPU host can compile for (`train_compile.py`); the figures of `CHIPS` turn the
compiled program's counts into time estimates (`iaca_jax.compile_report`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip as Google publishes it (per chip; `source` is the page the numbers come from).

  `ici_bytes_per_s` is the bandwidth an all-reduce gets per chip: the slice's published all-reduce
  bandwidth per pod divided by the pod's chips where Google gives it, else the chip's ICI bandwidth.
  """

  generation: str
  device_kind: str  # jax.Device.device_kind of its devices
  hbm_bytes: int
  peak_bf16_flops_per_s: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  chip_config: str  # libtpu's chip_config_name: 'megacore' (one device per chip) or 'default'
  max_chips_per_host: int
  source: str


CHIPS = {
  chip.generation: chip
  for chip in (
    # 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s; all-reduce 1.1 PB/s over a 4,096-chip pod.
    Chip('v4', 'TPU v4', 32 * GIB, 275e12, 1200e9, 1.1e15 / 4096, 'megacore', 4,
         'https://cloud.google.com/tpu/docs/v4'),
    # 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s; all-reduce 51.2 TB/s over a 256-chip pod.
    Chip('v5e', 'TPU v5 lite', 16 * GIB, 197e12, 819e9, 51.2e12 / 256, 'default', 8,
         'https://cloud.google.com/tpu/docs/v5e'),
    # 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s; ICI 4,800 Gbit/s (no all-reduce figure published).
    Chip('v5p', 'TPU v5', 95 * 10**9, 459e12, 2765e9, 4800e9 / 8, 'megacore', 4,
         'https://cloud.google.com/tpu/docs/v5p'),
    # 918 TFLOP/s bf16, 32 GB HBM at 1,640 GB/s; all-reduce 102.4 TB/s over a 256-chip pod.
    Chip('v6e', 'TPU v6 lite', 32 * 10**9, 918e12, 1640e9, 102.4e12 / 256, 'default', 8,
         'https://cloud.google.com/tpu/docs/v6e'),
  )
}  # fmt: skip

_TOPOLOGY = re.compile(r'^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$')


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5e:16x16' -> (CHIPS['v5e'], (16, 16)); a clear ValueError for anything else."""
  match = _TOPOLOGY.match(name.strip())
  if not match or match.group(1) not in CHIPS:
    raise ValueError(
      f'Unknown TPU topology {name!r}: expected <generation>:<chips per dimension>, e.g. v5e:2x4, '
      f'v5e:16x16, v4:2x2x2, v5p:4x4x4, v6e:16x16 (generations: {", ".join(CHIPS)}).'
    )
  return CHIPS[match.group(1)], tuple(int(n) for n in match.group(2).split('x'))


def chips_per_host_bounds(chip: Chip, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """The chips of one host, as Cloud TPU builds the slice: a whole small slice of v5e/v6e on one host
  (v5e-8: one host of 2x4), else hosts of 2x2 chips (v4, v5p, and v5e/v6e slices beyond 8 chips)."""
  full = tuple(shape) + (1,) * (3 - len(shape))
  if math.prod(shape) <= chip.max_chips_per_host:
    return full
  return (2, 2, 1)


class TopologyUnavailable(OSError):
  """libtpu is missing or refused the topology."""


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
  """The devices of `num_slices` slices of topology `name` (e.g. 'v5e:16x16'), to compile for; they
  carry `.platform == 'tpu'`, `.device_kind`, `.process_index` (their host) and `.id`."""
  chip, shape = parse_topology(name)
  if num_slices < 1:
    raise ValueError(f'num_slices must be at least 1, got {num_slices}')
  # libtpu otherwise takes a machine-wide lock file, so a second compiling process (a parallel test
  # worker, a second compile) fails; describing a topology uses no TPU, so there is nothing to guard.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - part of jax
    raise TopologyUnavailable(f'jax.experimental.topologies is unavailable: {e}') from e
  try:
    description = topologies.get_topology_desc(
      platform='tpu',
      topology_name=name,
      chip_config_name=chip.chip_config,
      chips_per_host_bounds=chips_per_host_bounds(chip, shape),
      num_slices=num_slices,
    )
  except Exception as e:  # noqa: BLE001 - libtpu missing, or a shape it refuses
    raise TopologyUnavailable(
      f'Could not describe TPU topology {name} x{num_slices} ({type(e).__name__}: {e}). Compiling for TPUs '
      "needs libtpu: pip install -e '.[tpu]'."
    ) from e
  return list(description.devices)


def chip_of(devices: Any) -> Chip | None:
  """The `CHIPS` entry of a mesh's devices (None for CPUs, GPUs and unknown TPUs)."""
  kinds = {d.device_kind for d in devices}
  for chip in CHIPS.values():
    if kinds == {chip.device_kind}:
      return chip
  return None
