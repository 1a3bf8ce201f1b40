"""What a run's compiled steps need on each chip, found by compiling them (nothing is allocated or run).

`compile_run(config, devices)` builds what `train.py` builds for those devices (`train_lib.create_trainer`:
the mesh, the model with the kernels for that platform, the state shardings and the jitted train and
eval steps), lowers the steps with abstract inputs of the config's shapes, compiles them, and reads
from each compiled program:
  memory       XLA's buffer assignment per chip: arguments, outputs, temporaries, generated code;
  flops        XLA's cost analysis of the per-chip program, beside the model's own count (the matrix
               products and convolutions of the step's jaxpr over the chips);
  collectives  every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute in
               the program text: kind, count, bytes, and the device groups each runs over;
  roofline     for a TPU chip of `iaca_jax.topology.CHIPS`: the time at its bf16 peak, at its HBM
               bandwidth (XLA's bytes accessed) and of the collectives over ICI; their maximum as
               the step-time bound and the MFU that bound allows.
These are compile-time estimates: see docs/SCALING.md for what makes a measured step differ.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.extend import core as jex_core

from iaca_jax import train_lib
from iaca_jax.data_source import nominal_input_shapes
from iaca_jax.input_pipeline import CLIPS
from iaca_jax.models.kernels import XLA
from iaca_jax.topology import GIB, Chip, chip_of

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
                'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}  # fmt: skip
_ARRAY = re.compile(r'\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64|c64|c128|f8\w*)\[([\d,]*)\]')
# `%name = <result shape> <op>(` for the synchronous ops and the `-done` half of asynchronous ones
# (whose result is the collective's result; the `-start` half also carries the operands).
_OP = re.compile(
  r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>'
  + '|'.join(COLLECTIVES)
  + r')(?P<suffix>-start|-done)?\('
)
_IOTA = r'\[[\d,]+\](?:<=\[[\d,]+\])?(?:T\([\d,]+\))?'
_MESH_GROUPS = r'mesh\[[^\]]*\](?:, device_ids=\((?:' + _IOTA + r'|[\d,\s]+)\))?\s*\{[^}]*\}'
_GROUPS = re.compile(r'replica_groups=(\{[\d,{}\s]*\}|' + _MESH_GROUPS + '|' + _IOTA + ')')


class CompileFailed(RuntimeError):
  """A step did not compile; `out_of_memory` when the chip's memory was the reason."""

  def __init__(self, message: str, out_of_memory: bool):
    super().__init__(message)
    self.out_of_memory = out_of_memory


def matmul_flops(jaxpr: Any) -> float:
  """FLOPs of the matrix products and convolutions of a (closed) jaxpr: 2 x output elements x
  contraction size, summed through sub-jaxprs (scan bodies x their length; a while body counts once).

  The usual numerator of MFU: XLA's cost analysis also counts elementwise and integer ops (e.g. a
  dropout mask's hash), which no matmul peak bounds.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = np.prod(eqn.outvars[0].aval.shape, dtype=float) if eqn.outvars else 0.0
    if name == 'dot_general':
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * out * np.prod([lhs[d] for d in lhs_contracting], dtype=float)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2.0 * out * np.prod(rhs, dtype=float) / out_features
    repeat = eqn.params.get('length', 1) if name == 'scan' else 1
    for sub in jex_core.jaxprs_in_params(eqn.params):
      total += repeat * matmul_flops(sub)
  return total


def cost(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of a compiled program: {'flops', 'bytes_accessed'} (empty if unsupported)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {}
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {
    name: float(analysis[key])
    for name, key in (('flops', 'flops'), ('bytes_accessed', 'bytes accessed'))
    if key in analysis
  }


def memory(compiled: Any) -> dict[str, int]:
  """XLA's buffer assignment per device, in bytes: arguments, outputs, aliased (donated) bytes,
  temporaries, generated code, and `total` = arguments + outputs - aliased + temporaries + code
  (empty if unsupported)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    stats = None
  if stats is None:
    return {}
  fields = ('argument', 'output', 'alias', 'temp', 'generated_code')
  out = {k: int(getattr(stats, f'{k}_size_in_bytes', 0) or 0) for k in fields}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp'] + out['generated_code']
  return out


