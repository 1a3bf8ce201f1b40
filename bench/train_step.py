r"""Benchmark of the train step: compile time, step time, sequences/s, FLOPs, FLOP/s and its share of
the measured matmul peak, memory; optionally where the time goes (a per-component profile).

    .venv/bin/python bench/train_step.py                     # CPU: fp32, fusion + demo + full_frozen, ~3 min
    .venv/bin/python bench/train_step.py --case=all --dtype=bf16   # + full_trainable, bf16
    .venv/bin/python bench/train_step.py --case=fusion --profile   # + per-component profile
    python bench/train_step.py --case=all --dtype=bf16 --batch=64  # on a GPU

docs/PERFORMANCE.md has the current figures. The case processes inherit the environment: the host
allocator is GLIBC_TUNABLES as given (`make bench` gives the Makefile's HOST_MALLOC), recorded in the
JSON; tools/cpu_diagnostics/host_allocator.py runs this script under other allocator settings.

Cases (the step is `iaca_jax.train_lib.Trainer.train_step`: jit, donated state, batch sharded on the
'data' mesh, AdamW; random inputs of the real shapes):
  fusion          the fusion model on precomputed features, paper size (configs/default.py):
                  (B, 16, 7, 7, 512) visual maps + (B, 16, 512) audio features; B = 64.
  full_frozen     the whole model with R(2+1)D-18 and ResNet-18 on raw clips (B, 16, 8, 112, 112, 3)
                  + log-mels (B, 16, 64, 104), encoders frozen (the paper); B = 64 on an accelerator,
                  2 on a CPU (a 64-sequence step is 1024 clips of 8 frames).
  full_trainable  the same with trainable encoders; B = 64 on an accelerator, 1 on a CPU (XLA's
                  buffer assignment needs 7 GB at B = 1, 12.7 GB at B = 2).
  demo            configs/synthetic_demo.py as `make demo` trains it (cached features, batch 16).
Every case runs in its own process (a clean peak memory, no JAX state shared) unless --noisolate.

Per case and dtype: trace+lower and compile seconds; the median wall time over `--steps` steps after
`--warmup` (each step waited for; the process CPU seconds per step too, since other jobs may share
the CPU); sequences/s; FLOPs per step, both from XLA's cost analysis of the compiled step (every op,
elementwise and integer ones included) and counted over the matrix products and convolutions of the
step's jaxpr (the MFU numerator); achieved FLOP/s and its share of the peak of a large matmul in the
same dtype measured in the same process (before and after the steps; the larger is used); XLA's
buffer assignment (arguments + outputs - donated + temporaries), the process's max RSS, and on
accelerators the device's peak bytes in use; that the state is donated and the host returns before
the step completes (dispatch time); the load average. `--profile` adds a `jax.profiler` trace of a
few more steps with the op time attributed to model components (encoders, BLSTMs, attention,
co-attention, optimizer), forward and backward.

Also reports whether the input pipeline keeps up: it reads bench/results/input_pipeline.json and
times the cached-feature reader on results/demo/features when that exists (`make demo` writes it).

Prints tables and writes bench/results/train_step_<backend>.json (or --out).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default, synthetic_demo  # noqa: E402
from iaca_jax import data_source, input_pipeline, kernel_choice, runtime, train_lib  # noqa: E402
from iaca_jax.models import IACAModel  # noqa: E402

CASES = ('fusion', 'demo', 'full_frozen', 'full_trainable')

flags.DEFINE_string(
  'case',
  'fusion,demo,full_frozen',
  f'Comma-separated cases among {CASES}, or "all". The default leaves out full_trainable, '
  'which adds 3-5 min on a 2-core CPU (40-80 s a step at batch 1).',
)
flags.DEFINE_string('dtype', 'fp32', 'Comma-separated compute dtypes among fp32, bf16, or "all".')
flags.DEFINE_integer('batch', 0, 'Global batch (sequences of 16 clips) for every case; 0 = per-case default.')
flags.DEFINE_integer('steps', 0, 'Timed steps; 0 = per-case default (fewer for the full model on a CPU).')
flags.DEFINE_integer('warmup', 0, 'Untimed steps after compiling; 0 = per-case default.')
flags.DEFINE_bool('profile', False, 'Per-component profile of each case from a jax.profiler trace.')
flags.DEFINE_integer('profile_steps', 2, 'Steps in the profiled trace.')
flags.DEFINE_bool('isolate', True, 'Run every case in its own process.')
flags.DEFINE_bool('input', True, 'Time the cached-feature reader (results/demo/features) and compare.')
flags.DEFINE_string('out', '', 'JSON result file; default bench/results/train_step_<backend>.json.')
flags.DEFINE_string('child_out', '', 'Internal: run one case and write its result here.')
FLAGS = flags.FLAGS

RESULTS = os.path.join(ROOT, 'bench', 'results')
INPUT_JSON = os.path.join(RESULTS, 'input_pipeline.json')
DEMO_FEATURES = os.path.join(ROOT, 'results', 'demo', 'features')
REQUIRED_INPUT_MARGIN = 5.0  # the pipeline must deliver this many times what the step consumes


def _split(value: str, allowed) -> list[str]:
  items = list(allowed) if value == 'all' else [v.strip() for v in value.split(',') if v.strip()]
  unknown = [v for v in items if v not in allowed]
  if unknown:
    raise app.UsageError(f'unknown {unknown}; expected some of {list(allowed)} or "all"')
  return items


# ---------------------------------------------------------------------------------------------
# One case (runs in a child process).


def case_settings(case: str, on_cpu: bool) -> dict:
  """Batch, timed steps and warm-up steps of a case unless the flags say otherwise."""
  if case == 'fusion':
    batch, steps, warmup = 64, 20, 2
  elif case == 'demo':
    batch, steps, warmup = 0, 30, 3  # 0: the config's batch
  elif case == 'full_frozen':
    batch, steps, warmup = (2, 3, 1) if on_cpu else (64, 20, 3)
  else:  # trainable: ~7 GB of activations per sequence on a CPU
    batch, steps, warmup = (1, 2, 1) if on_cpu else (64, 20, 3)
  if not on_cpu:
    steps, warmup = max(steps, 50 if case in ('fusion', 'demo') else 20), max(warmup, 3)
  return dict(batch=FLAGS.batch or batch, steps=FLAGS.steps or steps, warmup=FLAGS.warmup or warmup)


def case_config(case: str, dtype: str):

  config = (synthetic_demo if case == 'demo' else default).get_config()
  config.model.dtype = {'fp32': 'float32', 'bf16': 'bfloat16'}[dtype]
  if case.startswith('full'):
    config.model.freeze_encoders = case == 'full_frozen'
  return config


def synthetic_batch(case: str, config, model, batch: int):
  """Random host arrays of the shapes the input pipeline delivers for this case."""
  rng = np.random.default_rng(0)
  clips = 16
  raw = {'video': (batch, clips, 8, 112, 112, 3), 'audio': (batch, clips, 64, 104)}
  out = {
    'labels': rng.uniform(-1, 1, (batch, clips, 2)).astype(np.float32),
    'mask': np.ones((batch, clips), bool),
  }
  if case.startswith('full') or not (case == 'fusion' or config.dataset.features_dir is not None):
    shapes = raw
  else:  # the shapes the frozen encoders of this config would cache
    abstract = {k: jax.ShapeDtypeStruct((1,) + s[1:], np.float32) for k, s in raw.items()}
    video, audio = jax.eval_shape(
      lambda r, x: model.init_with_output(r, x, method=IACAModel.encode)[0], jax.random.key(0), abstract
    )
    shapes = {'video_features': (batch,) + video.shape[1:], 'audio_features': (batch,) + audio.shape[1:]}
  for key, shape in shapes.items():
    out[key] = rng.standard_normal(shape, dtype=np.float32)
  return out


def run_case(case: str, dtype: str) -> dict:
  on_cpu = jax.default_backend() == 'cpu'
  settings = case_settings(case, on_cpu)
  config = case_config(case, dtype)
  batch = settings['batch'] or config.dataset.batch_size
  result = dict(
    case=case,
    dtype=dtype,
    batch=batch,
    steps=settings['steps'],
    warmup=settings['warmup'],
    devices=jax.device_count(),
    load_before=common.load_average(),
    model={k: v for k, v in config.model.items()},
  )
  peak_before = common.matmul_peak(common.DTYPES[dtype])

  mesh = train_lib.create_mesh()
  model = kernel_choice.build_model(config.model, mesh.devices.flat)  # config.model.kernels
  trainer = train_lib.Trainer(model, mesh)
  tx = train_lib.make_optimizer(config, steps_per_epoch=1000)
  host_batch = synthetic_batch(case, config, model, batch)
  result['inputs'] = {k: list(v.shape) for k, v in host_batch.items()}
  start = time.perf_counter()
  state = trainer.replicate(train_lib.init_state(model, host_batch, jax.random.key(0), tx))
  common.block(state)
  result['init_s'] = time.perf_counter() - start
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  result['parameters'] = dict(trained=count(state.params), frozen=count(state.frozen_params))
  device_batch = trainer.shard_batch(host_batch)
  rng = jax.random.key(1)

  start = time.perf_counter()
  lowered = trainer.train_step.lower(state, device_batch, rng)
  result['trace_lower_s'] = time.perf_counter() - start
  result['matmul_flops'] = common.matmul_flops(jax.make_jaxpr(trainer.train_step)(state, device_batch, rng))
  start = time.perf_counter()
  compiled = lowered.compile()
  result['compile_s'] = time.perf_counter() - start
  result['flops'] = common.cost_flops(compiled)
  result['memory_analysis'] = common.memory(compiled)

  step = lambda carry: compiled(carry[0], device_batch, rng)
  # Donation: the old state's buffers are consumed, and the host returns before the step is done.
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  start = time.perf_counter()
  carry = compiled(state, device_batch, rng)
  dispatch_s = time.perf_counter() - start
  common.block(carry)
  result['first_step_s'] = time.perf_counter() - start
  result['donation'] = dict(
    state_bytes=state_bytes,
    aliased_bytes=result['memory_analysis'].get('alias'),
    old_state_deleted=all(x.is_deleted() for x in jax.tree.leaves(state)),
  )
  result['dispatch_s'] = dispatch_s
  del state
  warm_walls, _, carry = common.time_calls(step, carry, settings['warmup'] - 1)
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  walls, cpus, carry = common.time_calls(step, carry, settings['steps'])
  result['minor_faults_per_step'] = (
    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  ) / settings['steps']
  result['warmup_s'] = warm_walls
  result['step_s'] = walls
  result['finite'] = bool(jax.device_get(carry[1]['finite']))
  peak_after = common.matmul_peak(common.DTYPES[dtype])
  result['load_after'] = common.load_average()

  median = float(np.median(walls))
  peak = max(peak_before['flops_per_s'], peak_after['flops_per_s'])
  result.update(
    step_median_s=median,
    step_min_s=float(np.min(walls)),
    step_cpu_median_s=float(np.median(cpus)),
    sequences_per_s=batch / median,
    matmul_peak=[peak_before, peak_after],
    peak_flops_per_s=peak,
    max_rss_bytes=common.max_rss_bytes(),
    device_peak_bytes=common.device_peak_bytes(),
  )
  if result['flops']:
    result['flops_per_s'] = result['flops'] / median
    result['share_of_peak'] = result['flops_per_s'] / peak
  result['matmul_flops_per_s'] = result['matmul_flops'] / median
  result['matmul_share_of_peak'] = result['matmul_flops_per_s'] / peak

  if FLAGS.profile:

    def run_profiled():
      nonlocal carry
      _, _, carry = common.time_calls(step, carry, FLAGS.profile_steps)

    result['profile'] = common.profile_steps(run_profiled, compiled.as_text(), steps=FLAGS.profile_steps)
  return result


def run_input_check() -> dict:
  """Windows/s of the cached-feature reader on the demo's features (as train.py reads them)."""
  if not os.path.isdir(DEMO_FEATURES):
    return {'note': f'{DEMO_FEATURES} not found (make demo writes it); cached reader not timed'}

  config = synthetic_demo.get_config()
  config.dataset.features_dir = DEMO_FEATURES
  data = data_source.DataSource(config)
  batches = data.train_batches(epoch=0)
  iterator = iter(batches)
  first = next(iterator)
  bytes_per_window = sum(v[0].nbytes for k, v in first.items() if k in input_pipeline.CACHED_TRAIN_KEYS)
  start, windows, count = time.perf_counter(), 0, 0
  for epoch in range(3):  # the demo set is small: a few epochs for a stable number
    for batch in iterator if epoch == 0 else iter(data.train_batches(epoch=epoch)):
      windows += len(batch['labels'])
      count += 1
  seconds = time.perf_counter() - start
  return dict(
    windows=windows,
    batches=count,
    seconds=seconds,
    windows_per_s=windows / seconds,
    bytes_per_window=bytes_per_window,
    megabytes_per_s=windows * bytes_per_window / seconds / 2**20,
  )


