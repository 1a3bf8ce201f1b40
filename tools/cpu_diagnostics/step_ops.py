r"""Where a compiled train step spends its time, op by op: every HLO instruction's time in a
`jax.profiler` trace, including the fusions that carry no `op_name` (reduce-windows, loop bodies),
which the per-component profile of `bench/train_step.py --profile` cannot place. Ops are grouped by
kind (YNNPACK products, other products, reduce-windows, copies, loop fusions); the slowest are listed
with their shape and, where known, their op_name. Found XLA:CPU's reduce-window loops (issue 15).

The "other products" are XLA's own (Eigen) matrix products. A large one runs asynchronously on Eigen's
thread pool, and its trace event covers only its dispatch: the `affine_video` kernel gradient, 26 GFLOP
and ~75 ms alone, shows 0.4 ms. Their total is a lower bound, and the step's
time can exceed the op time summed here. The occupancy line says for how long 2, 1 or no threads were
inside an op event: the time with none is, in the main, XLA waiting for such products to finish.

    .venv/bin/python tools/cpu_diagnostics/step_ops.py       # the paper-size fusion step, fp32, batch 64
    .venv/bin/python tools/cpu_diagnostics/step_ops.py --case=demo --top=20 --out=/tmp/step_ops_demo.json
"""

from __future__ import annotations

import collections
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'bench'), HERE]

import common  # noqa: E402 (bench/common.py)
import common_diag  # noqa: E402

from iaca_jax import runtime  # noqa: E402

os.environ['XLA_FLAGS'] = common.profile_flags(os.environ.get('XLA_FLAGS', ''))

import train_step  # noqa: E402, F401 (bench/train_step.py: registers the case flags used below)
from absl import app, flags  # noqa: E402

# --case, --batch, --warmup and --out are bench/train_step.py's flags (one case here; fusion by default).
flags.DEFINE_integer('traced_steps', 2, 'Steps in the trace.')
flags.DEFINE_integer('top', 30, 'Slowest ops listed.')
FLAGS = flags.FLAGS

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w-]+)\((.*)$', re.M)


def _kind(name: str, opcode: str) -> str:
  if name.startswith('ynn_fusion'):
    return 'YNNPACK product'
  if opcode == 'dot' or name.startswith('dot'):
    return 'other product'
  if 'reduce-window' in name or opcode == 'reduce-window':
    return 'reduce-window'
  if 'copy' in name or opcode == 'copy':
    return 'copy'
  return 'loop fusion or other'


def instructions(hlo: str) -> dict[str, dict]:
  """HLO instruction name -> its shape, opcode and op_name (when it has one)."""
  table = {}
  for name, shape, opcode, rest in _INSTRUCTION.findall(hlo):
    op_name = re.search(r'op_name="([^"]*)"', rest)
    table[name] = dict(shape=shape, opcode=opcode, op_name=op_name.group(1) if op_name else '')
  return table


def main(argv) -> None:
  del argv
  runtime.configure_process()  # as the entry points do, before any device is used
  case = common_diag.single_case()
  compiled, state, batch, rng, settings = common_diag.compiled_case(case)
  table = instructions(compiled.as_text())

  step = lambda carry: compiled(carry[0], batch, rng)
  _, _, carry = common.time_calls(step, (state, None), settings['warmup'] + 1)
  (walls, _, _), events = common.traced(lambda: common.time_calls(step, carry, FLAGS.traced_steps))
  wall = sum(walls) / FLAGS.traced_steps
  # Self time: a loop's event holds its body's ops, which are counted on their own.
  seconds = {name: s / FLAGS.traced_steps for name, s in common.self_times(events).items() if name in table}
  calls = collections.Counter(event['name'] for event in events if event['name'] in table)
  by_kind = collections.defaultdict(float)
  for name, s in seconds.items():
    by_kind[_kind(name, table[name]['opcode'])] += s
  total = sum(seconds.values())
  print(f'{case}: {1e3 * wall:.0f} ms a step under the profiler, {1e3 * total:.0f} ms of op time')
  occupied = {k: s / FLAGS.traced_steps for k, s in common_diag.occupancy(events, table).items()}
  print(
    'threads inside an op event, ms a step: '
    + ', '.join(f'{k}: {1e3 * s:.0f}' for k, s in sorted(occupied.items(), reverse=True))
    + ' (0: waiting for asynchronous products, or the host)'
  )
  print(
    common.table(
      [
        dict(kind=k, ms=1e3 * s, share=100 * s / total)
        for k, s in sorted(by_kind.items(), key=lambda kv: -kv[1])
      ],
      [('kind', 'kind', ''), ('ms', 'ms/step', '.1f'), ('share', '%', '.1f')],
    )
  )
  print('(other products: a large one is timed at its dispatch only; see the docstring)')
  top = sorted(seconds.items(), key=lambda kv: -kv[1])[: FLAGS.top]
  rows = [
    dict(
      op=name,
      ms=1e3 * s,
      calls=calls[name] // FLAGS.traced_steps,
      kind=_kind(name, table[name]['opcode']),
      shape=table[name]['shape'],
      op_name=table[name]['op_name'][-70:],
    )
    for name, s in top
  ]
  print(
    common.table(
      rows,
      [(c, c, '.2f' if c == 'ms' else '') for c in ('op', 'ms', 'calls', 'kind', 'shape', 'op_name')],
    )
  )
  common_diag.write_run(
    FLAGS.out,
    f'step_ops_{case}.json',
    load_average=common.load_average(),
    step_s_under_profiler=wall,
    op_seconds_per_step=total,
    seconds_per_step_by_threads_in_ops=occupied,
    by_kind={k: s for k, s in by_kind.items()},
    top=rows,
  )


if __name__ == '__main__':
  app.run(main)
