"""Ctrl-C during training: a SIGINT is never lost, even one that lands inside a garbage-collection
callback (where Python prints a KeyboardInterrupt as "Exception ignored" and goes on), and a second
one ends the process at once."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A SIGINT whose Python handler runs inside a gc callback, as JAX's `_xla_gc_callback` is one, then a
# second SIGINT.
SCRIPT = r"""
import gc, os, signal, time
from iaca_jax import interrupts

sent = []

def interrupt_here(phase, info):
  if phase == 'start' and not sent:
    sent.append(True)
    os.kill(os.getpid(), signal.SIGINT)  # Python runs a signal's handler at the next bytecode: in here
    sum(range(10000))

with interrupts.StopRequest() as stop:
  gc.callbacks.append(interrupt_here)
  gc.collect()
  gc.callbacks.remove(interrupt_here)
  deadline = time.monotonic() + 10
  while not stop.after_step(1) and time.monotonic() < deadline:
    time.sleep(0.01)
  print('stop requested' if stop.after_step(1) else 'the SIGINT was lost', flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(60)
print('the second SIGINT did not stop the process', flush=True)
"""


def test_a_sigint_inside_a_gc_callback_is_kept_and_a_second_one_stops_at_once():
  run = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=50)
  assert run.stdout.splitlines() == ['stop requested'], run.stdout + run.stderr[-2000:]
  assert run.returncode == 130, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1] == 'SIGINT again: stopping at once (exit status 130)'
  assert 'Exception ignored' not in run.stderr and 'Traceback' not in run.stderr, run.stderr[-2000:]
