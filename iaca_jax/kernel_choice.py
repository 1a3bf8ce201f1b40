"""Which kernels a run computes with, chosen once from the devices it compiles for.

`config.model.kernels`:
  'auto'  the CPU kernels when every device of the run's mesh is a CPU, else the plain XLA ones;
  'xla'   plain JAX and Flax (`iaca_jax.models.kernels.XLA`), what GPUs and TPUs run;
  'cpu'   `iaca_jax.cpu_kernels`: the same values, faster on XLA:CPU (docs/PERFORMANCE.md).
The choice follows the devices a program is compiled for, never the process's default backend: a
CPU host that compiles for a TPU slice gets the XLA kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from iaca_jax.cpu_kernels import cpu_kernels
from iaca_jax.models import IACAModel, model_from_config
from iaca_jax.models.kernels import XLA, Kernels

KERNEL_CHOICES = ('auto', 'xla', 'cpu')


def select_kernels(choice: str, devices: Sequence[Any]) -> Kernels:
  """The kernel set for `choice` (one of KERNEL_CHOICES) on a mesh of `devices` (anything with a
  `.platform`, e.g. jax.Device or a TPU topology's device description)."""
  if choice not in KERNEL_CHOICES:
    raise ValueError(f'Unknown kernels {choice!r}; expected one of {KERNEL_CHOICES}.')
  devices = list(devices)
  if not devices:
    raise ValueError('select_kernels needs the devices of the mesh; got none')
  if choice == 'auto':
    choice = 'cpu' if all(d.platform == 'cpu' for d in devices) else 'xla'
  return cpu_kernels(len(devices)) if choice == 'cpu' else XLA


def build_model(model_config: Mapping[str, Any], devices: Sequence[Any] | None = None) -> IACAModel:
  """`IACAModel` from `config.model`, its kernels chosen for `devices` (default: all of this run's,
  `jax.devices()`): the devices of the mesh its steps are compiled for."""
  config = dict(model_config)
  kernels = select_kernels(config.pop('kernels', 'auto'), jax.devices() if devices is None else devices)
  return model_from_config(config, kernels)
