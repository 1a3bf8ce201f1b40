"""PyTorch -> Flax conversion (iaca_jax/conversion/, iaca_jax/pretrained.py), checked numerically against PyTorch modules.

Reference modules (tests/torch_reference.py) carry the real checkpoints' parameter names and random
weights, with random BatchNorm running statistics. Each block of the authors' fusion model and the
whole model must agree within 1e-4 (max abs, fp32, paper sizes); the width-1 torchvision encoders within
1e-3 relative error. Run with -s to see the measured differences.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
  'torch', reason='the PyTorch converter tests need torch: pip install -e ".[torch]"'
)

import torch_reference as ref  # noqa: E402  (imports torch)

from iaca_jax import pretrained  # noqa: E402
from iaca_jax.conversion import convert, name_maps, state_dict, torch_checkpoint  # noqa: E402
from iaca_jax.models import IACAModel, R2Plus1D18, ResNet18  # noqa: E402
from iaca_jax.models.attention import AudioGuidedSpatialAttention  # noqa: E402
from iaca_jax.models.cross_attention import DenseCoAttentionLayer, RecursiveJointCrossAttention  # noqa: E402
from iaca_jax.models.gates import AttentionGate  # noqa: E402
from iaca_jax.models.iaca import RegressionHead  # noqa: E402
from iaca_jax.models.temporal import ResidualBLSTM  # noqa: E402

torch.set_num_threads(2)
B, L, D, P = 2, 16, 512, 49  # the paper's fusion sizes
ATOL = 1e-4
ENCODER_RTOL = 1e-3

# Its module-scoped fixtures are built once: the module runs on one xdist worker (--dist=loadgroup).
pytestmark = pytest.mark.xdist_group('conversion')


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(x))


def _max_abs(ours, theirs, name):
  diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
  print(
    f'\n[convert] {name}: max abs diff {diff:.2e} (reference max abs {float(np.max(np.abs(theirs))):.3g})'
  )
  return diff


def _rel(ours, theirs, name):
  diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
  rel = diff / float(np.max(np.abs(theirs)))
  print(f'\n[convert] {name}: max abs diff {diff:.2e}, relative {rel:.2e}')
  return rel


def _channel_major(visual_map):
  """(B, L, h, w, C) -> the authors' (B, L, C*h*w) input (index = channel * 49 + position)."""
  b, l, h, w, c = visual_map.shape
  return np.ascontiguousarray(visual_map.transpose(0, 1, 4, 2, 3).reshape(b, l, c * h * w))


# ----------------------------------------------------------------------------------------------------
# The authors' fusion model at the paper's sizes.


@pytest.fixture(scope='module')
def fusion():
  model = ref.randomize_(ref.FusionModel(), seed=0)
  with torch.no_grad():  # larger head weights: predictions of order 1, so 1e-4 is a real check
    for head in (model.vregressor, model.aregressor):
      head[0].weight.mul_(8.0)
      head[3].weight.mul_(4.0)
  converted = state_dict.convert_state_dict(model.state_dict(), 'fusion')
  rng = np.random.default_rng(0)
  inputs = {
    'audio_features': rng.standard_normal((B, L, D)).astype(np.float32),
    'video_features': rng.standard_normal((B, L, 7, 7, D)).astype(np.float32),
  }
  return model, converted, inputs


