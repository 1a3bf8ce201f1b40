"""Helpers of the one-machine CPU diagnostics (tools/cpu_diagnostics/): thread occupancy from a trace,
the matrix products of a compiled program (from its HLO text), the one-case set-up of
bench/train_step.py for the tools that time steps in one process, and their result files.

The diagnostics import bench/common.py (this module puts bench/ on sys.path) for the pieces they
share with the benchmarks. Nothing here imports the model code until `compiled_case` runs.
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BENCH = os.path.join(ROOT, 'bench')
RESULTS = os.path.join(HERE, 'results')
for _path in (BENCH, ROOT):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import common  # noqa: E402 (bench/common.py)

# ---------------------------------------------------------------------------------------------
# Thread occupancy from a `jax.profiler` trace's op events (`common.traced`).


def occupancy(events: Iterable[dict], names: Iterable[str]) -> dict[int, float]:
  """Seconds during which k threads were inside an op event (k = 0, 1, 2, ...), from the first op's
  start to the last op's end. Only events named in `names` (HLO instructions) count; nested events
  of one thread (a loop and its body) count once. k = 0 is time with no op running anywhere: on a
  CPU, XLA waiting for an asynchronous (Eigen) product, whose event covers only its dispatch, or the
  host between steps."""
  names = set(names)
  by_thread = collections.defaultdict(list)
  for event in events:
    if event['name'] in names:
      by_thread[(event.get('pid'), event.get('tid'))].append((event['ts'], event['ts'] + event['dur']))
  edges = []
  for intervals in by_thread.values():
    intervals.sort()
    start, end = intervals[0]
    for s, e in intervals[1:] + [(float('inf'), float('inf'))]:
      if s > end:  # the union of one thread's intervals, as +1 / -1 edges
        edges += [(start, 1), (end, -1)]
        start, end = s, e
      else:
        end = max(end, e)
  if not edges:
    return {}
  seconds = collections.defaultdict(float)
  edges.sort()
  active, last = 0, edges[0][0]
  for time_us, change in edges:
    seconds[active] += (time_us - last) * 1e-6
    active, last = active + change, time_us
  return dict(sorted(seconds.items()))


# ---------------------------------------------------------------------------------------------
# The matrix products of a compiled program, from its HLO text.

_HLO_DEFINITION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]', re.M)
_HLO_DOT = re.compile(
  r'^\s*(?:ROOT )?%[\w.\-]+ = \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$', re.M
)
_HLO_COMPUTATION = re.compile(r'^%([\w.\-]+) \(.*?\{\n(.*?)\n\}', re.M | re.S)
_HLO_FUSION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .* fusion\(.*?calls=%([\w.\-]+)', re.M)


def _dims(text: str, field: str) -> tuple[int, ...]:
  match = re.search(field + r'=\{([\d,]*)\}', text)
  return tuple(int(d) for d in match.group(1).split(',') if d) if match else ()


def hlo_products(hlo: str) -> dict[str, list[tuple]]:
  """Op name -> the products it runs: (dtype, lhs shape, rhs shape, dimension numbers) for each dot of
  an XLA dot op, or of the computation a (YNNPACK) fusion calls. Only ops that appear in a trace matter."""
  shapes = {
    name: (dtype, tuple(int(d) for d in dims.split(',') if d))
    for name, dtype, dims in _HLO_DEFINITION.findall(hlo)
  }

  def dots(text: str) -> list[tuple]:
    found = []
    for lhs, rhs, rest in _HLO_DOT.findall(text):
      numbers = tuple(_dims(rest, f) for f in ('lhs_contracting_dims', 'rhs_contracting_dims'))
      numbers += tuple(_dims(rest, f) for f in ('lhs_batch_dims', 'rhs_batch_dims'))
      found.append((shapes[lhs][0], shapes[lhs][1], shapes[rhs][1], numbers))
    return found

  bodies = dict(_HLO_COMPUTATION.findall(hlo))
  table = {}
  for line in hlo.splitlines():
    dot = _HLO_DOT.match(line)
    if dot:
      table[re.match(r'^\s*(?:ROOT )?%([\w.\-]+)', line).group(1)] = dots(line)
  for name, called in _HLO_FUSION.findall(hlo):
    if name.startswith('ynn_fusion') and called in bodies:
      table[name] = dots(bodies[called])
  return {name: found for name, found in table.items() if found}


def product_contraction(product: tuple) -> str:
  """'1.0' for lhs axis 1 against rhs axis 0; batch axes after a semicolon."""
  lc, rc, lb, rb = product[3]
  text = ','.join(f'{a}.{b}' for a, b in zip(lc, rc))
  return text + (';' + ','.join(f'{a}.{b}' for a, b in zip(lb, rb)) if lb else '')


def product_flops(product: tuple) -> float:
  """2 x batch x free lhs x free rhs x contracted elements of one product of `hlo_products`."""
  _, lhs, rhs, (lhs_contract, rhs_contract, lhs_batch, _) = product
  contracted = math.prod(lhs[d] for d in lhs_contract)
  batch = math.prod(lhs[d] for d in lhs_batch)
  lhs_free = math.prod(lhs) // (contracted * batch)
  rhs_free = math.prod(rhs) // (contracted * batch)
  return 2.0 * batch * lhs_free * rhs_free * contracted


# ---------------------------------------------------------------------------------------------
# One case of bench/train_step.py, compiled in this process. The tools that use it import
# `train_step` first, which registers its flags (--case, --batch, --steps, --warmup, --out).


def single_case() -> str:
  """--case for the tools that time one case (`step_ops.py`, `step_ab.py`, `step_products.py`): fusion
  unless given."""
  import train_step  # noqa: PLC0415 (bench/train_step.py)
  from absl import app, flags  # noqa: PLC0415

  given = flags.FLAGS['case']
  case = 'fusion' if given.using_default_value else given.value
  if case not in train_step.CASES:
    raise app.UsageError(f'--case takes one of {train_step.CASES}; got {case!r}')
  return case


def compiled_case(case: str, dtype: str = 'fp32', model_overrides: dict | None = None):
  """A case's train step compiled on its synthetic batch, as bench/train_step.py builds it. Returns
  (compiled step, state, device batch, rng, settings), settings as `train_step.case_settings` with the
  batch filled in. `model_overrides` replace config.model fields (e.g. {'kernels': 'xla'})."""
  import jax  # noqa: PLC0415
  import train_step  # noqa: PLC0415

  from iaca_jax import kernel_choice, train_lib  # noqa: PLC0415

  config = train_step.case_config(case, dtype)
  config.model.update(model_overrides or {})
  settings = train_step.case_settings(case, jax.default_backend() == 'cpu')
  settings['batch'] = settings['batch'] or config.dataset.batch_size
  mesh = train_lib.create_mesh()
  model = kernel_choice.build_model(config.model, mesh.devices.flat)  # config.model.kernels
  trainer = train_lib.Trainer(model, mesh)
  tx = train_lib.make_optimizer(config, steps_per_epoch=1000)
  host_batch = train_step.synthetic_batch(case, config, model, settings['batch'])
  state = trainer.replicate(train_lib.init_state(model, host_batch, jax.random.key(0), tx))
  batch, rng = trainer.shard_batch(host_batch), jax.random.key(1)
  return trainer.train_step.lower(state, batch, rng).compile(), state, batch, rng, settings


# ---------------------------------------------------------------------------------------------


def write_run(out: str, default_name: str, **fields: Any) -> str:
  """Writes a tool's result as JSON to `out`, or to tools/cpu_diagnostics/results/<default_name>: the
  command line and the machine, then `fields`. Returns the path, which it also prints."""
  path = out or os.path.join(RESULTS, default_name)
  common.write_json(path, dict(command='python ' + ' '.join(sys.argv), machine=common.machine(), **fields))
  print(f'wrote {path}')
  return path
