"""Report tables against loops written out over the clips."""

import collections

import numpy as np

from iaca_jax import reports


def test_gate_summary_averages_each_gate_over_its_clip_group():
  rng = np.random.default_rng(0)
  n, length = 3, 4
  clips = {
    'end_frame': np.array([[5, 10, 15, 0], [5, 10, 15, 20], [0, 0, 5, 10]]),
    'corrupt_audio': rng.random((n, length)) < 0.4,
    'corrupt_video': rng.random((n, length)) < 0.4,
    'gate_modality': rng.random((n, length, 2)),
    'gate_audio': rng.random((n, length, 2)),
  }
  rows = {r['clips']: r for r in reports.gate_summary(clips)}
  expected = collections.defaultdict(list)
  for i in range(n):
    for j in range(length):
      if clips['end_frame'][i, j] == 0:
        continue
      audio, video = clips['corrupt_audio'][i, j], clips['corrupt_video'][i, j]
      groups = (
        (['both clean'] if not (audio or video) else [])
        + (['audio corrupted'] if audio else [])
        + (['video corrupted'] if video else [])
      )
      for group in groups:
        expected[group].append((clips['gate_modality'][i, j, 0], clips['gate_audio'][i, j, 1]))
  for group, values in expected.items():
    assert rows[group]['n'] == len(values)
    np.testing.assert_allclose(rows[group]['stage-2 audio weight'], np.mean([v[0] for v in values]))
    np.testing.assert_allclose(
      rows[group]['stage-1 weight on the attended audio'], np.mean([v[1] for v in values])
    )
    assert 'stage-1 weight on the attended video' not in rows[group]
  table = reports.gate_table(clips).splitlines()
  assert table[0] == '| clips | stage-2 audio weight | stage-1 weight on the attended audio | n |'
  assert (
    len(table) == 5
    and reports.gate_table(
      {
        'end_frame': clips['end_frame'],
        'corrupt_audio': clips['corrupt_audio'],
        'corrupt_video': clips['corrupt_video'],
      }
    )
    == ''
  )
