"""train_compile.py and iaca_jax.compile_report: the tiny run compiled for a TPU slice (libtpu, no TPU)
in both layouts, the reading of compiled programs checked against hand counts and a CPU program, and
the rows each process feeds on a multi-host mesh."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny as tiny_config
from iaca_jax import compile_report, topology, train_lib
from iaca_jax.data_source import DataSource, nominal_input_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_matmul_flops_counts_dots_convolutions_and_scan_bodies():
  def program(x, w, a, b, h, u, image, kernel):
    plain = x @ w  # (64, 32) x (32, 16)
    batched = jnp.einsum('bij,bjk->bik', a, b)  # 4 x (8, 16) x (16, 8)
    looped = jax.lax.scan(lambda c, _: (jnp.tanh(c @ u), None), h, None, length=3)[
      0
    ]  # 3 x (8, 16) x (16, 16)
    conv = jax.lax.conv_general_dilated(image, kernel, (1, 1), 'VALID')  # (1, 3, 8, 8) * (5, 3, 3, 3)
    return plain.sum() + batched.sum() + looped.sum() + conv.sum() + jnp.tanh(x).sum()

  shapes = [(64, 32), (32, 16), (4, 8, 16), (4, 16, 8), (8, 16), (16, 16), (1, 3, 8, 8), (5, 3, 3, 3)]
  jaxpr = jax.make_jaxpr(program)(*[jnp.ones(s, jnp.float32) for s in shapes])
  conv = 2 * (1 * 5 * 6 * 6) * (3 * 3 * 3)  # 2 x output elements x (input channels x window)
  expected = 2 * 64 * 32 * 16 + 2 * 4 * 8 * 16 * 8 + 3 * 2 * 8 * 16 * 16 + conv
  assert compile_report.matmul_flops(jaxpr) == expected


def test_replica_groups_in_every_hlo_spelling():
  assert compile_report.replica_groups('{{0,1},{2,3}}', 4) == [[0, 1], [2, 3]]
  assert compile_report.replica_groups('{}', 3) == [[0, 1, 2]]
  assert compile_report.replica_groups('[2,4]<=[8]', 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert compile_report.replica_groups('[4,2]<=[2,4]T(1,0)', 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  # over mesh axes: ids 0..3 as a (2, 2, 1) mesh, reduced over axis_1
  assert compile_report.replica_groups("mesh['axis_0'=2,'axis_1'=2,'axis_2'=1] {'axis_1'}", 4) == [
    [0, 1],
    [2, 3],
  ]
  # ids ordered [0, 2, 1, 3] into a (2, 1, 2) mesh, reduced over axis_0
  mesh = "mesh['axis_0'=2,'axis_1'=1,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_0'}"
  assert compile_report.replica_groups(mesh, 4) == [[0, 1], [2, 3]]


def test_array_bytes_of_hlo_shapes():
  assert compile_report.array_bytes('f32[256,512]{1,0}') == 256 * 512 * 4
  assert (
    compile_report.array_bytes('(bf16[8,128]{1,0:T(8,128)(2,1)}, pred[], s32[3])') == 8 * 128 * 2 + 1 + 12
  )


def test_collectives_of_a_compiled_cpu_program():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ('replica', 'data'))
  rows = NamedSharding(mesh, P(('replica', 'data')))

  def program(x):  # a sum over every device, and one within each group of 4 (a psum over 'data')
    total = jnp.sum(x, axis=0)
    per_group = jax.shard_map(
      lambda b: jax.lax.psum(b.sum(1), 'data'),
      mesh=mesh,
      in_specs=P('replica'),
      out_specs=P('replica'),
    )(x.reshape(2, 16, 3))
    return total, per_group

  x = jax.ShapeDtypeStruct((32, 3), np.float32, sharding=rows)
  replicated = NamedSharding(mesh, P())
  compiled = (
    jax.jit(program, out_shardings=(replicated, NamedSharding(mesh, P('replica')))).lower(x).compile()
  )
  found = compile_report.collectives(compiled.as_text(), 8)
  reduces = sorted((c['bytes'], c['groups']) for c in found if c['kind'] == 'all-reduce')
  assert (12, [[0, 1, 2, 3, 4, 5, 6, 7]]) in reduces  # f32[3] over all 8
  assert (12, [[0, 1, 2, 3], [4, 5, 6, 7]]) in reduces  # f32[1, 3] within each group
  assert compile_report.collective_summary(found)['all-reduce']['count'] == len(reduces)


def test_nominal_input_shapes_are_the_pipelines(tiny, cached):
  for config in (make_config(tiny.data_dir), cached):
    model = train_lib.create_trainer(config, jax.devices()[:1]).model
    read = DataSource(config).input_shapes()  # from the prepared dataset's element spec
    nominal = nominal_input_shapes(config, model)
    assert {k: (v.shape[1:], v.dtype) for k, v in nominal.items()} == {
      k: (v.shape[1:], v.dtype) for k, v in read.items()
    }
    assert all(v.shape[0] == config.dataset.batch_size for v in nominal.values())


def test_batch_share_follows_the_data_axis():
  # 2 hosts x 4 chips, data parallel: host p feeds rows [p B/2, (p+1) B/2)
  devices = topology.topology_devices('v4:2x2x2')
  assert [d.process_index for d in devices] == [0] * 4 + [1] * 4
  mesh = train_lib.create_mesh(devices)
  assert [train_lib.batch_share(mesh, p) for p in (0, 1)] == [(0, 2), (1, 2)]
  # replicas in 4 groups of 2 devices, each group inside one host: every host reads the whole batch
  mesh = train_lib.create_mesh(devices, replica_groups=4)
  assert [train_lib.batch_share(mesh, p) for p in (0, 1)] == [(0, 1), (0, 1)]
  # hosts listed out of order: the mesh is built process-major all the same
  mesh = train_lib.create_mesh(devices[4:] + devices[:4])
  assert train_lib.batch_share(mesh, 1) == (1, 2)
  # a hand-built mesh whose host holds positions 0 and 2 of the data axis cannot feed one block
  interleaved = jax.sharding.Mesh(np.asarray([devices[0], devices[4], devices[1], devices[5]]), ('data',))
  with pytest.raises(ValueError, match='not one aligned block'):
    train_lib.batch_share(interleaved, 0)


def test_replica_groups_spanning_hosts_of_a_pod_split_the_batch_between_them():
  """32 replicas on a v5e-256 (64 hosts of 4 chips): groups of 8 chips span 2 hosts, which feed the
  two halves of their group's batch; every group sees the whole batch."""
  devices = topology.topology_devices('v5e:16x16')
  assert len(devices) == 256 and len({d.process_index for d in devices}) == 64
  config = tiny_config.get_config()
  config.replicas.count, config.replicas.shard = 32, True
  mesh = train_lib.create_mesh(devices, replica_groups=32)
  for group in mesh.devices:
    hosts = sorted({d.process_index for d in group})
    assert sorted(train_lib.batch_share(mesh, h) for h in hosts) == [(0, 2), (1, 2)]


