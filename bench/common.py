"""Shared pieces of the benchmarks in bench/: machine description, the matmul peak, step timing, XLA's
cost and memory analyses, a per-component profile from a `jax.profiler` trace, table printing and
result files. (The one-machine CPU diagnostics in tools/cpu_diagnostics/ add their own helpers in
`common_diag.py`.)

Import after any XLA_FLAGS you need are in the environment (`profile_flags()` gives the one the
per-component profile needs on a CPU).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import platform
import re
import resource
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iaca_jax import compile_report
from iaca_jax.compile_report import matmul_flops  # noqa: F401 (the benchmarks count FLOPs with it)

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}
# XLA's CPU runtime records one trace event per HLO op (thunk) only with this flag.
CPU_TRACE_FLAG = '--xla_cpu_enable_xprof_traceme=true'


def profile_flags(xla_flags: str = '') -> str:
  """XLA_FLAGS with the per-op CPU trace events switched on (set before JAX initialises)."""
  return xla_flags if CPU_TRACE_FLAG in xla_flags else f'{xla_flags} {CPU_TRACE_FLAG}'.strip()


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def machine() -> dict:
  """What the numbers were taken on."""
  devices = jax.devices()
  info = dict(
    backend=jax.default_backend(),
    devices=[d.device_kind for d in devices],
    cpu=_cpu_model(),
    cpu_count=os.cpu_count(),
    python=platform.python_version(),
    jax=jax.__version__,
    hostname_hash=hash(platform.node()) % 10**6,
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    ld_preload=os.environ.get('LD_PRELOAD', ''),
  )
  try:
    with open('/proc/meminfo') as f:
      info['host_memory_gib'] = round(int(f.readline().split()[1]) / 2**20, 1)
  except OSError:
    pass
  info['cpu_isa'] = _cpu_isa()
  return info


def _cpu_isa() -> list[str]:
  """The vector extensions XLA:CPU's kernels depend on most (same model name, different figures)."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
  except OSError:
    return []
  return [
    flag for flag in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile') if flag in flags
  ]


def block(tree):
  return jax.block_until_ready(tree)


def matmul_peak(dtype, n: int | None = None, reps: int | None = None) -> dict:
  """The device's achievable matmul rate in `dtype`: median over `reps` (n x n) @ (n x n) products."""
  on_cpu = jax.default_backend() == 'cpu'
  n = n or (2048 if on_cpu else 8192)
  reps = reps or (7 if on_cpu else 30)
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  block(matmul(a, b))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    block(matmul(a, b))
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  return dict(n=n, reps=reps, seconds=seconds, flops_per_s=2 * n**3 / seconds, load=load_average())


def cost_flops(compiled) -> float | None:
  """FLOPs of one call from XLA's cost analysis (None if the backend has none)."""
  return compile_report.cost(compiled).get('flops')


def memory(compiled) -> dict:
  """XLA's buffer assignment: arguments, outputs (less donated aliases) and temporaries, in bytes."""
  stats = compile_report.memory(compiled)
  if not stats:
    return {}
  out = {k: stats[k] for k in ('argument', 'output', 'alias', 'temp')}
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def device_peak_bytes() -> int | None:
  """Peak bytes in use on device 0 (accelerators); None where the backend keeps no statistics."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_calls(call: Callable[[Any], Any], carry: Any, count: int) -> tuple[list[float], list[float], Any]:
  """Runs `carry = call(carry)` `count` times, waiting for each; wall and process-CPU seconds per call."""
  walls, cpus = [], []
  for _ in range(count):
    start, cpu0 = time.perf_counter(), cpu_seconds()
    carry = block(call(carry))
    walls.append(time.perf_counter() - start)
    cpus.append(cpu_seconds() - cpu0)
  return walls, cpus, carry


# ---------------------------------------------------------------------------------------------
# Per-component profile: a jax.profiler trace of a few steps, each op event attributed to the
# model component named in its HLO metadata (the Flax module path in `op_name`).

_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*?op_name="([^"]*)"', re.M)


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> op_name metadata (both '.' and '_' spellings, as kernels are named)."""
  names = {}
  for match in _OP_NAME.finditer(hlo_text):
    names[match.group(1)] = match.group(2)
    names.setdefault(match.group(1).replace('.', '_'), match.group(2))
  return names


def _trace_events(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True))
  if not paths:
    return []
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  # On accelerators keep the device's own timeline (the host side only launches kernels).
  device_pids = {
    e['pid']
    for e in events
    if e.get('ph') == 'M'
    and e.get('name') == 'process_name'
    and re.search(r'/device:(GPU|TPU)', str(e.get('args', {}).get('name', '')))
  }
  return [
    e for e in events if e.get('ph') == 'X' and 'dur' in e and (not device_pids or e['pid'] in device_pids)
  ]