def child_main() -> None:
  case, dtype = os.environ['IACA_BENCH_CASE'], os.environ['IACA_BENCH_DTYPE']

  if case == 'input':
    result = run_input_check()
  else:
    result = run_case(case, dtype)
  result['machine'] = dict(
    common.machine(),
    host_allocator=os.environ.get('GLIBC_TUNABLES', 'glibc defaults'),
    cpu_async_dispatch=bool(jax.config.values.get('jax_cpu_enable_async_dispatch', True)),
  )
  common.write_json(FLAGS.child_out, result)


# ---------------------------------------------------------------------------------------------
# The driver.


def run_child(case: str, dtype: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    env = dict(
      os.environ,
      IACA_BENCH_CASE=case,
      IACA_BENCH_DTYPE=dtype,
      TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'),
    )
    if FLAGS.profile and case != 'input':
      env['XLA_FLAGS'] = common.profile_flags(env.get('XLA_FLAGS', ''))
    argv = [sys.executable, os.path.abspath(__file__), f'--child_out={out}'] + [
      a for a in sys.argv[1:] if not a.startswith(('--child_out', '--out'))
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT)
    if proc.returncode != 0 or not os.path.exists(out):
      return dict(
        case=case, dtype=dtype, error=f'exit status {proc.returncode}', wall_s=time.perf_counter() - start
      )
    with open(out) as f:
      result = json.load(f)
    result['wall_s'] = time.perf_counter() - start
    return result


def _pipeline_verdict(results: list[dict], input_result: dict) -> list[dict]:
  """Does the input pipeline deliver >= 5x what each case consumes? (sequences = windows)"""
  measured = {}
  if os.path.exists(INPUT_JSON):
    with open(INPUT_JSON) as f:
      pipeline = json.load(f)
    measured['faces (JPEG decode + jitter), input_pipeline.json'] = pipeline.get('train', {}).get(
      'windows_per_s'
    )
  if input_result.get('windows_per_s'):
    measured['cached features, demo set'] = input_result['windows_per_s']
  rows = []
  for r in results:
    if 'sequences_per_s' not in r:
      continue
    if r['case'].startswith('full'):
      source = 'faces (JPEG decode + jitter), input_pipeline.json'
      supply = measured.get(source)
    elif r['case'] == 'demo':
      source = 'cached features, demo set'
      supply = measured.get(source)
    else:  # paper-size cached features: the demo reader's MB/s over the paper window's bytes
      source = 'cached features, paper size (from the demo reader MB/s)'
      supply = None
      if input_result.get('megabytes_per_s'):
        window = (
          sum(
            4 * int(__import__('numpy').prod(s[1:]))
            for k, s in r['inputs'].items()
            if k in ('video_features', 'audio_features', 'labels')
          )
          + 16
        )
        supply = input_result['megabytes_per_s'] * 2**20 / window
    need = r['sequences_per_s'] * REQUIRED_INPUT_MARGIN
    rows.append(
      dict(
        case=r['case'],
        dtype=r['dtype'],
        consumes=r['sequences_per_s'],
        source=source,
        supplies=supply,
        ratio=None if supply is None else supply / r['sequences_per_s'],
        keeps_up=None if supply is None else bool(supply >= need),
      )
    )
  return rows


RESULT_COLUMNS = [
  ('case', 'case', 's'),
  ('dtype', 'dtype', 's'),
  ('batch', 'batch', 'd'),
  ('compile_s', 'compile s', '.1f'),
  ('steps', 'steps', 'd'),
  ('step_ms', 'median ms', '.0f'),
  ('cpu_ms', 'cpu ms', '.0f'),
  ('sequences_per_s', 'seq/s', '.2f'),
  ('gflop', 'XLA GFLOP', '.1f'),
  ('mm_gflop', 'matmul GFLOP', '.1f'),
  ('gflops', 'GFLOP/s', '.1f'),
  ('peak_gflops', 'peak GFLOP/s', '.1f'),
  ('mm_share', '% peak', '.1f'),
  ('share', '% peak XLA', '.1f'),
  ('xla_gib', 'XLA mem GiB', '.2f'),
  ('rss_gib', 'max RSS GiB', '.2f'),
  ('dev_gib', 'dev peak GiB', '.2f'),
  ('faults', 'faults/step', '.0f'),
  ('load', 'load', 's'),
]


def _row(r: dict) -> dict:
  if 'error' in r:
    return dict(case=r['case'], dtype=r['dtype'], load=r['error'])
  gib = lambda b: None if b is None else b / 2**30
  return dict(
    case=r['case'],
    dtype=r['dtype'],
    batch=r['batch'],
    compile_s=r['trace_lower_s'] + r['compile_s'],
    steps=r['steps'],
    step_ms=1e3 * r['step_median_s'],
    cpu_ms=1e3 * r['step_cpu_median_s'],
    sequences_per_s=r['sequences_per_s'],
    gflop=(r['flops'] or 0) / 1e9,
    mm_gflop=r['matmul_flops'] / 1e9,
    gflops=r['matmul_flops_per_s'] / 1e9,
    peak_gflops=r['peak_flops_per_s'] / 1e9,
    mm_share=100 * r['matmul_share_of_peak'],
    share=100 * r.get('share_of_peak', 0),
    xla_gib=gib(r['memory_analysis'].get('peak_estimate')),
    rss_gib=gib(r['max_rss_bytes']),
    dev_gib=gib(r['device_peak_bytes']),
    faults=r.get('minor_faults_per_step'),
    load=f'{r["load_before"][0]:.1f}->{r["load_after"][0]:.1f}',
  )


def main(argv):
  del argv
  runtime.configure_process()  # as the entry points do, before any device is used
  if FLAGS.child_out:
    return child_main()
  cases, dtypes = _split(FLAGS.case, CASES), _split(FLAGS.dtype, ('fp32', 'bf16'))
  started = time.perf_counter()
  results = []
  for case in cases:
    for dtype in dtypes:
      print(f'--- {case} {dtype}', flush=True)
      if FLAGS.isolate:
        result = run_child(case, dtype)
      else:
        os.environ.update(IACA_BENCH_CASE=case, IACA_BENCH_DTYPE=dtype)
        result = dict(run_case(case, dtype), machine=common.machine())
      results.append(result)
      if 'error' not in result:
        print(
          f'    compile {result["trace_lower_s"] + result["compile_s"]:.1f} s, median step '
          f'{result["step_median_s"] * 1e3:.0f} ms over {result["steps"]}, '
          f'{100 * result["matmul_share_of_peak"]:.1f}% of the matmul peak (matmul FLOPs), '
          f'{100 * result.get("share_of_peak", 0):.1f}% (XLA FLOPs)',
          flush=True,
        )
  input_result = run_child('input', 'fp32') if FLAGS.input and FLAGS.isolate else {}

  machine = next((r['machine'] for r in results if 'machine' in r), {})
  print(
    f'\nMachine: {machine.get("backend")} {machine.get("devices")} ({machine.get("cpu")}, '
    f'{machine.get("cpu_count")} CPUs, {"/".join(machine.get("cpu_isa", [])) or "ISA unknown"}), '
    f'jax {machine.get("jax")}, {machine.get("host_allocator", "host allocator not recorded")}'
  )
  print(common.table([_row(r) for r in results], RESULT_COLUMNS))
  for r in results:
    profile = r.get('profile') or {}
    if profile.get('rows'):
      print(
        f'\nWhere the time goes: {r["case"]} {r["dtype"]} (op time summed over threads, '
        f'{profile["op_seconds_per_step"] * 1e3:.0f} ms per step)'
      )
      rows = [
        dict(component=c, phase=p, ms=1e3 * s, share=100 * f) for c, p, s, f in profile['rows'] if f >= 0.005
      ]
      print(
        common.table(
          rows,
          [
            ('component', 'component', 's'),
            ('phase', 'phase', 's'),
            ('ms', 'ms/step', '.1f'),
            ('share', '%', '.1f'),
          ],
        )
      )
    elif profile.get('note'):
      print(f'\nprofile {r["case"]} {r["dtype"]}: {profile["note"]}')
  verdict = _pipeline_verdict(results, input_result)
  if verdict:
    print(
      f'\nInput pipeline (must deliver >= {REQUIRED_INPUT_MARGIN:.0f}x what the step consumes; windows = sequences/s):'
    )
    print(
      common.table(
        verdict,
        [
          ('case', 'case', 's'),
          ('dtype', 'dtype', 's'),
          ('consumes', 'step seq/s', '.1f'),
          ('source', 'reader', 's'),
          ('supplies', 'reader windows/s', '.1f'),
          ('ratio', 'ratio', '.1f'),
          ('keeps_up', '>= 5x', ''),
        ],
      )
    )
  out = FLAGS.out or os.path.join(RESULTS, f'train_step_{machine.get("backend", "unknown")}.json')
  common.write_json(
    out,
    dict(
      command=' '.join(['python'] + sys.argv),
      machine=machine,
      results=results,
      input_reader=input_result,
      input_verdict=verdict,
      total_s=time.perf_counter() - started,
    ),
  )
  print(f'\nwrote {out} ({time.perf_counter() - started:.0f} s in all)')


if __name__ == '__main__':
  app.run(main)
