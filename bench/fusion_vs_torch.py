r"""The paper-size fusion train step against the PyTorch implementation, side by side.

    .venv/bin/python bench/fusion_vs_torch.py                 # 3 rounds (a round: ~2 min on 2 quiet cores)
    .venv/bin/python bench/fusion_vs_torch.py --rounds=3 --steps=8 --warmup=3   # as docs/PERFORMANCE.md quotes

Both sides train the same fusion model on cached features of the paper's shapes, fp32, batch 64
sequences of 16 clips, random weights and inputs, AdamW, dropout on:
  torch  `tests/torch_reference.FusionModel` (the authors' module structure and names: residual
         BLSTMs, audio-guided spatial attention, RJCA with 2 dense co-attention layers, stage-1
         gates, joint BLSTM, heads), a CCC loss, `torch.optim.AdamW`, torch threads = CPU cores;
  jax    `configs/default.py`'s model through `train_lib.Trainer.train_step` (jit, donated state),
         the step `train.py` runs. (It also has IACA's stage-2 gate: two (B, L, 2) softmaxes more.)
Each case runs in its own process, one after the other, alternating over `--rounds` rounds (the
order flips every round), so that both see the same machine load; ratios within a round are the
comparable figures on a shared machine. The settings are those a user gets from `make` and
`train.py`: GLIBC_TUNABLES = the Makefile's HOST_MALLOC unless the environment sets it, and
single-device CPU steps run inline (`iaca_jax.runtime.configure_process`; IACA_CPU_ASYNC_DISPATCH=1
to dispatch them asynchronously, as before 2026-12-02).

Per case and round: the median wall time of `--steps` steps after `--warmup` (each waited for), the
process CPU seconds per step, sequences/s, the matmul FLOPs of one step (the dots of the jaxpr of the
same JAX step with `config.model.kernels = 'xla'`, the plain formulation, for every case, so that the
CPU kernels' recomputation is not counted as work done; torch's `flop_counter` total is recorded too,
but it does not see the oneDNN LSTM), their rate as a share of the peak of a 2048^2 fp32 matmul
measured in the same process, with the same library (before and after the steps; the larger is
used), and minor page faults per step (`getrusage`). Per round: torch step / jax step, from the medians and from the
fastest steps. The second is the steadier figure on a machine whose speed comes in spells of a few
seconds (docs/PERFORMANCE.md, "Fusion step vs PyTorch"); both are printed with their medians over
the rounds. JSON: bench/results/fusion_vs_torch_<backend>.json (or --out).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [ROOT, BENCH]

import numpy as np  # noqa: E402

flags.DEFINE_integer('rounds', 3, 'Rounds; each runs both cases once, the order flipping every round.')
flags.DEFINE_integer('steps', 5, 'Timed steps per case and round.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after building (and compiling) the step.')
flags.DEFINE_integer('batch', 64, 'Sequences of 16 clips per step.')
flags.DEFINE_string('cases', 'torch,jax', 'Comma-separated cases among torch, jax (and jax_baseline).')
flags.DEFINE_string(
  'baseline_root',
  '',
  'A checkout of other code (e.g. `git archive <commit> | tar -x -C DIR`): adds the case jax_baseline, '
  'the same JAX step with that tree first on sys.path (its own dispatch setting).',
)
flags.DEFINE_string('out', '', 'JSON result file; default bench/results/fusion_vs_torch_<backend>.json.')
flags.DEFINE_string('child', '', 'Internal: run this case and write its result to --child_out.')
flags.DEFINE_string('child_out', '', 'Internal.')
FLAGS = flags.FLAGS

CLIPS, FEATURES, POSITIONS = 16, 512, 49
PEAK_N, PEAK_REPS = 2048, 7


def _faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(step, count: int) -> dict:
  """Runs `step()` (which waits for its result) `count` times: walls, CPU seconds, faults."""
  walls, cpus = [], []
  faults = _faults()
  for _ in range(count):
    start, cpu = time.perf_counter(), _cpu_seconds()
    step()
    walls.append(time.perf_counter() - start)
    cpus.append(_cpu_seconds() - cpu)
  return dict(
    step_s=walls,
    step_median_s=float(np.median(walls)),
    step_cpu_median_s=float(np.median(cpus)),
    minor_faults_per_step=(_faults() - faults) / count,
  )


def _inputs(batch: int) -> dict:
  rng = np.random.default_rng(0)
  return dict(
    video=rng.standard_normal((batch, CLIPS, 7, 7, FEATURES), dtype=np.float32),
    audio=rng.standard_normal((batch, CLIPS, FEATURES), dtype=np.float32),
    labels=rng.uniform(-1, 1, (batch, CLIPS, 2)).astype(np.float32),
  )


# ---------------------------------------------------------------------------------------------
# PyTorch.


def _torch_peak(torch) -> float:
  a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
  torch.mm(a, b)
  times = []
  for _ in range(PEAK_REPS):
    start = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - start)
  return 2 * PEAK_N**3 / float(np.median(times))


def _torch_ccc_loss(torch, pred, target):
  """(1 - CCC) summed over valence and arousal; population statistics over all clips."""
  pred, target = pred.reshape(-1, 2), target.reshape(-1, 2)
  mean_p, mean_t = pred.mean(0), target.mean(0)
  cov = ((pred - mean_p) * (target - mean_t)).mean(0)
  var_p, var_t = pred.var(0, unbiased=False), target.var(0, unbiased=False)
  ccc = 2 * cov / (var_p + var_t + (mean_p - mean_t) ** 2 + 1e-8)
  return (1 - ccc).sum()


def run_torch(batch: int) -> dict:
  import torch
  from torch.utils.flop_counter import FlopCounterMode

  from tests import torch_reference

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  peak_before = _torch_peak(torch)
  model = torch_reference.FusionModel(FEATURES, CLIPS, POSITIONS).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
  data = _inputs(batch)
  # The authors' channel-major view of the (7, 7, 512) map: (B, L, 512 * 49).
  video = torch.from_numpy(np.ascontiguousarray(data['video'].transpose(0, 1, 4, 2, 3))).reshape(
    batch, CLIPS, -1
  )
  audio, labels = torch.from_numpy(data['audio']), torch.from_numpy(data['labels'])

  def step():
    optimizer.zero_grad(set_to_none=True)
    valence, arousal = model(audio, video)
    loss = _torch_ccc_loss(torch, torch.stack([valence, arousal], -1), labels)
    loss.backward()
    optimizer.step()
    return loss

  with FlopCounterMode(display=False) as counter:
    step()
  flops = float(counter.get_total_flops())
  for _ in range(FLAGS.warmup - 1):
    step()
  result = _timed(step, FLAGS.steps)
  peak = max(peak_before, _torch_peak(torch))
  return dict(
    result,
    flop_counter_flops=flops,
    peak_flops_per_s=peak,
    torch=torch.__version__,
    threads=torch.get_num_threads(),
    parameters=sum(p.numel() for p in model.parameters()),
  )


# ---------------------------------------------------------------------------------------------
# JAX.


def _configure_like_train_py() -> None:
  """The process settings train.py makes before JAX starts (`iaca_jax.runtime.configure_process`), or
  what a --baseline_root from before that module made: its import set the NaN flag, and
  `cli.run_cpu_steps_inline` (where it exists) ran single-device CPU steps inline."""
  try:
    from iaca_jax import runtime
  except ImportError:
    from iaca_jax import cli

    if hasattr(cli, 'run_cpu_steps_inline'):
      cli.run_cpu_steps_inline()
    return
  runtime.configure_process()


def run_jax(batch: int) -> dict:
  if FLAGS.child == 'jax_baseline':
    sys.path.insert(0, FLAGS.baseline_root)
  _configure_like_train_py()
  import common
  import jax

  from configs import default
  from iaca_jax import train_lib

  try:
    from iaca_jax.kernel_choice import build_model  # config.model.kernels: 'auto' = the CPU kernels here
  except ImportError:  # a --baseline_root from before `config.model.kernels`
    from iaca_jax.models import build_model

  peak_before = common.matmul_peak(common.DTYPES['fp32'], PEAK_N, PEAK_REPS)['flops_per_s']
  config = default.get_config()
  model = build_model(config.model)
  trainer = train_lib.Trainer(model, train_lib.create_mesh())
  tx = train_lib.make_optimizer(config, steps_per_epoch=1000)
  data = _inputs(batch)
  host_batch = dict(
    video_features=data['video'],
    audio_features=data['audio'],
    labels=data['labels'],
    mask=np.ones((batch, CLIPS), bool),
  )
  state = trainer.replicate(train_lib.init_state(model, host_batch, jax.random.key(0), tx))
  device_batch = trainer.shard_batch(host_batch)
  rng = jax.random.key(1)
  flops = common.matmul_flops(jax.make_jaxpr(trainer.train_step)(state, device_batch, rng))
  model_flops, plain = flops, None
  if config.model.get('kernels', 'xla') != 'xla':  # the CPU co-attention's backward recomputes products
    plain = dict(config.model, kernels='xla')
  elif config.model.get('blocked_coattention'):  # a --baseline_root from before `config.model.kernels`
    plain = dict(config.model, blocked_coattention=False)
  if plain:
    plain_step = train_lib.Trainer(build_model(plain), trainer.mesh).train_step
    model_flops = common.matmul_flops(jax.make_jaxpr(plain_step)(state, device_batch, rng))
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, device_batch, rng).compile()
  compile_s = time.perf_counter() - start
  carry = [state]

  def step():
    carry[0], metrics = compiled(carry[0], device_batch, rng)
    jax.block_until_ready((carry[0], metrics))

  for _ in range(FLAGS.warmup):
    step()
  result = _timed(step, FLAGS.steps)
  peak = max(peak_before, common.matmul_peak(common.DTYPES['fp32'], PEAK_N, PEAK_REPS)['flops_per_s'])
  return dict(
    result,
    matmul_flops=model_flops,
    executed_matmul_flops=flops,
    peak_flops_per_s=peak,
    compile_s=compile_s,
    jax=jax.__version__,
    temp_bytes=common.memory(compiled).get('temp'),
    cpu_async_dispatch=bool(jax.config.values.get('jax_cpu_enable_async_dispatch', True)),
    code=os.path.dirname(os.path.abspath(train_lib.__file__)),  # the iaca_jax/ timed
  )


# ---------------------------------------------------------------------------------------------
# The driver.


def makefile_host_malloc() -> str:
  """The Makefile's HOST_MALLOC default (the glibc tunables `make` runs everything under)."""
  with open(os.path.join(ROOT, 'Makefile')) as f:
    for line in f:
      if line.startswith('HOST_MALLOC ?= '):
        return line.split('?=', 1)[1].strip()
  raise RuntimeError('no HOST_MALLOC in the Makefile')