def _unit(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize(
  'torch_name,ours,in_dim,dropout',
  [
    ('audio_extract', 'audio_temporal', D, 0.1),
    ('video_extract', 'video_temporal', D, 0.1),
    ('Joint', 'joint_temporal', 2 * D, 0.0),
  ],
)
def test_residual_blstm_blocks(fusion, torch_name, ours, in_dim, dropout):
  model, converted, _ = fusion
  x = np.maximum(_unit(np.random.default_rng(1), (B, L, in_dim)), 0) * 4.0
  with torch.no_grad():
    theirs = getattr(model, torch_name)(_t(x)).numpy()
  block = ResidualBLSTM(D, D // 2, 2, dropout)
  got = block.apply({'params': converted['params'][ours]}, x, train=False)
  assert _max_abs(got, theirs, f'{torch_name} (residual BLSTM)') < ATOL


def test_spatial_attention(fusion):
  model, converted, inputs = fusion
  rng = np.random.default_rng(2)
  visual = inputs['video_features']  # not normalised: larger scores, so the map is far from uniform
  audio = _unit(rng, (B, L, D)) * 8.0
  with torch.no_grad():
    theirs, alpha = model.video_attn.attn(_t(_channel_major(visual)), _t(audio))
  block = AudioGuidedSpatialAttention(D, torch_layout=True)
  got, attention = block.apply({'params': converted['params']['spatial_attention']}, visual, audio)
  assert _max_abs(got, theirs.numpy(), 'video_attn (spatial attention)') < ATOL
  assert _max_abs(attention, alpha.numpy().reshape(B, L, P), 'video_attn attention map') < ATOL
  assert float(np.max(alpha.numpy())) > 2.0 / P  # not a uniform map: the check means something


@pytest.mark.parametrize('layer', [0, 1])
def test_dense_coattention_layers(fusion, layer):
  model, converted, _ = fusion
  rng = np.random.default_rng(3 + layer)
  x1, x2 = _unit(rng, (B, L, D)), _unit(rng, (B, L, D))
  with torch.no_grad():
    t1, t2 = model.coattn.dcn_layers[layer](_t(x1), _t(x2))
  params = converted['params']['cross_attention'][f'layer_{layer}']
  o1, o2, _, _ = DenseCoAttentionLayer(0.6).apply({'params': params}, x1, x2, train=False)
  assert _max_abs(o1, t1.numpy(), f'coattn.dcn_layers.{layer} (video)') < ATOL
  assert _max_abs(o2, t2.numpy(), f'coattn.dcn_layers.{layer} (audio)') < ATOL


def test_coattention_stack(fusion):
  model, converted, _ = fusion
  rng = np.random.default_rng(5)
  audio, video = _unit(rng, (B, L, D)), _unit(rng, (B, L, D))
  with torch.no_grad():
    t_video, t_audio = model.coattn(_t(video), _t(audio))
  att_a, att_v, *_ = RecursiveJointCrossAttention(2, 0.6).apply(
    {'params': converted['params']['cross_attention']}, audio, video, train=False
  )
  assert _max_abs(att_v, t_video.numpy(), 'coattn (2 layers, video)') < ATOL
  assert _max_abs(att_a, t_audio.numpy(), 'coattn (2 layers, audio)') < ATOL


@pytest.mark.parametrize('modality', ['video', 'audio'])
def test_stage1_gates(fusion, modality):
  model, converted, _ = fusion
  rng = np.random.default_rng(6)
  x, attended = np.maximum(_unit(rng, (B, L, D)), 0), _unit(rng, (B, L, D)) * 3.0
  with torch.no_grad():
    theirs, t_w = ref.stage1_gate(getattr(model, f'{modality}_gating_fc_layer'), _t(x), _t(attended))
  got, w = AttentionGate(0.1).apply({'params': converted['params']['gate'][f'{modality}_gate']}, x, attended)
  assert _max_abs(got, theirs.numpy(), f'{modality}_gating_fc_layer (stage-1 gate)') < ATOL
  assert _max_abs(w, t_w.numpy(), f'{modality}_gating_fc_layer weights') < ATOL


@pytest.mark.parametrize('torch_name,ours', [('vregressor', 'valence_head'), ('aregressor', 'arousal_head')])
def test_regressors(fusion, torch_name, ours):
  model, converted, _ = fusion
  x = _unit(np.random.default_rng(7), (B, L, D))
  with torch.no_grad():
    theirs = getattr(model, torch_name)(_t(x))[..., 0].numpy()
  got = RegressionHead(128, 0.6).apply({'params': converted['params'][ours]}, x, train=False)
  assert _max_abs(got, theirs, torch_name) < ATOL


def test_whole_fusion_model_at_paper_sizes(fusion):
  model, converted, inputs = fusion
  with torch.no_grad():
    valence, arousal = model(_t(inputs['audio_features']), _t(_channel_major(inputs['video_features'])))
  ours = IACAModel(**name_maps.FusionDims().model_kwargs())
  abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), inputs))
  variables = pretrained.merge_pretrained(
    abstract, converted
  )  # every variable is converted: nothing abstract left
  predictions, aux = jax.jit(lambda v, x: ours.apply(v, x))(variables, inputs)
  assert predictions.shape == (B, L, 2)
  assert _max_abs(predictions[..., 0], valence.numpy(), 'whole fusion model: valence') < ATOL
  assert _max_abs(predictions[..., 1], arousal.numpy(), 'whole fusion model: arousal') < ATOL
  assert float(np.std(valence.numpy())) > 0.05 and float(np.std(arousal.numpy())) > 0.05
  assert aux['spatial_attention'].shape == (B, L, P)


