"""The metric writers of a training run: TensorBoard event files and log.txt, on process 0 only."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import tqdm
from clu import metric_writers


class LogLineWriter(metric_writers.LoggingWriter):
  """clu's logging writer, also printing each line above the progress bar and appending it to a file."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    super().write_scalars(step, scalars)
    line = f'step {step}: ' + ', '.join(f'{k}={float(v):.4g}' for k, v in scalars.items())
    tqdm.tqdm.write(line)
    with open(self.path, 'a') as f:
      f.write(line + '\n')


def create_metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files and log.txt in `workdir` on process 0; plain logging elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  return metric_writers.MultiWriter(
    [
      metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard')),
      LogLineWriter(os.path.join(workdir, 'log.txt')),
    ]
  )