def run_child(case: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
    env.setdefault('GLIBC_TUNABLES', makefile_host_malloc())  # what `make` gives
    argv = [sys.executable, os.path.abspath(__file__), f'--child={case}', f'--child_out={out}']
    argv += [f'--{name}={getattr(FLAGS, name)}' for name in ('steps', 'warmup', 'batch', 'baseline_root')]
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT)
    if proc.returncode != 0 or not os.path.exists(out):
      return dict(case=case, error=f'exit status {proc.returncode}')
    with open(out) as f:
      result = json.load(f)
  result['process_s'] = time.perf_counter() - start
  return result


def _median_step(result: dict) -> float | None:
  return result.get('step_median_s')


def _fastest_step(result: dict) -> float | None:
  return min(result.get('step_s') or [0]) or None


def _step_ratio(results: dict, over: str, case: str, statistic=_median_step) -> float | None:
  """`over`'s step time over `case`'s in one round's results, by `statistic` of each case's steps."""
  over_step, case_step = (statistic(results.get(c, {})) for c in (over, case))
  return over_step / case_step if over_step and case_step and case != over else None


def _summary(result: dict, matmul_flops: float | None) -> dict:
  """Adds sequences/s and the share of the process's matmul peak. Both sides are charged the matmul
  FLOPs of the JAX step's jaxpr (the same model; torch's flop counter misses its oneDNN LSTM)."""
  if 'error' in result:
    return result
  median = result['step_median_s']
  result = dict(result, sequences_per_s=result['batch'] / median)
  result.setdefault('matmul_flops', matmul_flops)
  if result['matmul_flops']:
    result['matmul_share_of_peak'] = result['matmul_flops'] / median / result['peak_flops_per_s']
  return result