def test_fusion_weights_merge_into_the_iaca_model(fusion):
  """With stage 2 on, the converted weights fill everything but the stage-2 gate."""
  _, converted, inputs = fusion
  ours = IACAModel(**{**name_maps.FusionDims().model_kwargs(), 'gating': 'iaca'})
  abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), inputs))
  merged = pretrained.merge_pretrained(abstract, converted)
  left = [
    k
    for k, v in jax.tree_util.tree_flatten_with_path(merged['params'])[0]
    if isinstance(v, jax.ShapeDtypeStruct)
  ]
  assert left and all('modality_gate' in jax.tree_util.keystr(k) for k in left)


# ----------------------------------------------------------------------------------------------------
# Encoders: torchvision structure at width 1, small inputs.

_video_apply = jax.jit(lambda v, x: R2Plus1D18().apply(v, x))
_audio_apply = jax.jit(lambda v, x: ResNet18().apply(v, x))


def _encoder_variables(converted, name):
  return {
    'params': converted['params']['encoders'][name],
    'batch_stats': converted['batch_stats']['encoders'][name],
  }


def _check_video(torch_trunk, converted, name, extra_channel=False):
  x = np.random.default_rng(8).standard_normal((1, 3, 8, 32, 32)).astype(np.float32)
  torch_in = np.concatenate([x, np.zeros_like(x[:, :1])], axis=1) if extra_channel else x
  with torch.no_grad():
    theirs = torch_trunk.features(_t(torch_in)).numpy()  # (1, 512, 1, 2, 2)
  got = _video_apply(_encoder_variables(converted, 'video_encoder'), x.transpose(0, 2, 3, 4, 1))
  assert _rel(np.asarray(got).transpose(0, 4, 1, 2, 3), theirs, name) < ENCODER_RTOL


def _check_audio(torch_trunk, converted, name, repeat=1):
  x = np.random.default_rng(9).standard_normal((1, 1, 64, 104)).astype(np.float32)
  with torch.no_grad():
    theirs = torch_trunk.features(_t(np.repeat(x, repeat, axis=1))).numpy()  # (1, 512)
  got = _audio_apply(_encoder_variables(converted, 'audio_encoder'), x.transpose(0, 2, 3, 1))
  assert _rel(got, theirs, name) < ENCODER_RTOL


def test_r2plus1d_18_kinetics_layout():
  trunk = ref.randomize_(ref.r2plus1d_18(), seed=1)
  converted = state_dict.convert_state_dict(trunk.state_dict(), 'r2plus1d_18')
  assert (
    pretrained.count_parameters(converted['params']) == 31_300_125
  )  # torchvision's total minus the 400-way fc
  assert set(converted['params']) == {'encoders'} and set(converted['params']['encoders']) == {
    'video_encoder'
  }
  _check_video(trunk, converted, 'r2plus1d_18 layer-4 map')