@pytest.fixture(scope='module')
def slice_devices():
  return topology.topology_devices('v5e:2x2')


def fusion_config():
  """configs/tiny.py on cached features: the fusion model's step, which compiles in seconds (the shapes
  come from the config; nothing is read)."""
  config = tiny_config.get_config()
  config.dataset.features_dir = 'not-read'
  return config


def test_tiny_run_compiles_for_a_tpu_slice_data_parallel(slice_devices):
  config = fusion_config()
  report = compile_report.compile_run(config, slice_devices, steps=('train',))
  assert report['kernels'] == 'xla'  # the TPU's kernels, although this host is a CPU
  assert report['fits'] and report['devices'] == 4
  train = report['steps']['train']
  # The gradients are all-reduced over the 4 chips; the batch is never gathered.
  assert train['collectives']['all-reduce']['largest_group'] == 4
  assert not {'all-gather', 'all-to-all', 'collective-permute'} & set(train['collectives'])
  # Each chip holds the whole state and its quarter of the batch (TPU tiles pad some arrays).
  trainer = train_lib.create_trainer(config, slice_devices)
  state, batch, _ = compile_report.abstract_inputs(config, trainer)
  nbytes = lambda tree: sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
  assert train['memory']['argument'] >= nbytes(state) + nbytes(batch) / 4
  assert 0 < train['model_flops'] <= train['xla_flops'] * 1.5
  assert train['roofline']['step_s'] == max(train['roofline'][k] for k in ('compute_s', 'hbm_s', 'ici_s'))


def test_replica_groups_exchange_nothing_on_a_tpu_slice(slice_devices):
  config = fusion_config()
  config.replicas.count, config.replicas.shard = 2, True
  trainer = train_lib.create_trainer(config, slice_devices)
  assert dict(trainer.mesh.shape) == {'replica': 2, 'data': 2}
  state, batch, rng = compile_report.abstract_inputs(config, trainer)
  compiled = trainer.train_step.lower(state, batch, rng).compile()
  found = compile_report.collectives(compiled.as_text(), 4)
  assert any(c['kind'] == 'all-reduce' for c in found)  # each group's gradient all-reduce
  mesh_groups = [set(range(g * 2, g * 2 + 2)) for g in range(2)]  # logical ids, mesh order
  for c in found:
    for group in c['groups']:
      assert any(set(group) <= g for g in mesh_groups), (c['kind'], c['groups'])


def test_find_batch_bisects_to_the_largest_fitting_batch(monkeypatch, slice_devices):
  hbm = topology.CHIPS['v5e'].hbm_bytes

  def fake_compile(config, devices, steps):  # 1 GiB a sequence per chip; 4 chips share the batch
    per_chip = config.dataset.batch_size // 4
    if per_chip > 20:
      raise compile_report.CompileFailed('RESOURCE_EXHAUSTED: Ran out of memory', out_of_memory=True)
    return {'steps': {'train': {'memory': {'total': per_chip * 2**30}}}}

  monkeypatch.setattr(compile_report, 'compile_run', fake_compile)
  batch, trials = compile_report.find_batch(tiny_config.get_config(), slice_devices, log=lambda s: None)
  assert batch == 4 * (hbm // 2**30)  # 16 sequences of 1 GiB fill a 16 GiB chip
  assert [t[0] for t in trials][:5] == [4, 8, 16, 32, 64]


def test_a_run_too_large_for_a_chip_is_one_line_and_exit_1(tmp_path):
  report = tmp_path / 'report.json'
  proc = subprocess.run(
    [sys.executable, 'train_compile.py', '--config', 'configs/tiny.py', '--topology=v5e:2x2',
     '--config.dataset.features_dir=not-read', '--config.dataset.batch_size=1048576', f'--report={report}'],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'does not fit' in errors[0], proc.stderr[-3000:]
  written = json.loads(report.read_text())
  assert 'error' in written or written['fits'] is False


def test_unknown_topologies_are_named():
  with pytest.raises(ValueError, match='v9x:2x2'):
    topology.parse_topology('v9x:2x2')
  with pytest.raises(ValueError, match='expected'):
    topology.parse_topology('v5e-8')