def child_main() -> None:
  # No `common` here: it imports JAX, which the torch case should not load.
  load = lambda: [round(x, 2) for x in os.getloadavg()]
  load_before = load()
  run = {'torch': run_torch, 'jax': run_jax, 'jax_baseline': run_jax}[FLAGS.child]
  result = dict(run(FLAGS.batch), case=FLAGS.child, batch=FLAGS.batch, load_before=load_before)
  result.update(load_after=load(), max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  result['host_allocator'] = os.environ.get('GLIBC_TUNABLES', 'glibc defaults')
  with open(FLAGS.child_out, 'w') as f:
    json.dump(result, f)


def main(argv):
  del argv
  if FLAGS.child:
    return child_main()
  import common

  cases = [c.strip() for c in FLAGS.cases.split(',') if c.strip()]
  if FLAGS.baseline_root and 'jax_baseline' not in cases:
    cases.append('jax_baseline')
  if not cases or any(c not in ('torch', 'jax', 'jax_baseline') for c in cases):
    raise app.UsageError(f'--cases: some of torch, jax, jax_baseline; got {FLAGS.cases!r}')
  if 'jax_baseline' in cases and not os.path.isdir(os.path.join(FLAGS.baseline_root, 'iaca_jax')):
    raise app.UsageError(f'--baseline_root={FLAGS.baseline_root!r} holds no iaca_jax/')
  started = time.perf_counter()
  rounds = []
  for index in range(FLAGS.rounds):
    order = cases if index % 2 == 0 else cases[::-1]
    results = {}
    for case in order:
      print(f'--- round {index + 1}: {case}', flush=True)
      results[case] = run_child(case)
      if 'error' in results[case]:
        print(f'    {results[case]["error"]}', flush=True)
    flops = results.get('jax', {}).get('matmul_flops') or next(
      (r['results']['jax'].get('matmul_flops') for r in rounds if 'jax' in r['results']), None
    )
    for case in order:
      results[case] = r = _summary(results[case], flops)
      if 'error' in r:
        continue
      print(
        f'    median step {r["step_median_s"]:.2f} s ({r["step_cpu_median_s"]:.2f} CPU s), '
        f'{r["sequences_per_s"]:.1f} seq/s, {100 * r.get("matmul_share_of_peak", 0):.1f}% of '
        f'{r["peak_flops_per_s"] / 1e9:.0f} GFLOP/s, '
        f'{r["minor_faults_per_step"]:,.0f} faults/step, load {r["load_before"][0]}->{r["load_after"][0]}',
        flush=True,
      )
    ratio = _step_ratio(results, 'torch', 'jax')
    ratio_fastest = _step_ratio(results, 'torch', 'jax', _fastest_step)
    baseline = _step_ratio(results, 'jax_baseline', 'jax')
    rounds.append(
      dict(
        round=index + 1,
        order=order,
        results=results,
        torch_over_jax=ratio,
        torch_over_jax_fastest=ratio_fastest,
        baseline_over_jax=baseline,
      )
    )
    if ratio:
      print(
        f'    round {index + 1}: torch / jax step time = {ratio:.2f} ({ratio_fastest:.2f} fastest steps)',
        flush=True,
      )
    if baseline:
      print(f'    round {index + 1}: jax_baseline / jax step time = {baseline:.2f}', flush=True)

  rows = []
  for r in rounds:
    for case, res in r['results'].items():
      if 'error' in res:
        rows.append(dict(round=r['round'], case=case, load=res['error']))
        continue
      rows.append(
        dict(
          round=r['round'],
          case=case,
          step=res['step_median_s'],
          cpu=res['step_cpu_median_s'],
          seqs=res['sequences_per_s'],
          gflop=(res['matmul_flops'] or 0) / 1e9,
          peak=res['peak_flops_per_s'] / 1e9,
          share=100 * res.get('matmul_share_of_peak', 0),
          faults=res['minor_faults_per_step'],
          ratio=_step_ratio(r['results'], 'torch', case),
          fastest=_fastest_step(res),
          ratio_fastest=_step_ratio(r['results'], 'torch', case, _fastest_step),
          load=f'{res["load_before"][0]:.1f}->{res["load_after"][0]:.1f}',
        )
      )
  machine = common.machine()
  print(
    f'\n{machine["cpu"]}, {machine["cpu_count"]} CPUs ({"/".join(machine["cpu_isa"])}), '
    f'host allocator: {os.environ.get("GLIBC_TUNABLES", makefile_host_malloc())}'
  )
  print(
    common.table(
      rows,
      [
        ('round', 'round', 'd'),
        ('case', 'case', 's'),
        ('step', 'median step s', '.2f'),
        ('cpu', 'CPU s/step', '.2f'),
        ('seqs', 'seq/s', '.1f'),
        ('gflop', 'matmul GFLOP', '.1f'),
        ('peak', 'peak GFLOP/s', '.0f'),
        ('share', '% of peak', '.1f'),
        ('faults', 'faults/step', ',.0f'),
        ('ratio', 'torch/this', '.2f'),
        ('fastest', 'fastest step s', '.2f'),
        ('ratio_fastest', 'torch/this fastest', '.2f'),
        ('load', 'load', 's'),
      ],
    )
  )
  for key, what in (('torch_over_jax', 'median steps'), ('torch_over_jax_fastest', 'fastest steps')):
    ratios = [r[key] for r in rounds if r[key]]
    if ratios:
      print(
        f'torch / jax over {len(ratios)} rounds, from the {what}: median {statistics.median(ratios):.2f} '
        f'({min(ratios):.2f}-{max(ratios):.2f})'
      )
  out = FLAGS.out or os.path.join(BENCH, 'results', f'fusion_vs_torch_{machine["backend"]}.json')
  common.write_json(
    out,
    dict(
      command=' '.join(['python'] + sys.argv),
      machine=dict(machine, host_allocator=os.environ.get('GLIBC_TUNABLES', makefile_host_malloc())),
      rounds=rounds,
      torch_over_jax=[r['torch_over_jax'] for r in rounds],
      torch_over_jax_fastest=[r['torch_over_jax_fastest'] for r in rounds],
      baseline_over_jax=[r['baseline_over_jax'] for r in rounds],
      total_s=time.perf_counter() - started,
    ),
  )
  print(f'\nwrote {out} ({time.perf_counter() - started:.0f} s in all)')


if __name__ == '__main__':
  app.run(main)
