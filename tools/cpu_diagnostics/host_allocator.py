r"""bench/train_step.py under one of the host allocator settings compared on the 2-core machines of
issue 15 (tools/cpu_diagnostics/README.md): glibc's tunables set for the whole run, or tcmalloc
preloaded. Every argument after the mode goes to bench/train_step.py, whose case processes inherit
the environment and record it (`host_allocator` in the JSON).

    .venv/bin/python tools/cpu_diagnostics/host_allocator.py --mode=one_arena -- --case=fusion --noinput \
        --out=/tmp/train_step_one_arena.json
    .venv/bin/python tools/cpu_diagnostics/host_allocator.py --mode=default -- --case=fusion,demo --noinput

Modes:
  keep       the Makefile's HOST_MALLOC (what `make` exports as GLIBC_TUNABLES): no mmap, no trimming.
  one_arena  keep, plus glibc.malloc.arena_max=1: every thread allocates from the main arena, which
             keeps blocks over a thread arena's 64 MiB too, at the price of one lock.
  default    glibc untouched (GLIBC_TUNABLES removed).
  tcmalloc   LD_PRELOAD of libtcmalloc_minimal (apt-get install libtcmalloc-minimal4), glibc untouched.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODES = ('keep', 'one_arena', 'default', 'tcmalloc')
ONE_ARENA = 'glibc.malloc.arena_max=1'
TCMALLOC = (
  '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
  '/usr/lib64/libtcmalloc_minimal.so.4',
  '/usr/lib/libtcmalloc_minimal.so.4',
)


def makefile_host_malloc(makefile: str = os.path.join(ROOT, 'Makefile')) -> str:
  """The Makefile's HOST_MALLOC default (the glibc tunables `make` runs everything under)."""
  with open(makefile) as f:
    for line in f:
      if line.startswith('HOST_MALLOC ?= '):
        return line.split('?=', 1)[1].strip()
  raise RuntimeError(f'no HOST_MALLOC in {makefile}')


def environment(
  mode: str, base: dict[str, str], host_malloc: str, tcmalloc: str | None = None
) -> dict[str, str]:
  """`base` with the allocator setting of `mode`; `host_malloc` is the Makefile's HOST_MALLOC and
  `tcmalloc` the library to preload (mode tcmalloc only)."""
  env = dict(base)
  if mode in ('default', 'tcmalloc'):
    env.pop('GLIBC_TUNABLES', None)
  elif mode == 'keep':
    env['GLIBC_TUNABLES'] = host_malloc
  elif mode == 'one_arena':
    env['GLIBC_TUNABLES'] = f'{host_malloc}:{ONE_ARENA}'
  else:
    raise ValueError(f'mode {mode!r} not among {MODES}')
  if mode == 'tcmalloc':
    if not tcmalloc:
      raise ValueError('mode tcmalloc needs the library to preload')
    env['LD_PRELOAD'] = ' '.join(filter(None, [env.get('LD_PRELOAD', ''), tcmalloc]))
  return env


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--mode', choices=MODES, required=True, help='The allocator setting (see below).')
  parser.add_argument('train_step_args', nargs=argparse.REMAINDER, help='Arguments for bench/train_step.py.')
  parser.epilog = __doc__[__doc__.index('Modes:') :]
  args = parser.parse_args(argv)
  passed = args.train_step_args[1:] if args.train_step_args[:1] == ['--'] else args.train_step_args
  library = None
  if args.mode == 'tcmalloc':
    library = next((p for p in TCMALLOC if os.path.exists(p)), None)
    if library is None:
      parser.error(f'--mode=tcmalloc: none of {TCMALLOC} (apt-get install libtcmalloc-minimal4)')
  env = environment(args.mode, dict(os.environ), makefile_host_malloc(), library)
  command = [sys.executable, os.path.join(ROOT, 'bench', 'train_step.py'), *passed]
  print(
    f'GLIBC_TUNABLES={env.get("GLIBC_TUNABLES", "")!r} LD_PRELOAD={env.get("LD_PRELOAD", "")!r}', flush=True
  )
  return subprocess.run(command, env=env, cwd=ROOT).returncode


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
