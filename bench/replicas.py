r"""Cost of K replicas in one step (`config.replicas.count`), against one plain step measured in the same run.

    .venv/bin/python bench/replicas.py                          # demo + fusion, K = 1, 2, 4, 8 (CPU)
    .venv/bin/python bench/replicas.py --case=demo --replicas=1,8 --steps=10
    .venv/bin/python bench/replicas.py --wall --wall_replicas=5   # + whole trainings: K-replica run vs K runs
    .venv/bin/python bench/replicas.py --case= --wall --wall_results_dir=results/demo   # only those, on the demo
    python bench/replicas.py --case=fusion --batch=64             # on a GPU

Step cases (random inputs of the real shapes, AdamW, the state donated as in training):
  demo     configs/synthetic_demo.py (cached features, batch 16);
  fusion   the paper-size fusion model on cached features (configs/default.py, batch 64 on a CPU too).
Per case: the plain step (`Trainer(model, mesh)`, no vmap) and the K-replica step for each K, timed
in turns (plain, K1, K2, ... repeated `--rounds` times, the median of each) so that a change in the
machine's load hits every variant alike; the ratios `replica step / plain step` and
`replica step / (K x plain step)` (the per-replica cost; < 1 means replicas are cheaper than runs).

`--wall`: whole trainings, each `train.py` in its own process as a user runs them: one with K
replicas, then K with one replica each (`replicas.first` = r), wall seconds of each; on the demo's
set with `--wall_results_dir=results/demo` (after `make demo`), else on the tiny set.

Writes bench/results/replicas_<backend>.json (or --out).
"""

from __future__ import annotations

import functools
import json
import os
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
from iaca_jax import kernel_choice, runtime, train_lib  # noqa: E402
from iaca_jax.models import IACAModel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('case', ['demo', 'fusion'], 'Step cases: demo, fusion.')
flags.DEFINE_list('replicas', ['1', '2', '4', '8'], 'Replica counts K.')
flags.DEFINE_integer('steps', 5, 'Timed steps per variant and round.')
flags.DEFINE_integer('rounds', 3, 'Rounds of (plain, K...) timings.')
flags.DEFINE_integer('batch', 0, 'Global batch (0: 16 for demo, 64 for fusion).')
flags.DEFINE_bool('wall', False, 'Also time whole trainings: one K-replica run vs K one-replica runs.')
flags.DEFINE_integer('wall_replicas', 5, 'K of the whole-training comparison.')
flags.DEFINE_string('data_dir', '', 'Tiny synthetic set for --wall (default: a temporary folder).')
flags.DEFINE_string('wall_results_dir', '', '--wall on the demo: the results_dir of a finished make demo.')
flags.DEFINE_string('out', '', 'Output JSON (default bench/results/replicas_<backend>.json).')


def synthetic_batch(model, batch: int) -> dict:
  """Random cached-feature inputs of the shapes the model's frozen encoders would cache (as in
  bench/train_step.py, whose flags cannot be imported alongside these)."""
  rng = np.random.default_rng(0)
  raw = {'video': (1, 16, 8, 112, 112, 3), 'audio': (1, 16, 64, 104)}
  abstract = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in raw.items()}
  video, audio = jax.eval_shape(
    lambda r, x: model.init_with_output(r, x, method=IACAModel.encode)[0], jax.random.key(0), abstract
  )
  return {
    'labels': rng.uniform(-1, 1, (batch, 16, 2)).astype(np.float32),
    'mask': np.ones((batch, 16), bool),
    'video_features': rng.standard_normal((batch,) + video.shape[1:], dtype=np.float32),
    'audio_features': rng.standard_normal((batch,) + audio.shape[1:], dtype=np.float32),
  }


def case_config(case: str, replicas: int):
  config = (synthetic_demo if case == 'demo' else default).get_config()
  config.replicas.count = replicas
  return config


def compiled_step(case: str, replicas: int, host_batch: dict | None, vmapped: bool):
  """(compiled step, state, device batch, rngs, host batch, compile seconds) of one variant; `vmapped`
  with one replica: the replica step at K = 1 (what the vmap itself costs)."""
  config = case_config(case, replicas)
  mesh = train_lib.create_mesh()
  model = kernel_choice.build_model(config.model, mesh.devices.flat)  # config.model.kernels
  trainer = train_lib.Trainer(model, mesh, replicas)
  if host_batch is None:
    host_batch = synthetic_batch(model, FLAGS.batch or (16 if case == 'demo' else 64))
  tx = train_lib.make_optimizer(config, steps_per_epoch=1000)
  if vmapped and replicas == 1:
    step = functools.partial(train_lib.train_step, model=model)
    step = train_lib.replicas_lib.vmap_train_step(step, stats_per_replica=not model.freeze_encoders)
    trainer.train_step = jax.jit(step, donate_argnums=(0,))
    keys = jax.random.key(0)[None]
    state, rngs = train_lib.init_replica_state(model, host_batch, keys, tx), jax.random.key(1)[None]
  else:
    state = train_lib.fresh_state(config, model, host_batch, tx)
    rngs = train_lib.dropout_keys(config)
  state, rngs = trainer.replicate(state), trainer.replicate(rngs)
  device_batch = trainer.shard_batch(host_batch)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, device_batch, rngs).compile()
  return compiled, state, device_batch, rngs, host_batch, time.perf_counter() - start


