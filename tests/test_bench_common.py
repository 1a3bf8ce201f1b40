"""The accounting of bench/common.py that the benchmarks' figures rest on: FLOPs counted from a jaxpr,
self times and components from a profiler trace, tables and result files."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))

import common  # noqa: E402


def test_matmul_flops_counts_dots_convolutions_and_scan_bodies():
  import jax
  import jax.numpy as jnp

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
  assert common.matmul_flops(jaxpr) == expected


def test_self_times_leave_out_nested_events_of_the_same_thread():
  ev = lambda name, tid, ts, dur: dict(name=name, pid=1, tid=tid, ts=ts, dur=dur)
  events = [
    ev('while', 1, 0, 100),  # a loop ...
    ev('body', 1, 10, 30),  # ... and its body, twice
    ev('body', 1, 50, 20),
    ev('dot', 2, 20, 60),  # another thread: not nested in the loop
  ]
  got = common.self_times(events)
  assert got == pytest.approx({'while': 50e-6, 'body': 50e-6, 'dot': 60e-6})


def test_classify_names_the_component_and_the_phase():
  backward = 'jit(train_step)/transpose(jvp(IACAModel))/cross_attention/layer_1/dot_general'
  assert common.classify(backward, 'IACAModel') == ('cross_attention', 'backward')
  forward = 'jit(train_step)/jvp(IACAModel)/encoders/video_encoder/conv/conv_general_dilated'
  assert common.classify(forward, 'IACAModel') == ('encoders/video_encoder', 'forward')
  dropout = 'jit(train_step)/jvp(IACAModel)/temporal/Dropout_0/select_n'
  assert common.classify(dropout, 'IACAModel') == ('temporal [dropout]', 'forward')
  assert common.classify('jit(train_step)/adamw/mul', 'IACAModel') == (
    'optimizer, norms, finiteness check',
    'update',
  )


def test_table_right_aligns_columns_and_marks_missing_values():
  text = common.table(
    [dict(case='fusion', ms=912.345), dict(case='demo', ms=None)],
    [('case', 'case', 's'), ('ms', 'median ms', '.1f')],
  )
  assert text.splitlines() == [
    '  case  median ms',
    '------  ---------',
    'fusion      912.3',
    '  demo          -',
  ]


def test_write_json_leaves_the_old_file_whole_when_writing_fails(tmp_path):
  path = tmp_path / 'result.json'
  common.write_json(str(path), {'a': 1})
  with pytest.raises(RuntimeError):
    common.write_json(str(path), {'a': _Unwritable()})
  assert path.read_text() == '{\n "a": 1\n}'
  assert [p.name for p in tmp_path.iterdir()] == ['result.json']


class _Unwritable:
  def item(self):
    raise RuntimeError('cannot be written')
