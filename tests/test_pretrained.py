"""Converted weights against the model they are loaded into: settings checked, uncovered variables named."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from iaca_jax import pretrained
from iaca_jax.models import IACAModel, init_variables

SETTINGS = dict(features=16, lstm_hidden=8, head_hidden=8, cross_attention='rjca', rjca_iterations=2)
BATCH = {
  'video_features': np.zeros((1, 4, 3, 3, 16), np.float32),
  'audio_features': np.zeros((1, 4, 16), np.float32),
}


def stage1_weights(tmp_path):
  """The stage-1 model's gate weights as a converted checkpoint made for `SETTINGS` + gating='stage1'."""
  variables = init_variables(
    IACAModel(**SETTINGS, gating='stage1', torch_layout=True), BATCH, jax.random.key(0)
  )
  converted = {'params': {'gate': jax.tree.map(np.asarray, variables['params']['gate'])}, 'batch_stats': {}}
  path = pretrained.save_converted(
    converted,
    str(tmp_path / 'fusion'),
    metadata={'kind': 'fusion', 'model_config': dict(SETTINGS, gating='stage1', torch_layout=True)},
  )
  return path, converted


def test_other_settings_fail_with_every_difference(tmp_path):
  path, _ = stage1_weights(tmp_path)
  wrong = dict(SETTINGS, rjca_iterations=3, torch_layout=False, gating='iaca')
  with pytest.raises(pretrained.ConversionError) as e:
    pretrained.load_for_model(path, wrong)
  message = str(e.value)
  assert path in message and 'rjca_iterations=3' in message and 'torch_layout=False' in message
  assert 'gating' not in message  # stage-1 weights fit the IACA model (stage 2 is new)
  loaded = pretrained.load_for_model(path, dict(SETTINGS, gating='iaca', torch_layout=True))
  assert set(loaded['params']) == {'gate'}


def test_uncovered_variables_in_converted_parts_are_named(tmp_path):
  _, converted = stage1_weights(tmp_path)
  variables = init_variables(
    IACAModel(**SETTINGS, gating='iaca', torch_layout=True), BATCH, jax.random.key(1)
  )
  with pytest.warns(UserWarning, match='params/gate/modality_gate/kernel') as record:
    merged = pretrained.merge_pretrained(variables, converted)
  assert 'cross_attention' not in str(record[0].message)  # parts the checkpoint does not touch
  flat = traverse_util.flatten_dict(merged['params']['gate'])
  for path, value in traverse_util.flatten_dict(converted['params']['gate']).items():
    np.testing.assert_array_equal(np.asarray(flat[path]), value)