def test_resnet18_imagenet_stem_summed_for_mono_audio():
  trunk = ref.randomize_(ref.resnet18(), seed=2)
  notes = []
  converted = state_dict.convert_state_dict(trunk.state_dict(), 'resnet18', notes=notes)
  assert any('sum' in n and 'conv1.weight' in n for n in notes)
  # Summing the stem over RGB == the torch network applied to the spectrogram repeated on 3 channels.
  _check_audio(trunk, converted, 'resnet18 (3-channel stem summed) pooled features', repeat=3)
  mean = state_dict.convert_state_dict(trunk.state_dict(), 'resnet18', audio_stem='mean')
  np.testing.assert_allclose(
    mean['params']['encoders']['audio_encoder']['conv1']['kernel'] * 3,
    converted['params']['encoders']['audio_encoder']['conv1']['kernel'],
    rtol=1e-5,
  )
  with pytest.raises(pretrained.ShapeMismatchError, match=r'conv1\.weight.*exact'):
    state_dict.convert_state_dict(trunk.state_dict(), 'resnet18', audio_stem='exact')


def test_tsav_two_stream_checkpoint():
  model = ref.randomize_(ref.TwoStreamAuralVisualModel(num_channels=4), seed=3)
  state = {'module.' + k: v for k, v in model.state_dict().items()}  # saved from DataParallel
  notes = []
  converted = state_dict.convert_state_dict({'state_dict': state, 'epoch': 3}, 'tsav', notes=notes)
  assert any('face-mask' in n for n in notes)
  assert set(converted['params']['encoders']) == {'video_encoder', 'audio_encoder'}
  stem = converted['params']['encoders']['video_encoder']['stem_spatial_conv']['kernel']
  np.testing.assert_array_equal(
    stem, model.video_model.r2plus1d.stem[0].weight.detach().numpy()[:, :3].transpose(2, 3, 4, 1, 0)
  )
  # The mask channel is dropped: ours on RGB == theirs on RGB + an all-zero mask.
  _check_video(
    model.video_model.r2plus1d, converted, 'TSAV video (4-channel stem, mask dropped)', extra_channel=True
  )
  _check_audio(model.audio_model.resnet, converted, 'TSAV audio (1-channel ResNet-18)')
  # The full IACAModel (raw inputs) takes both encoders.
  iaca = IACAModel(torch_layout=True, gating='stage1')
  raw = {'video': jnp.zeros((1, 1, 8, 32, 32, 3)), 'audio': jnp.zeros((1, 1, 64, 32))}
  merged = pretrained.merge_pretrained(jax.eval_shape(lambda: iaca.init(jax.random.key(0), raw)), converted)
  assert isinstance(merged['batch_stats']['encoders']['video_encoder']['stem_spatial_bn']['var'], jax.Array)


# ----------------------------------------------------------------------------------------------------
# Errors name the first offending key.


@pytest.fixture(scope='module')
def resnet_state():
  return {k: v.numpy() for k, v in ref.randomize_(ref.resnet18(in_channels=1), seed=4).state_dict().items()}


def test_missing_key_is_named(resnet_state):
  state = dict(resnet_state)
  del state['layer2.0.downsample.1.running_var']
  with pytest.raises(
    pretrained.MissingKeyError, match=r"'layer2\.0\.downsample\.1\.running_var'.*\(128,\)"
  ) as e:
    state_dict.convert_state_dict(state, 'resnet18')
  assert e.value.key == 'layer2.0.downsample.1.running_var'


def test_unexpected_key_is_named(resnet_state):
  state = {**resnet_state, 'layer5.0.conv1.weight': np.zeros((3, 3), np.float32)}
  with pytest.raises(pretrained.UnexpectedKeyError, match=r"'layer5\.0\.conv1\.weight'") as e:
    state_dict.convert_state_dict(state, 'resnet18')
  assert e.value.key == 'layer5.0.conv1.weight'
  converted = state_dict.convert_state_dict(state, 'resnet18', ignore=[r'^layer5\.'])  # deliberately left out
  assert 'layer5_0' not in converted['params']['encoders']['audio_encoder']


def test_wrong_shape_is_named(resnet_state):
  state = dict(resnet_state)
  state['layer3.1.conv2.weight'] = np.zeros((256, 256, 1, 3), np.float32)
  with pytest.raises(
    pretrained.ShapeMismatchError,
    match=r"'layer3\.1\.conv2\.weight' has shape \(256, 256, 1, 3\), "
    r'expected \(256, 256, 3, 3\)',
  ):
    state_dict.convert_state_dict(state, 'resnet18')


