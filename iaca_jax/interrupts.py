"""Ctrl-C and SIGTERM during training: a request to stop after the current step.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is; raised inside a
garbage-collection callback or a `__del__` (JAX runs one at every collection) it is printed as
"Exception ignored" and lost, and training went on. `StopRequest` installs handlers that raise nothing:
Python's C-level handler writes the signal's number to a socket (`signal.set_wakeup_fd`) even while
the main thread is inside XLA, and a watcher thread reading it records the request. The training loop
asks between steps, saves and ends; a second signal ends the process at once (exit status 128 + the
signal), an unfinished save staying invisible (Orbax renames a checkpoint only when complete).

In a multi-process run every process must stop after the same step: they step in lockstep through
collectives, and all of them write each checkpoint. JAX's preemption service, which catches SIGTERM in
every process, agrees on that step (`multihost_utils.reached_preemption_sync_point`); Ctrl-C is passed
to it as a SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import jax
from jax.experimental import multihost_utils


class Interrupted(Exception):
  """Training stopped on request: the entry points print the message and exit with `exit_status`."""

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


def _agreed_across_processes() -> bool:
  return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class StopRequest:
  """A context: SIGINT (and SIGTERM, unless JAX's preemption service has it) request a stop.

  Outside the main thread (where signals cannot be handled) it does nothing."""

  def __init__(self):
    self.signal: int | None = None  # the first signal this process received
    self._agreed = False
    self._installed: dict[int, object] = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      return self
    self._agreed = _agreed_across_processes()
    signals = [signal.SIGINT] if self._agreed else [signal.SIGINT, signal.SIGTERM]
    self._read, write = socket.socketpair()
    write.setblocking(False)
    self._write = write
    self._previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
    for signum in signals:
      self._installed[signum] = signal.signal(signum, lambda *_: None)  # raises nothing; see the watcher
    self._watcher = threading.Thread(target=self._watch, name='stop-request', daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc) -> None:
    if not self._installed:
      return
    for signum, previous in self._installed.items():
      signal.signal(signum, previous)
    signal.set_wakeup_fd(self._previous_fd)
    self._installed = {}
    self._write.close()  # the watcher reads the end and returns
    self._watcher.join(timeout=5)
    self._read.close()

  def _watch(self) -> None:
    while data := self._read.recv(64):
      for signum in data:
        if signum in self._installed:
          self._received(signum)

  def _received(self, signum: int) -> None:
    name = signal.Signals(signum).name
    if self.signal is not None:
      os.write(2, f'\n{name} again: stopping at once (exit status {128 + signum})\n'.encode())
      os._exit(128 + signum)
    self.signal = signum
    os.write(2, f'\n{name}: stopping after the current step ({name} again to stop at once)\n'.encode())
    if self._agreed:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, which tells every process

  def pending(self) -> bool:
    """A stop this process may act on alone, before the next step (one process only)."""
    return not self._agreed and self.signal is not None

  def after_step(self, step: int) -> bool:
    """Whether to stop after `step` (the steps done); every process of a run calls it after every
    step, and all get True at the same one."""
    if self._agreed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None

  def exit_status(self) -> int:
    """128 + the signal this process received; a process stopped for another one: SIGTERM's."""
    return 128 + (self.signal or signal.SIGTERM)

  def reason(self) -> str:
    if self.signal is not None:
      return f'interrupted ({signal.Signals(self.signal).name})'
    return 'stopped on request (SIGTERM, or Ctrl-C to another process of the run)'