def run_case(case: str) -> dict:
  counts = [int(k) for k in FLAGS.replicas]
  variants, host_batch = {}, None
  for name, k in [('plain', 1)] + [(f'K{k}', k) for k in counts]:
    compiled, state, device_batch, rngs, host_batch, compile_s = compiled_step(
      case, k, host_batch, name != 'plain'
    )
    carry = common.block(compiled(state, device_batch, rngs))
    variants[name] = dict(replicas=k, compile_s=compile_s, call=compiled, carry=carry, rngs=rngs, walls=[])
    variants[name]['batch'] = device_batch
  for _ in range(FLAGS.rounds):
    for v in variants.values():
      step = lambda carry, v=v: v['call'](carry[0], v['batch'], v['rngs'])
      walls, _, v['carry'] = common.time_calls(step, v['carry'], FLAGS.steps)
      v['walls'] += walls
  plain = float(np.median(variants['plain']['walls']))
  rows = []
  for name, v in variants.items():
    median = float(np.median(v['walls']))
    rows.append(
      dict(
        variant=name,
        replicas=v['replicas'],
        compile_s=v['compile_s'],
        step_median_s=median,
        ratio_to_plain=median / plain,
        per_replica_ratio=median / (v['replicas'] * plain),
        walls=v['walls'],
      )
    )
  return dict(case=case, batch=int(next(iter(variants.values()))['batch']['labels'].shape[0]), rows=rows)


def _train_process(args: list[str], workdir: str) -> float:
  """Wall seconds of one `train.py` process, as a user starts it (its own compile and input)."""
  start = time.perf_counter()
  subprocess.run(
    [sys.executable, os.path.join(ROOT, 'train.py'), '--workdir', workdir, *args],
    cwd=ROOT,
    check=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  return time.perf_counter() - start


def wall_times(k: int) -> dict:
  """Whole trainings, each `train.py` in its own process: one K-replica run against K one-replica
  runs one after another (`replicas.first` = r), on the demo's data (`--wall_results_dir`, from
  `make demo`) or on the tiny set (generated into --data_dir when absent)."""
  if FLAGS.wall_results_dir:
    results = os.path.abspath(FLAGS.wall_results_dir)
    args = ['--config', 'configs/synthetic_demo.py', f'--config.dataset.data_dir={results}/tfds']
    args.append(f'--config.dataset.features_dir={results}/features')
    described = 'configs/synthetic_demo.py on the make demo set (cached features)'
  else:
    from data import build  # noqa: PLC0415 - only --wall needs the data tools
    from data.synthetic_av import generate  # noqa: PLC0415

    root = FLAGS.data_dir or os.path.join(tempfile.gettempdir(), 'iaca_bench_replicas')
    if not os.path.isdir(os.path.join(root, 'tfds')):
      generate.generate(os.path.join(root, 'raw'), generate.SIZES['tiny'], seed=0)
      build.build('synthetic_av', os.path.join(root, 'raw'), os.path.join(root, 'tfds'), num_shards=3)
    args = ['--config', 'configs/tiny.py', f'--config.dataset.data_dir={root}/tfds']
    args.append('--config.training.num_epochs=2')
    described = 'configs/tiny.py (raw inputs, 2 epochs)'
  with tempfile.TemporaryDirectory() as work:
    together = _train_process([*args, f'--config.replicas.count={k}'], os.path.join(work, 'together'))
    alone = [
      _train_process([*args, f'--config.replicas.first={r}'], os.path.join(work, f'alone{r}'))
      for r in range(k)
    ]
  return dict(
    replicas=k,
    config=described,
    together_s=together,
    apart_s=sum(alone),
    each_apart_s=alone,
    apart_over_together=sum(alone) / together,
  )


def main(argv):
  del argv
  runtime.configure_process()  # as train.py does, before any device is used
  result = dict(machine=common.machine(), load_before=common.load_average(), cases=[])
  for case in FLAGS.case:
    result['cases'].append(run_case(case))
    for row in result['cases'][-1]['rows']:
      print(
        f'{case:7s} {row["variant"]:6s} step {1e3 * row["step_median_s"]:8.1f} ms  '
        f'x plain {row["ratio_to_plain"]:5.2f}  per replica {row["per_replica_ratio"]:5.2f}  '
        f'compile {row["compile_s"]:.1f} s',
        flush=True,
      )
  if FLAGS.wall:
    result['wall'] = wall_times(FLAGS.wall_replicas)
    print(json.dumps(result['wall']))
  result['load_after'] = common.load_average()
  out = FLAGS.out or os.path.join(ROOT, 'bench', 'results', f'replicas_{jax.default_backend()}.json')
  with open(out + '.tmp', 'w') as f:
    json.dump(result, f, indent=1)
  os.replace(out + '.tmp', out)
  print('Wrote', out)


if __name__ == '__main__':
  app.run(main)