def test_fusion_errors_name_the_key(fusion):
  model, _, _ = fusion
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  missing = {k: v for k, v in state.items() if k != 'Joint.rnn.bias_hh_l1_reverse'}
  with pytest.raises(pretrained.MissingKeyError, match=r"'Joint\.rnn\.bias_hh_l1_reverse'.*joint_temporal"):
    state_dict.convert_state_dict(missing, 'fusion')
  with pytest.raises(
    pretrained.ShapeMismatchError, match=r"'coattn\.dcn_layers\.0\.dense_coattn\.key1_linear\.weight'"
  ):
    state_dict.convert_state_dict(state, 'fusion', dims=name_maps.FusionDims(clips=8))
  with pytest.raises(pretrained.UnexpectedKeyError, match=r"'coattn\.dcn_layers\.2\.linears\.0\.0\.weight'"):
    state_dict.convert_state_dict(
      {**state, 'coattn.dcn_layers.2.linears.0.0.weight': state['coattn.dcn_layers.1.linears.0.0.weight']},
      'fusion',
    )


def test_wrong_prefix_is_explained():
  state = ref.TwoStreamAuralVisualModel(num_channels=4).state_dict()
  with pytest.raises(pretrained.MissingKeyError, match=r"'stem\.0\.weight'.*'video_model\.r2plus1d\.'"):
    state_dict.convert_state_dict(state, 'r2plus1d_18')
  # With the prefix, the video half converts and the audio keys are left out.
  video = state_dict.convert_state_dict(state, 'r2plus1d_18', prefix='video_model.r2plus1d.')
  assert set(video['params']['encoders']) == {'video_encoder'}


def test_merge_pretrained_checks_shapes_and_names():
  variables = {'params': {'a': {'kernel': jnp.zeros((3, 2))}, 'b': jnp.zeros((4,))}, 'batch_stats': {}}
  merged = pretrained.merge_pretrained(variables, {'params': {'a': {'kernel': np.ones((3, 2), np.float32)}}})
  assert float(merged['params']['a']['kernel'].sum()) == 6 and float(merged['params']['b'].sum()) == 0
  assert float(variables['params']['a']['kernel'].sum()) == 0  # the input is not mutated
  with pytest.raises(pretrained.ShapeMismatchError, match=r'params/a/kernel has shape \(2, 3\)'):
    pretrained.merge_pretrained(variables, {'params': {'a': {'kernel': np.ones((2, 3))}}})
  with pytest.raises(pretrained.ConversionError, match=r'params/c/kernel does not exist'):
    pretrained.merge_pretrained(variables, {'params': {'c': {'kernel': np.ones((2, 3))}}})


def test_state_dict_wrappers():
  inner = {'w': np.ones(2, np.float32)}
  for wrapped in ({'state_dict': inner}, {'model': {'module.w': inner['w']}}, {'net': inner, 'best': 0.5}):
    assert list(torch_checkpoint.to_numpy_state_dict(wrapped)) == ['w']
  with pytest.raises(pretrained.ConversionError, match='no state dict'):
    torch_checkpoint.to_numpy_state_dict({'epoch': 3, 'optimizer': {'lr': 0.1}})


# ----------------------------------------------------------------------------------------------------
# The command and the Orbax round trip.

SMALL = name_maps.FusionDims(clips=4, features=32, lstm_hidden=16, iterations=2, head_hidden=8, positions=9)


def _cli_flags(dims):
  return [f'--{k}={v}' for k, v in vars(dims).items()]


