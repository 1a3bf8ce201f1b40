r"""Variants of a train step compiled in one process, their steps alternated: the comparison of two
model settings that a shared machine disturbs least. Its speed comes in spells of a few seconds
(`spells.py`), so steps of separate processes, or minutes apart, differ by 20-30% with no change at
all; alternated steps share the spells.

    .venv/bin/python tools/cpu_diagnostics/step_ab.py --variant=xla:kernels=xla
    .venv/bin/python tools/cpu_diagnostics/step_ab.py --case=demo --variant=xla:kernels=xla --rounds=20

A variant is `name:key=value,key=value` over `config.model` fields; the first variant is always the
case's configuration as it is (`default`). Each round runs one step of every variant, in an order
that flips every round. Per variant: the median and fastest wall time of a step and the median
process CPU time; per round, each variant's step time over the default's, and the median of those
ratios. Changes of code, rather than of settings, need a switch in a config field (or a module
attribute patched in a copy of this script) to be compared this way. JSON:
tools/cpu_diagnostics/results/step_ab.json (or --out).
"""

from __future__ import annotations

import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'bench'), HERE]

import common  # noqa: E402 (bench/common.py)
import common_diag  # noqa: E402
import train_step as cases  # noqa: E402 (bench/train_step.py: its case config; registers the flags used below)
from absl import app, flags  # noqa: E402

from iaca_jax import runtime  # noqa: E402

# --case, --warmup and --out are bench/train_step.py's flags (one case here; fusion by default).
flags.DEFINE_multi_string('variant', [], 'name:key=value,... over config.model fields; repeatable.')
flags.DEFINE_integer('rounds', 12, 'Alternated rounds (one step of every variant each).')
FLAGS = flags.FLAGS


def parse_variant(text: str, model_config) -> tuple[str, dict]:
  """'name:key=value,...' -> (name, overrides), each value of the type of the field it replaces."""
  name, _, settings = text.partition(':')
  if not name or not settings:
    raise app.UsageError(f'--variant takes name:key=value,...; got {text!r}')
  overrides = {}
  for item in settings.split(','):
    key, sep, value = item.partition('=')
    if not sep or key not in model_config:
      raise app.UsageError(f'--variant {name}: {item!r} is not key=value over config.model fields')
    like = model_config[key]
    if isinstance(like, bool):
      if value.lower() not in ('true', 'false'):
        raise app.UsageError(f'--variant {name}: {key} takes true or false; got {value!r}')
      overrides[key] = value.lower() == 'true'
    else:
      overrides[key] = type(like)(value)
  return name, overrides


def main(argv) -> None:
  del argv
  runtime.configure_process()  # as the entry points do, before any device is used
  case = common_diag.single_case()
  if not FLAGS.variant:
    raise app.UsageError('give at least one --variant=name:key=value,...')
  model_config = cases.case_config(case, 'fp32').model
  variants = [('default', {})] + [parse_variant(v, model_config) for v in FLAGS.variant]
  steps = {}
  for name, overrides in variants:
    compiled, state, batch, rng, settings = common_diag.compiled_case(case, 'fp32', overrides)
    step = lambda carry, compiled=compiled, batch=batch, rng=rng: compiled(carry[0], batch, rng)
    _, _, carry = common.time_calls(step, (state, None), settings['warmup'])
    steps[name] = dict(step=step, carry=carry, wall=[], cpu=[])
    print(f'{name}: compiled {overrides or "(the case as configured)"}', flush=True)

  load_before = common.load_average()
  names = [name for name, _ in variants]
  for index in range(FLAGS.rounds):
    for name in names if index % 2 == 0 else names[::-1]:
      run = steps[name]
      wall, cpu, run['carry'] = common.time_calls(run['step'], run['carry'], 1)
      run['wall'] += wall
      run['cpu'] += cpu

  base = steps['default']['wall']
  rows, results = [], {}
  for name, overrides in variants:
    wall, cpu = steps[name]['wall'], steps[name]['cpu']
    ratios = [w / b for w, b in zip(wall, base)]
    results[name] = dict(overrides=overrides, step_s=wall, cpu_s=cpu, over_default=ratios)
    rows.append(
      dict(
        variant=name,
        median=1e3 * statistics.median(wall),
        fastest=1e3 * min(wall),
        cpu=1e3 * statistics.median(cpu),
        ratio=statistics.median(ratios),
        spread=f'{min(ratios):.3f}-{max(ratios):.3f}',
      )
    )
  print(f'\n{case}, {FLAGS.rounds} alternated rounds, load {load_before} -> {common.load_average()}')
  print(
    common.table(
      rows,
      [
        ('variant', 'variant', 's'),
        ('median', 'median step ms', '.0f'),
        ('fastest', 'fastest ms', '.0f'),
        ('cpu', 'CPU ms', '.0f'),
        ('ratio', 'step / default (median of rounds)', '.3f'),
        ('spread', 'range over rounds', 's'),
      ],
    )
  )
  common_diag.write_run(
    FLAGS.out,
    'step_ab.json',
    case=case,
    rounds=FLAGS.rounds,
    load_before=load_before,
    load_after=common.load_average(),
    variants=results,
  )


if __name__ == '__main__':
  app.run(main)