def array_bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape, e.g. '(f32[256,512]{1,0}, bf16[8]{0})' -> 524,304."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    size = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += size * _DTYPE_BYTES.get(dtype, 1)
  return total


def _iota(text: str) -> np.ndarray:
  """An HLO iota list, '[4,2]<=[2,4]T(1,0)' or '[2,2]T(1,0)': arange reshaped to the dims after '<='
  (else to the shape), transposed, reshaped to the shape."""
  match = re.fullmatch(r'\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?', text.strip())
  if not match:
    raise ValueError(f'Unrecognised iota list {text!r}')
  numbers = lambda group: [int(i) for i in group.split(',')]
  shape = numbers(match.group(1))
  dims = numbers(match.group(2)) if match.group(2) else shape
  ids = np.arange(math.prod(dims)).reshape(dims)
  if match.group(3):
    ids = ids.transpose(numbers(match.group(3)))
  return ids.reshape(shape)


def replica_groups(text: str, num_devices: int) -> list[list[int]]:
  """The device groups of an HLO `replica_groups=` attribute: explicit ({{0,1},{2,3}}), iota
  ([2,4]<=[8], [4,2]<=[2,4]T(1,0)), over mesh axes (mesh['axis_0'=2,'axis_1'=2] {'axis_1'}: the
  devices that differ only along the named axes; device_ids=(...) orders the devices), or empty
  ({}: every device)."""
  text = text.strip()
  if text.startswith('mesh['):
    match = re.fullmatch(r'mesh\[([^\]]*)\](?:, device_ids=\(([^{]*)\))?\s*\{([^}]*)\}', text)
    if not match:
      raise ValueError(f'Unrecognised replica_groups {text!r}')
    axes = re.findall(r"'([^']+)'=(\d+)", match.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    order = match.group(2)
    if order is None:
      ids = np.arange(math.prod(sizes))
    elif order.strip().startswith('['):
      ids = _iota(order)
    else:
      ids = np.array([int(i) for i in order.split(',')])
    ids = ids.reshape(sizes)
    reduced = [names.index(a) for a in re.findall(r"'([^']+)'", match.group(3))]
    kept = [i for i in range(len(names)) if i not in reduced]
    size = math.prod(sizes[i] for i in reduced)
    return ids.transpose(kept + reduced).reshape(-1, size).tolist()
  if text.startswith('{'):
    groups = [[int(i) for i in g.split(',') if i.strip()] for g in re.findall(r'\{([\d,\s]*)\}', text[1:-1])]
    return [g for g in groups if g] or [list(range(num_devices))]
  return _iota(text).tolist()


def collectives(hlo_text: str, num_devices: int) -> list[dict[str, Any]]:
  """Every collective of a compiled module's text: {'kind', 'bytes' (its result), 'groups'}."""
  found = []
  pending_groups = {}  # a -start's groups, for its -done (which has none)
  for line in hlo_text.splitlines():
    match = _OP.match(line)
    if not match:
      continue
    groups = _GROUPS.search(line)
    if groups is None and 'replica_groups=' in line:  # a spelling this reader does not know: never guess
      raise ValueError(f'Unrecognised replica_groups in: {line.strip()[:300]}')
    name = line.split('=', 1)[0].strip().removeprefix('ROOT ').strip()
    if match.group('suffix') == '-start':
      pending_groups[name] = groups.group(1) if groups else '{}'
      continue
    if match.group('suffix') == '-done':
      operand = re.search(r'-done\(\s*(?:[^%]*\s)?(%[\w.\-]+)', line)
      text = pending_groups.get(operand.group(1) if operand else '', '{}')
    else:
      text = groups.group(1) if groups else '{}'
    kind = match.group('op')
    groups_list = [[0]] if kind == 'collective-permute' else replica_groups(text, num_devices)
    found.append(dict(kind=kind, bytes=array_bytes(match.group('shape')), groups=groups_list))
  return found


def collective_summary(found: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes', 'largest_group'}} of `collectives(...)`."""
  summary = {}
  for c in found:
    entry = summary.setdefault(c['kind'], dict(count=0, bytes=0, largest_group=0))
    entry['count'] += 1
    entry['bytes'] += c['bytes']
    entry['largest_group'] = max(entry['largest_group'], max(len(g) for g in c['groups']))
  return summary


def collective_seconds(found: Sequence[Mapping[str, Any]], ici_bytes_per_s: float) -> float:
  """Bandwidth time of the collectives over ICI (ring algorithms, n devices per group, b result
  bytes): all-reduce 2 (n-1)/n b, all-gather and all-to-all (n-1)/n b, reduce-scatter (n-1) b,
  collective-permute b. Latency and overlap with compute are left out."""
  total = 0.0
  for c in found:
    n, b = max(len(g) for g in c['groups']), c['bytes']
    factor = {
      'all-reduce': 2 * (n - 1) / n,
      'all-gather': (n - 1) / n,
      'all-to-all': (n - 1) / n,
      'reduce-scatter': n - 1,
      'collective-permute': 1.0,
    }[c['kind']]
    total += factor * b / ici_bytes_per_s
  return total


def roofline(per_chip: Mapping[str, Any], chip: Chip) -> dict[str, float]:
  """Step-time bounds of one chip's program from its counts and `chip`'s published rates."""
  compute_s = per_chip['xla_flops'] / chip.peak_bf16_flops_per_s
  memory_s = per_chip['bytes_accessed'] / chip.hbm_bytes_per_s
  ici_s = per_chip['collective_s']
  bound = max(compute_s, memory_s, ici_s)
  return dict(
    compute_s=compute_s,
    hbm_s=memory_s,
    ici_s=ici_s,
    step_s=bound,
    bound_by={compute_s: 'compute', memory_s: 'HBM bandwidth', ici_s: 'ICI'}[bound],
    mfu_bound=per_chip['model_flops'] / (chip.peak_bf16_flops_per_s * bound) if bound else 0.0,
  )


@dataclasses.dataclass
class CompiledStep:
  """One compiled step and what it needs per chip."""

  name: str
  compile_s: float
  memory: dict[str, int]
  xla_flops: float
  bytes_accessed: float
  model_flops: float  # the step's matmul and convolution FLOPs over the chips (per chip)
  collectives: list[dict[str, Any]]

  def summary(self, chip: Chip | None) -> dict[str, Any]:
    out = dict(
      compile_s=round(self.compile_s, 1),
      memory=self.memory,
      xla_flops=self.xla_flops,
      bytes_accessed=self.bytes_accessed,
      model_flops=self.model_flops,
      collectives=collective_summary(self.collectives),
    )
    if chip is not None:
      out['collective_s'] = collective_seconds(self.collectives, chip.ici_bytes_per_s)
      out['roofline'] = roofline(out, chip)
    return out


def abstract_inputs(config: ml_collections.ConfigDict, trainer: train_lib.Trainer) -> tuple[Any, dict, Any]:
  """(state, batch, rng) of the train step as shapes, dtypes and shardings: the global batch of the
  config (model inputs, labels (B, 16, 2), mask (B, 16)), the state placed as `train.py` places it."""
  shapes = nominal_input_shapes(config, trainer.model)
  batch_size = config.dataset.batch_size
  tx = train_lib.make_optimizer(config, steps_per_epoch=1)  # the schedule's numbers change no shape
  state = train_lib.abstract_train_state(config, trainer, shapes, tx)
  batch = dict(
    shapes,
    labels=jax.ShapeDtypeStruct((batch_size, CLIPS, 2), np.float32),
    mask=jax.ShapeDtypeStruct((batch_size, CLIPS), np.bool_),
  )
  batch = train_lib.abstract_like(batch, trainer.data_sharding)
  rng = train_lib.abstract_like(jax.eval_shape(lambda: train_lib.dropout_keys(config)), trainer.replicated)
  return state, batch, rng


def _compile(name: str, jitted: Any, args: tuple, num_devices: int) -> CompiledStep:
  start = time.perf_counter()
  traced = jitted.trace(*args)  # one trace: its jaxpr for the model's FLOPs, its lowering to compile
  lowered = traced.lower()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError: its text says why
    text = str(e)
    oom = 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower() or 'exceeds' in text.lower()
    raise CompileFailed(f'{name} step: {text.splitlines()[0] if text else type(e).__name__}', oom) from e
  elapsed = time.perf_counter() - start
  counts = cost(compiled)
  model_flops = matmul_flops(traced.jaxpr) / num_devices
  return CompiledStep(
    name=name,
    compile_s=elapsed,
    memory=memory(compiled),
    xla_flops=counts.get('flops', 0.0),
    bytes_accessed=counts.get('bytes_accessed', 0.0),
    model_flops=model_flops,
    collectives=collectives(compiled.as_text(), num_devices),
  )


def layout_description(trainer: train_lib.Trainer) -> str:
  shape = dict(trainer.mesh.shape)
  if 'replica' in shape:
    return (
      f'{trainer.replicas} replicas over {shape["replica"]} groups of {shape["data"]} chips '
      f'({trainer.replicas // shape["replica"]} per group, the batch sharded within each group)'
    )
  if trainer.replicas > 1:
    return f'{trainer.replicas} replicas on every chip, the batch sharded over {shape["data"]} chips'
  return f'data parallel: the batch sharded over {shape["data"]} chips, the state replicated'


def compile_run(
  config: ml_collections.ConfigDict, devices: Sequence[Any], steps: Sequence[str] = ('train', 'eval')
) -> dict[str, Any]:
  """Compiles the run's `steps` for `devices` (see the module docstring); returns the report.

  Raises CompileFailed when a step does not compile (out_of_memory when it cannot fit a chip).
  """
  trainer = train_lib.create_trainer(config, devices)
  state, batch, rng = abstract_inputs(config, trainer)
  num_devices = trainer.mesh.devices.size
  chip = chip_of(trainer.mesh.devices.flat)
  compiled = {}
  if 'train' in steps:
    compiled['train'] = _compile('train', trainer.train_step, (state, batch, rng), num_devices)
  if 'eval' in steps:
    inputs = {k: v for k, v in batch.items() if k not in ('labels', 'mask')}
    compiled['eval'] = _compile('eval', trainer.eval_step, (state.variables(), inputs), num_devices)
  data_size = trainer.mesh.shape['data']
  report = dict(
    devices=num_devices,
    hosts=len({d.process_index for d in trainer.mesh.devices.flat}),
    device_kind=trainer.mesh.devices.flat[0].device_kind,
    mesh=dict(trainer.mesh.shape),
    layout=layout_description(trainer),
    kernels='xla' if trainer.model.kernels == XLA else 'cpu',
    global_batch=config.dataset.batch_size,
    sequences_per_chip=config.dataset.batch_size / data_size,
    replicas=config.replicas.count,
    inputs='cached features' if config.dataset.features_dir is not None else 'raw frames',
    encoders='frozen' if config.model.freeze_encoders else 'trainable',
    dtype=config.model.dtype,
    steps={name: step.summary(chip) for name, step in compiled.items()},
  )
  if chip is not None:
    report['chip'] = dataclasses.asdict(chip)
    peak = max(step['memory']['total'] for step in report['steps'].values())
    report['fits'] = peak <= chip.hbm_bytes
    report['peak_bytes'] = peak
  return report


def find_batch(
  config: ml_collections.ConfigDict, devices: Sequence[Any], limit_per_chip: int = 4096, log=print
) -> tuple[int, list[tuple[int, bool, int | None]]]:
  """The largest global batch (a multiple of the chips that share one, each taking batch / that) whose
  train step compiles and fits a chip, found by doubling then bisecting the sequences per chip.

  Returns (batch or 0 if one sequence per chip does not fit, the trials (batch, fits, peak bytes)).
  """
  trainer = train_lib.create_trainer(config, devices)
  data_size = trainer.mesh.shape['data']
  chip = chip_of(trainer.mesh.devices.flat)
  trials = []

  def fits(per_chip: int) -> bool:
    trial = config.copy_and_resolve_references()
    trial.dataset.batch_size = per_chip * data_size
    try:
      report = compile_run(trial, devices, steps=('train',))
      peak = report['steps']['train']['memory']['total']
      ok = chip is None or peak <= chip.hbm_bytes
    except CompileFailed as e:
      if not e.out_of_memory:
        raise
      ok, peak = False, None
    trials.append((trial.dataset.batch_size, ok, peak))
    shown = f'{peak / GIB:.2f} GiB' if peak is not None else 'out of memory'
    log(
      f'  batch {trial.dataset.batch_size} ({per_chip} per chip): {shown}, {"fits" if ok else "does not fit"}'
    )
    return ok

  low, high = 0, 1
  while high <= limit_per_chip and fits(high):
    low, high = high, high * 2
  high = min(high, limit_per_chip + 1)
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low * data_size, trials