def test_command_writes_an_orbax_checkpoint_that_round_trips(tmp_path):
  model = ref.randomize_(
    ref.FusionModel(SMALL.features, SMALL.clips, SMALL.positions, SMALL.iterations, SMALL.head_hidden), seed=5
  )
  source = tmp_path / 'cam_model.pt'
  torch.save({'net': model.state_dict(), 'best_Val_accV': np.float64(0.41), 'best_Val_acc_epoch': 7}, source)
  output = tmp_path / 'converted' / 'fusion'
  env = {**os.environ, 'PYTHONPATH': os.getcwd()}
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'iaca_jax.conversion',
      '--kind=fusion',
      f'--input={source}',
      f'--output={output}',
      *_cli_flags(SMALL),
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'wrote' in run.stdout and os.listdir(output.parent) == ['fusion']  # no partial directory left
  restored = pretrained.load_converted(str(output))
  expected = state_dict.convert_state_dict(model.state_dict(), 'fusion', dims=SMALL)
  assert restored['batch_stats'] == {}
  jax.tree.map(np.testing.assert_array_equal, restored['params'], expected['params'])
  metadata = pretrained.read_conversion_metadata(str(output))
  assert metadata['kind'] == 'fusion' and metadata['model_config']['torch_layout'] is True
  assert json.loads(json.dumps(metadata)) == metadata
  # The restored weights run in IACAModel and equal the PyTorch model.
  rng = np.random.default_rng(10)
  inputs = {
    'audio_features': rng.standard_normal((2, SMALL.clips, SMALL.features)).astype(np.float32),
    'video_features': rng.standard_normal((2, SMALL.clips, 3, 3, SMALL.features)).astype(np.float32),
  }
  predictions, _ = IACAModel(**SMALL.model_kwargs()).apply(restored, inputs)
  with torch.no_grad():
    valence, arousal = model(_t(inputs['audio_features']), _t(_channel_major(inputs['video_features'])))
  assert (
    _max_abs(predictions, np.stack([valence.numpy(), arousal.numpy()], -1), 'small fusion via Orbax') < ATOL
  )
  # A second run refuses to overwrite; a failed conversion leaves nothing behind.
  assert convert.main(['--kind=fusion', f'--input={source}', f'--output={output}', *_cli_flags(SMALL)]) == 1
  failed = tmp_path / 'converted' / 'wrong_kind'
  assert convert.main(['--kind=resnet18', f'--input={source}', f'--output={failed}']) == 1
  assert sorted(os.listdir(output.parent)) == ['fusion']
  # --also puts earlier conversions (e.g. the TSAV encoders) into the same checkpoint.
  encoders = {
    'params': {'encoders': {'video_encoder': {'k': np.ones((2, 3), np.float32)}}},
    'batch_stats': {'encoders': {'video_encoder': {'mean': np.zeros(3, np.float32)}}},
  }
  pretrained.save_converted(
    encoders, str(tmp_path / 'enc'), metadata={'kind': 'tsav', 'model_config': {'encoder_width': 1.0}}
  )
  both = tmp_path / 'converted' / 'both'
  assert (
    convert.main(
      [
        '--kind=fusion',
        f'--input={source}',
        f'--output={both}',
        f'--also={tmp_path / "enc"}',
        *_cli_flags(SMALL),
      ]
    )
    == 0
  )
  combined = pretrained.load_converted(str(both))
  assert set(combined['params']) == set(expected['params']) | {'encoders'}
  assert set(combined['batch_stats']) == {'encoders'}
  config = pretrained.read_conversion_metadata(str(both))['model_config']
  assert config['encoder_width'] == 1.0 and config['torch_layout'] is True
  with pytest.raises(pretrained.ConversionError, match='converted twice'):
    pretrained.combine_converted(encoders, encoders)


def test_training_and_evaluation_do_not_import_torch_or_the_converter():
  # In a fresh process: what training, caching and evaluation import, plus the converter module itself.
  code = (
    'import sys, iaca_jax.train_lib, iaca_jax.evaluate_lib, iaca_jax.feature_cache; '
    'assert not [m for m in sys.modules if m.startswith("iaca_jax.conversion")], "converter imported"; '
    'import iaca_jax.conversion.convert; assert "torch" not in sys.modules, "torch imported"'
  )
  env = {**os.environ, 'PYTHONPATH': os.getcwd()}
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
  assert run.returncode == 0, run.stderr[-2000:]
