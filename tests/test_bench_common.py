"""The accounting of bench/common.py that the benchmarks' figures rest on (FLOPs counted from a jaxpr:
tests/test_compile_report.py): self times and components from a profiler trace, tables and result files."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))

import common  # noqa: E402


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
