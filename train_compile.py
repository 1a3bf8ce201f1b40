r"""Compiles the training run for a TPU slice this host does not have, and reports what each chip needs.

  python train_compile.py --config configs/tpu.py --topology=v5e:2x4 [--num_slices=2] [--find_batch] \
      [--report=report.json] [--config.key=value ...]

Builds what train.py builds (the same model, mesh, state shardings and jitted train and eval steps,
for the topology's devices instead of this host's), compiles the steps with abstract inputs of the
config's shapes (no data read, nothing allocated), and prints per chip: memory against the chip's HBM,
XLA's FLOPs beside the model's, the collectives, and a roofline step-time estimate. Needs libtpu
(pip install -e '.[tpu]'); runs on any CPU host. Exit status 1 when the run does not fit a chip.
--find_batch: the largest global batch that fits, found by compiling. docs/SCALING.md has the table.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the host compiles; libtpu only describes the slice

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from iaca_jax import cli, compile_report, runtime, topology  # noqa: E402
from iaca_jax.fileio import atomic_write  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_flag('configs/tpu.py', 'Training configuration.')
flags.DEFINE_string(
  'topology', None, 'TPU slice, e.g. v5e:2x4, v5e:16x16, v4:2x2x2, v5p:4x4x8.', required=True
)
flags.DEFINE_integer('num_slices', 1, 'Slices of that topology (multislice: the data axis spans them).')
flags.DEFINE_bool('find_batch', False, 'Find the largest global batch that fits, by compiling.')
flags.DEFINE_string('report', None, 'JSON report path (default: train_compile_<topology>.json).')


def describe(report: dict) -> str:
  """The report as a few lines of text."""
  gib = compile_report.GIB
  chip = report.get('chip')
  lines = [
    f'{report["devices"]} x {report["device_kind"]} on {report["hosts"]} host(s); {report["layout"]}',
    f'{report["inputs"]}, {report["encoders"]} encoders, {report["dtype"]}, {report["kernels"]} kernels, '
    f'global batch {report["global_batch"]} ({report["sequences_per_chip"]:g} sequences per chip)',
  ]
  for name, step in report['steps'].items():
    m = step['memory']
    lines.append(
      f'{name:5s} compile {step["compile_s"]:.0f} s | per chip: arguments {m["argument"] / gib:.2f} GiB, '
      f'outputs {m["output"] / gib:.2f} (aliased {m["alias"] / gib:.2f}), temporaries {m["temp"] / gib:.2f}, '
      f'code {m["generated_code"] / gib:.3f}, total {m["total"] / gib:.2f} GiB'
      + (f' of {chip["hbm_bytes"] / gib:.1f}' if chip else '')
    )
    kinds = ', '.join(
      f'{c["count"]} {kind} ({c["bytes"] / 2**20:.1f} MiB, groups of {c["largest_group"]})'
      for kind, c in step['collectives'].items()
    )
    lines.append(
      f'      {step["xla_flops"] / 1e12:.4f} TFLOP (XLA), {step["model_flops"] / 1e12:.4f} TFLOP (model matmuls), '
      f'{step["bytes_accessed"] / 1e9:.2f} GB accessed; collectives: {kinds or "none"}'
    )
    if 'roofline' in step:
      r = step['roofline']
      lines.append(
        f'      roofline: compute {r["compute_s"] * 1e3:.2f} ms, HBM {r["hbm_s"] * 1e3:.2f} ms, ICI '
        f'{r["ici_s"] * 1e3:.2f} ms -> >= {r["step_s"] * 1e3:.2f} ms a step, bound by {r["bound_by"]}, '
        f'MFU <= {r["mfu_bound"]:.1%}'
      )
  return '\n'.join(lines)


def not_fitting_line(report: dict) -> str:
  gib = compile_report.GIB
  chip = report['chip']
  over = report['peak_bytes'] - chip['hbm_bytes']
  return (
    f'does not fit: {report["peak_bytes"] / gib:.2f} GiB per chip needed, {chip["hbm_bytes"] / gib:.1f} GiB '
    f'of HBM on a {chip["generation"]} chip ({over / gib:.2f} GiB over); lower --config.dataset.batch_size '
    '(--find_batch finds the largest that fits)'
  )


def main(argv):
  runtime.configure_process()
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  name = FLAGS.topology + (f' x {FLAGS.num_slices} slices' if FLAGS.num_slices > 1 else '')
  devices = cli.run_reporting_user_errors(lambda: topology.topology_devices(FLAGS.topology, FLAGS.num_slices))
  path = FLAGS.report or f'train_compile_{FLAGS.topology.replace(":", "_")}.json'
  out = dict(topology=FLAGS.topology, num_slices=FLAGS.num_slices, config=config.to_dict())
  if FLAGS.find_batch:
    print(f'{name}: searching the largest batch that fits', flush=True)
    batch, trials = compile_report.find_batch(config, devices, log=lambda s: print(s, flush=True))
    out['find_batch'] = dict(largest_batch=batch, trials=trials)
    if not batch:
      atomic_write(path, json.dumps(out, indent=1))
      print(f'error: {name}: one sequence per chip does not fit (report: {path})', file=sys.stderr)
      sys.exit(1)
    print(f'largest global batch that fits: {batch}', flush=True)
    config = config.copy_and_resolve_references()
    config.dataset.batch_size = batch
    out['config'] = config.to_dict()
  try:
    report = cli.run_reporting_user_errors(lambda: compile_report.compile_run(config, devices))
  except compile_report.CompileFailed as e:
    out['error'] = str(e)
    atomic_write(path, json.dumps(out, indent=1))
    reason = 'does not fit a chip' if e.out_of_memory else 'does not compile'
    print(f'error: {name}: the run {reason}: {e} (report: {path})', file=sys.stderr)
    sys.exit(1)
  out.update(report)
  atomic_write(path, json.dumps(out, indent=1, default=float))
  print(f'{name}: {describe(report)}\nreport: {path}', flush=True)
  if report.get('fits') is False:
    print(f'error: {name}: {not_fitting_line(report)}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