def traced(run: Callable[[], Any]) -> tuple[Any, list[dict]]:
  """`run()` under a `jax.profiler` trace: what it returns and the trace's op events."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      result = run()
    return result, _trace_events(trace_dir)


def self_times(events: Iterable[dict]) -> dict[str, float]:
  """Seconds per event name, excluding time spent in events nested inside it on the same thread."""
  by_thread = collections.defaultdict(list)
  for event in events:
    by_thread[(event.get('pid'), event.get('tid'))].append(event)
  totals = collections.defaultdict(float)
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e['ts'], -e['dur']))
    stack, children = [], collections.defaultdict(float)
    for i, event in enumerate(thread_events):
      while stack and thread_events[stack[-1]]['ts'] + thread_events[stack[-1]]['dur'] <= event['ts']:
        stack.pop()
      if stack:
        children[stack[-1]] += event['dur']
      stack.append(i)
    for i, event in enumerate(thread_events):
      totals[event['name']] += (event['dur'] - children[i]) * 1e-6
  return totals


def classify(op_name: str, module: str) -> tuple[str, str]:
  """(component, phase) of one op from its op_name, e.g.
  'jit(train_step)/transpose(jvp(IACAModel))/cross_attention/layer_1/...' -> ('cross_attention', 'backward').
  """
  phase = 'backward' if 'transpose(' in op_name else 'forward' if 'jvp(' in op_name else 'update'
  match = re.search(re.escape(module) + r'\)*/(.*)$', op_name)
  # Module scopes below the model, without method-call scopes such as 'IACAModel.encode'.
  scopes = [p for p in match.group(1).split('/')[:-1] if '.' not in p and '(' not in p] if match else []
  if scopes and scopes[0] == 'encoders':
    component = '/'.join(scopes[:2])  # encoders/video_encoder, encoders/audio_encoder
  elif scopes:
    component = scopes[0]
  elif module in op_name:
    component = 'model: input L2-norm, stacking'  # top-level jnp ops of the model
  elif phase == 'update':
    component = 'optimizer, norms, finiteness check'
  else:
    component = 'loss'
  if re.search(r'/Dropout_\d+/|_bernoulli|_uniform|threefry|random_bits', op_name):
    component += ' [dropout]'
  return component, phase


def profile_steps(
  run_steps: Callable[[], Any], hlo_text: str, *, module: str = 'IACAModel', steps: int = 1
) -> dict:
  """Traces `run_steps()` (which runs `steps` steps and waits) and attributes op time to components.

  Returns {'rows': [(component, phase, seconds_per_step, share)], 'op_seconds_per_step', 'top_ops'}.
  Op time is summed over threads, so it can exceed the wall time when ops overlap.
  """
  names = op_names(hlo_text)
  _, events = traced(run_steps)
  totals = {name: t for name, t in self_times(events).items() if name in names}
  if not totals:
    return {
      'rows': [],
      'op_seconds_per_step': 0.0,
      'top_ops': [],
      'note': 'no per-op events in the trace (on a CPU set XLA_FLAGS=' + CPU_TRACE_FLAG + ')',
    }
  grouped = collections.defaultdict(float)
  for name, seconds in totals.items():
    grouped[classify(names[name], module)] += seconds / steps
  total = sum(grouped.values())
  rows = sorted(((c, p, s, s / total) for (c, p), s in grouped.items()), key=lambda r: -r[2])
  top = sorted(totals.items(), key=lambda kv: -kv[1])[:15]
  return {'rows': rows, 'op_seconds_per_step': total, 'top_ops': [(n, s / steps, names[n]) for n, s in top]}


# ---------------------------------------------------------------------------------------------


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A plain-text table: columns are (key, header, format)."""
  cells = [[header for _, header, _ in columns]]
  for row in rows:
    cells.append([('-' if row.get(key) is None else format(row[key], fmt)) for key, _, fmt in columns])
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to a temporary name beside `path`, then renames it: no half-written file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with open(temporary, 'w') as f:
      json.dump(obj, f, indent=1, default=lambda x: x.item() if hasattr(x, 'item') else str(x))
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def git_commit(folder: str) -> str:
  """The short commit of the checkout at `folder`."""
  import subprocess

  return subprocess.run(
    ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=folder
  ).stdout.strip()


def finish(result: dict, out: str) -> None:
  """Adds the load average and this checkout's commit to `result`, writes it to `out` and says so."""
  result['load_average_after'] = load_average()
  result['commit'] = git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  write_json(out, result)
  print(f'Wrote {out}')


def make_run(workdir: str, config) -> str:
  """A training workdir as train.py leaves it (config.json, an initial state as the best checkpoint)
  for predict.py: its speed and memory do not depend on the weights."""
  import optax

  from iaca_jax import predict_lib, train_lib
  from iaca_jax.kernel_choice import build_model
  from iaca_jax.models import IACAModel

  model = build_model(config.model)
  shapes = predict_lib.raw_inputs(predict_lib.model_sample_rate(config))
  if config.dataset.features_dir is not None:
    variables = jax.eval_shape(lambda r: model.init(r, shapes), jax.random.key(0))
    video_f, audio_f = jax.eval_shape(lambda v: model.apply(v, shapes, method=IACAModel.encode), variables)
    shapes = {'video_features': video_f, 'audio_features': audio_f}
  state = train_lib.init_state(model, shapes, jax.random.key(config.seed + 1), optax.adamw(1e-3))
  return predict_lib.write_run(workdir, config, state)
