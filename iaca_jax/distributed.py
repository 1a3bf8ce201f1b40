"""Joining a multi-process JAX run, before anything touches a device (called first by the entry points).

`config.cluster.distributed=True` with nothing else set lets JAX detect the cluster (Cloud TPU, SLURM,
Open MPI, Kubernetes, ...). Anywhere else give the coordinator (process 0's `host:port`), the number of
processes and this process's id by config or environment:

    --config.cluster.coordinator_address=10.0.0.1:8476 --config.cluster.num_processes=2 \
      --config.cluster.process_id=0
    JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0

On CPUs the cross-process collectives run over gloo (TCP). A process that stops sending heartbeats for
`config.cluster.timeout_s` seconds is declared dead and the others end with an error instead of
waiting in a collective forever; the same bound applies to the shutdown barrier (joining waits at
least 300 s for every process to start).

When a process of the run dies, the others end with one `error: ...` line and exit status 1
(`leave`, `_end_cleanly_on_abort`): a collective that fails, JAX's coordination client aborting the
process (at once when process 0, the coordinator, is gone), or an error of this process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from iaca_jax.preprocessing.errors import first_line

ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def _int_setting(value: int | None, env: str) -> int | None:
  if value is not None:
    return value
  text = os.environ.get(env, '')
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'${env}={text!r} is not an integer') from None


def initialize(config: ml_collections.ConfigDict) -> None:
  """Joins the run described by `config.cluster` (nothing when `distributed` is False); idempotent.

  Afterwards only process 0 logs below ERROR level; it alone writes logs, TensorBoard events,
  progress bars and result files (checkpoints are written by every process, as Orbax requires).
  """
  cluster = config.get('cluster')
  if cluster is None or not cluster.distributed or jax.distributed.is_initialized():
    return
  address = cluster.coordinator_address  # None: $JAX_COORDINATOR_ADDRESS or detected by JAX
  num_processes = _int_setting(cluster.num_processes, ENV_NUM_PROCESSES)
  process_id = _int_setting(cluster.process_id, ENV_PROCESS_ID)
  timeout = int(cluster.timeout_s)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # the default; None cannot cross hosts
  try:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=max(timeout, 300),  # every process must have started (imports and all)
      heartbeat_timeout_seconds=timeout,
      shutdown_timeout_seconds=timeout,
    )
  except (RuntimeError, ValueError) as e:  # e.g. no coordinator reachable, no cluster detected
    raise ConnectionError(
      f'Could not join the multi-process run ({e}). Set config.cluster.coordinator_address, '
      f'num_processes and process_id (or $JAX_COORDINATOR_ADDRESS, ${ENV_NUM_PROCESSES}, '
      f'${ENV_PROCESS_ID}) unless the cluster (Cloud TPU, SLURM, ...) is detected.'
    ) from e
  if not is_main_process():
    logging.set_verbosity(logging.ERROR)
  if jax.process_count() > 1:
    _end_cleanly_on_abort()
    _leave_after_uncaught_exceptions()


_leaving_with: int | None = None  # the exit status of a process on its way out (`leave`)
_abort_handler = None  # the C callback of `_end_cleanly_on_abort`, kept alive


def _end_cleanly_on_abort() -> None:
  """JAX's coordination client ends a process whose coordinator or peer is lost with abort(): SIGABRT,
  a C++ stack, "Fatal Python error: Aborted". jaxlib 0.10.2 has no hook for it that Python can use (a
  Python `missed_heartbeat_callback` fails to receive its absl::Status and aborts all the same), so a
  SIGABRT handler ends the process instead: JAX's message stays, followed by one line, exit status 1."""
  global _abort_handler
  where = f'process {jax.process_index()} of {jax.process_count()}'
  coordinator = '' if is_main_process() else ', perhaps process 0 (the coordinator),'
  message = (
    f'\nerror: the JAX runtime stopped {where} (its message is above): another process{coordinator} died. '
    'Rerun every process to resume from the last complete checkpoint.\n'
  ).encode()

  def on_abort(signum: int) -> None:
    if _leaving_with is None:  # not already leaving on an error of its own, which was reported
      os.write(2, message)
    os._exit(_leaving_with or 1)

  handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
  _abort_handler = handler_type(on_abort)
  libc = ctypes.CDLL(None)
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = (ctypes.c_int, handler_type)
  libc.signal(signal.SIGABRT, _abort_handler)


def _leave_after_uncaught_exceptions() -> None:
  hook = sys.excepthook

  def excepthook(*args) -> None:
    hook(*args)
    leave(1)

  sys.excepthook = excepthook


def leave(status: int) -> None:
  """Ends the process with `status`. A process of a multi-process run that leaves early (an error, a
  stop) skips JAX's shutdown barrier, which would wait for processes that may be waiting in a
  collective for this one, and then abort."""
  global _leaving_with
  sys.stdout.flush()
  sys.stderr.flush()
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    sys.exit(status)
  _leaving_with = status
  os._exit(status)


def lost_peer_message(error: Exception) -> str | None:
  """One line for a collective that failed because another process of the run is gone, else None."""
  text = str(error)
  if jax.process_count() == 1 or not any(k in text for k in ('Gloo', 'peer', 'UNAVAILABLE', 'DEADLINE')):
    return None
  return (
    f'process {jax.process_index()} of {jax.process_count()} lost another process of the run '
    f'({first_line(error)}). '
    'Rerun every process to resume from the last complete checkpoint.'
  )


def is_main_process() -> bool:
  """True on process 0: the one that logs and writes result files."""
  return jax.process_index() == 0


def _replicate_leaf(x, sharding):
  if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
    return jax.random.wrap_key_data(
      _replicate_leaf(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
    )
  value = np.asarray(x)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`tree` (the same values on every process) as arrays replicated over `sharding`'s devices, which
  may span processes (where `jax.device_put` only takes this process's devices)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: _replicate_leaf(x, sharding), tree)


def fetch(tree: Any) -> Any:
  """Device arrays -> NumPy on every process, also arrays no process holds whole (a replica state
  sharded over device groups on several hosts: each host holds its groups' replicas). Collective when
  such an array is present: every process must call it at the same point."""

  spans_hosts = lambda x: isinstance(x, jax.Array) and not x.is_fully_addressable
  if not any(spans_hosts(x) for x in jax.tree.leaves(tree)):
    return jax.tree.map(np.asarray, jax.device_get(tree))  # one transfer for the whole tree
  return jax.tree.map(
    lambda x: np.asarray(
      multihost_utils.process_allgather(x, tiled=True) if spans_hosts(x) else jax.device_get(x)
    ),
    tree,
  )
