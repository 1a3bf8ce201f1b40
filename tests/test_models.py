"""Model family: shapes under jit for every block/gate combination, torchvision parameter counts,
gates, the layout switch and the spatial attention against NumPy."""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iaca_jax import models
from iaca_jax.models import (
  CROSS_ATTENTION_TYPES,
  STAGE2_TYPES,
  Attended,
  AudioGuidedSpatialAttention,
  IACAModel,
  R2Plus1D18,
  ResNet18,
  encoders,
  make_gate,
)
from iaca_jax.models.attention import torch_quirk_layout
from iaca_jax.models.encoders import FactoredConv3D
from iaca_jax.models.gates import gate_weights

TINY = dict(features=16, lstm_hidden=8, head_hidden=8, encoder_width=0.125, encoder_blocks_per_stage=1)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def feature_batch(rng, batch=2, clips=4, channels=8, hw=3):
  k1, k2 = jax.random.split(rng)
  return {
    'video_features': jax.random.normal(k1, (batch, clips, hw, hw, channels)),
    'audio_features': jax.random.normal(k2, (batch, clips, channels)),
  }


# torchvision's published totals, and the parts of them that our trunks leave out.
TORCHVISION_R2PLUS1D_18 = 31_505_325  # torchvision.models.video.r2plus1d_18(num_classes=400)
TORCHVISION_RESNET18 = 11_689_512  # torchvision.models.resnet18(num_classes=1000)


def test_encoder_parameter_counts_equal_torchvision():
  video = jax.eval_shape(lambda: R2Plus1D18().init(jax.random.key(0), jnp.ones((1, 8, 112, 112, 3))))
  audio = jax.eval_shape(lambda: ResNet18().init(jax.random.key(0), jnp.ones((1, 64, 104, 1))))
  r2plus1d_fc = 512 * 400 + 400
  resnet_fc = 512 * 1000 + 1000
  rgb_stem_minus_mono_stem = 64 * 7 * 7 * (3 - 1)
  assert count(video['params']) == TORCHVISION_R2PLUS1D_18 - r2plus1d_fc == 31_300_125
  assert count(audio['params']) == TORCHVISION_RESNET18 - resnet_fc - rgb_stem_minus_mono_stem == 11_170_240
  # BatchNorm running statistics (mean and var of every BN layer) live outside `params`.
  assert count(video['batch_stats']) == 25_350


@pytest.mark.parametrize(
  'kernel,strides',
  [
    ((1, 3, 3), (1, 2, 2)),
    ((1, 7, 7), (1, 2, 2)),
    ((3, 1, 1), (2, 1, 1)),
    ((3, 1, 1), (1, 1, 1)),
    ((1, 1, 1), (2, 2, 2)),
  ],
)
def test_factored_conv_equals_a_3d_convolution(kernel, strides):
  x = jax.random.normal(jax.random.key(0), (2, 8, 14, 14, 5))
  conv = FactoredConv3D(6, kernel, strides)
  variables = conv.init(jax.random.key(1), x)
  padding = [(k // 2, k // 2) for k in kernel]
  expected = jax.lax.conv_general_dilated(
    x, variables['params']['kernel'], strides, padding, dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC')
  )
  np.testing.assert_allclose(np.asarray(conv.apply(variables, x)), np.asarray(expected), atol=1e-5)


def test_encoder_output_shapes_and_small_variants():
  video_out = jax.eval_shape(
    lambda: R2Plus1D18().init_with_output(jax.random.key(0), jnp.ones((1, 8, 112, 112, 3)))[0]
  )
  assert video_out.shape == (1, 1, 7, 7, 512)
  audio_out = jax.eval_shape(
    lambda: ResNet18().init_with_output(jax.random.key(0), jnp.ones((2, 64, 104, 1)))[0]
  )
  assert audio_out.shape == (2, 512)
  small = R2Plus1D18(width=0.125, blocks_per_stage=1)
  with jax.threefry_partitionable(False):
    out, variables = jax.jit(small.init_with_output)(jax.random.key(0), jnp.ones((1, 8, 112, 112, 3)))
  assert out.shape == (1, 1, 7, 7, 64) and np.isfinite(np.asarray(out)).all()
  assert count(variables['params']) < 31_300_125 / 50


@pytest.mark.parametrize('frozen', [False, True])
def test_batchnorm_runs_frozen(frozen):
  model = ResNet18(width=0.125, blocks_per_stage=1, frozen_bn=frozen)
  x = jax.random.normal(jax.random.key(1), (4, 64, 104, 1)) * 3 + 1
  with jax.threefry_partitionable(False):
    variables = jax.jit(model.init)(jax.random.key(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'], updates['batch_stats'])
  )
  assert all(changed) if not frozen else not any(changed)


def test_running_average_batchnorm_is_flax_batchnorm_in_the_compute_dtype():
  """The bf16 encoders' inference BatchNorm: nn.BatchNorm's variables and value (NumPy's formula),
  computed as one affine map in bf16 (float32 runs keep nn.BatchNorm itself)."""
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 16)) * 3 + 1
  flax_bn = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)
  variables = jax.tree.map(
    lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), flax_bn.init(jax.random.key(1), x)
  )
  mine = encoders.RunningAverageBatchNorm(dtype=jnp.bfloat16)
  assert jax.tree.map(jnp.shape, mine.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
  p, s = variables['params'], variables['batch_stats']
  expected = (np.asarray(x) - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']
  out = mine.apply(variables, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  # bf16 keeps 8 significant bits: within a few of its ulps of the float32 value
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2**-6, atol=2**-6)
  assert isinstance(encoders._BatchNorm(use_running_average=True, dtype=jnp.float32), nn.BatchNorm)
  assert isinstance(encoders._BatchNorm(use_running_average=False, dtype=jnp.bfloat16), nn.BatchNorm)


# Every fusion block and every gate variant, each at least once: the gates read only the blocks'
# `Attended` (the same shapes whatever the block), so pairing each block with each gate adds nothing.
COMBINATIONS = [
  ('none', 'iaca', None),
  ('ca', 'stage1', None),
  ('jca', 'none', None),
  ('jca', 'iaca', 'raw'),
  ('rjca', 'iaca', None),
  ('rjca', 'iaca', 'sum'),
  ('rjca', 'iaca', 'iteration'),
  ('ca', 'iaca', 'mlp'),
]
assert {c for c, _, _ in COMBINATIONS} == set(CROSS_ATTENTION_TYPES)
assert {(g, s or ('modality' if g == 'iaca' else None)) for _, g, s in COMBINATIONS} == set(models.GATES)


@pytest.mark.parametrize('cross_attention,gating,stage2', COMBINATIONS)
def test_every_combination_composes_under_jit(cross_attention, gating, stage2):
  model = IACAModel(**TINY, cross_attention=cross_attention, gating=gating, stage2=stage2)
  batch = feature_batch(jax.random.key(0))
  variables = models.init_variables(model, batch, jax.random.key(1))
  apply = jax.jit(lambda v, b, rng: model.apply(v, b, train=True, rngs={'dropout': rng}))
  predictions, aux = apply(variables, batch, jax.random.key(2))
  assert predictions.shape == (2, 4, 2)
  assert np.isfinite(np.asarray(predictions)).all()
  assert aux['score_audio'].shape == aux['score_video'].shape == (2, 4)
  assert aux['spatial_attention'].shape == (2, 4, 9)
  for weights in aux['gates'].values():
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)


def test_the_xla_kernels_take_flax_dense_settings():
  """Under the plain kernels every Dense layer is `nn.Dense`: its precision (or dot_general) is the
  user's to set, e.g. 'highest' on a TPU."""
  kernels = dataclasses.replace(models.XLA, dense=functools.partial(nn.Dense, precision='highest'))
  model = IACAModel(**TINY, kernels=kernels)
  batch = feature_batch(jax.random.key(0))
  variables = models.init_variables(model, batch, jax.random.key(1))
  hlo = jax.jit(lambda v: model.apply(v, batch)[0]).lower(variables).as_text()
  assert hlo.count('precision = [HIGHEST, HIGHEST]') >= 10  # every Dense of the fusion model


def test_gate_variants_are_chosen_by_keyword_and_a_stage2_without_iaca_is_refused():
  assert [type(make_gate(g)).__name__ for g in ('none', 'stage1', 'iaca')] == [
    'NoGate',
    'Stage1Gate',
    'ModalityGate',
  ]
  assert {type(make_gate('iaca', s)).__name__ for s in STAGE2_TYPES} == {
    'ModalityGate',
    'SumGate',
    'IterationGate',
    'RawGate',
    'MLPGate',
  }
  with pytest.raises(ValueError, match="applies to gating='iaca' only"):
    make_gate('stage1', 'sum')
  with pytest.raises(ValueError, match='Unknown stage2'):
    make_gate('iaca', 'product')
  with pytest.raises(ValueError, match='Unknown gating'):
    make_gate('stage2')


@pytest.mark.heavy
def test_raw_inputs_through_small_encoders_and_train_eval_modes():
  model = IACAModel(**TINY)
  rng = jax.random.key(0)
  batch = {
    'video': jax.random.normal(rng, (1, 2, 8, 16, 16, 3)),
    'audio': jax.random.normal(rng, (1, 2, 64, 104)),
  }
  variables = models.init_variables(model, batch, jax.random.key(1))
  assert set(variables['params']['encoders']) == {'video_encoder', 'audio_encoder'}
  eval_fn = jax.jit(lambda v, b: model.apply(v, b, train=False)[0])
  first, second = eval_fn(variables, batch), eval_fn(variables, batch)
  np.testing.assert_array_equal(first, second)  # eval is deterministic
  train_fn = jax.jit(
    lambda v, b, r: model.apply(v, b, train=True, rngs={'dropout': r}, mutable=['batch_stats'])[0][0]
  )
  a, b = train_fn(variables, batch, jax.random.key(3)), train_fn(variables, batch, jax.random.key(4))
  assert first.shape == (1, 2, 2) and not np.allclose(a, b)  # dropout follows the rng
  # Frozen encoders pass no gradient.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**variables, 'params': p}, batch)[0])))(
    variables['params']
  )
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads['encoders']))
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads['joint_temporal']))


def test_torch_layout_matches_numpy_view_of_channel_major_map():
  rng = np.random.default_rng(0)
  nhwc = rng.normal(size=(2, 7, 7, 512)).astype(np.float32)
  # PyTorch: the map is (C, H, W); the authors flatten it and view the vector as (49, 512).
  torch_view = np.transpose(nhwc, (0, 3, 1, 2)).reshape(2, -1).reshape(2, 49, 512)
  ours = torch_quirk_layout(jnp.asarray(nhwc.reshape(2, 49, 512)))
  np.testing.assert_array_equal(np.asarray(ours), torch_view)


@pytest.mark.parametrize('torch_layout', [False, True])
def test_spatial_attention_matches_numpy(torch_layout):
  rng = jax.random.key(0)
  visual = jax.random.normal(rng, (2, 3, 2, 2, 6))
  audio = jax.random.normal(jax.random.key(1), (2, 3, 5))
  module = AudioGuidedSpatialAttention(features=4, torch_layout=torch_layout)
  variables = module.init(jax.random.key(2), visual, audio)
  out, attention = module.apply(variables, visual, audio)
  p = jax.tree.map(np.asarray, variables['params'])
  dense = lambda x, name: x @ p[name]['kernel'] + p[name].get('bias', 0.0)
  values = np.asarray(visual).reshape(2, 3, 4, 6)
  if torch_layout:
    values = np.transpose(values, (0, 1, 3, 2)).reshape(2, 3, 24).reshape(2, 3, 4, 6)
  expected_out = np.zeros((2, 3, 4))
  expected_attn = np.zeros((2, 3, 4))
  for b, l in itertools.product(range(2), range(3)):
    v = values[b, l]  # (P, C)
    u = np.maximum(dense(v, 'affine_video'), 0)
    g = np.maximum(dense(np.asarray(audio)[b, l], 'affine_audio'), 0)
    s, t = dense(u, 'affine_v'), dense(g, 'affine_g')  # (P, P), (P,)
    z = np.array([np.sum(p['affine_h']['kernel'][:, 0] * np.tanh(s[i] + t[i])) for i in range(4)])
    alpha = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    expected_attn[b, l] = alpha
    expected_out[b, l] = dense(alpha @ v, 'affine_feat')
  np.testing.assert_allclose(np.asarray(attention), expected_attn, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), expected_out, atol=1e-5)


def test_gate_weights_sum_to_one_and_pick_one_branch_as_temperature_vanishes():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 2))
  np.testing.assert_allclose(np.asarray(gate_weights(logits, 0.1)).sum(-1), 1.0, rtol=1e-6)
  hard = np.asarray(gate_weights(logits, 1e-6))
  np.testing.assert_array_equal(hard, np.eye(2)[np.argmax(np.asarray(logits), -1)])

  gate = make_gate('stage1', temperature=1e-6)
  x, att = jnp.ones((1, 4, 3)), -2 * jnp.ones((1, 4, 3))
  attended = Attended(att, att, jnp.ones((1, 4)), jnp.ones((1, 4)), ((att, att),))
  variables = gate.init(jax.random.key(0), x, x, attended)
  fused, gates = gate.apply(variables, x, x, attended)
  picks = np.asarray(gates['video']).argmax(-1)
  expected = np.where(picks[..., None] == 0, 1.0, 0.0) * np.ones((1, 4, 3))  # relu(x)=1 or relu(att)=0
  np.testing.assert_allclose(np.asarray(fused[..., :3]), expected, atol=1e-6)


def test_stage2_learns_to_down_weight_a_constant_modality():
  """Both modalities carry the target; each is replaced by a constant in its own time steps. IACA's
  stage 2 should turn, per time step, to the modality that still carries the signal."""
  rng = np.random.default_rng(0)
  batch, clips, dim = 64, 8, 8
  signal = rng.normal(size=(batch, clips, 1))
  audio = signal * rng.normal(size=(1, 1, dim)) + 0.1 * rng.normal(size=(batch, clips, dim))
  video = signal * rng.normal(size=(1, 1, dim)) + 0.1 * rng.normal(size=(batch, clips, dim))
  which = rng.integers(0, 3, size=(batch, clips))  # 0 clean, 1 audio corrupted, 2 video corrupted
  audio = np.where((which == 1)[..., None], 2.0, audio)
  video = np.where((which == 2)[..., None], 2.0, video)
  audio, video, target = (jnp.asarray(x, jnp.float32) for x in (audio, video, signal[..., 0]))
  gate = make_gate('iaca', 'modality')
  attended = Attended(audio, video, jnp.ones(audio.shape[:2]), jnp.ones(audio.shape[:2]), ())
  mlp = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(1)])
  head = lambda params, fused: mlp.apply({'params': params['head']}, fused)[..., 0]
  params = {
    'gate': gate.init(jax.random.key(0), audio, video, attended)['params'],
    'head': mlp.init(jax.random.key(1), jnp.zeros((1, 2 * dim)))['params'],
  }
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  def loss_fn(p):
    fused, gates = gate.apply({'params': p['gate']}, audio, video, attended)
    return jnp.mean((head(p, fused) - target) ** 2), gates

  @jax.jit
  def step(p, s):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, s = optimizer.update(grads, s)
    return optax.apply_updates(p, updates), s, loss

  for _ in range(800):
    params, opt_state, loss = step(params, opt_state)
  _, gates = loss_fn(params)
  audio_weight = np.asarray(gates['modality'][..., 0])
  assert float(loss) < 0.1
  assert audio_weight[which == 1].mean() < 0.1  # constant audio: weight on video
  assert audio_weight[which == 2].mean() > 0.9  # constant video: weight on audio


def test_the_mlp_stage2_computes_its_weights_through_a_hidden_relu_layer():
  """MLPGate against NumPy: stage 1 per modality, then softmax(Dense_2(ReLU(Dense_d([g_a, g_v]))) / T2)
  scaling [g_v, g_a]."""
  rng = np.random.default_rng(3)
  audio, video, att_a, att_v = (rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(4))
  attended = Attended(att_a, att_v, np.ones((2, 3)), np.ones((2, 3)), ((att_a, att_v),))
  gate = make_gate('iaca', 'mlp', temperature=0.5, stage2_temperature=2.0)
  variables = gate.init(jax.random.key(0), audio, video, attended)
  fused, gates = gate.apply(variables, audio, video, attended)
  p = jax.tree_util.tree_map(np.asarray, variables['params'])
  dense = lambda x, name: x @ p[name]['kernel'] + p[name]['bias']
  softmax = lambda z: (
    np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  )

  def stage1(x, att, name):
    w = softmax((att @ p[name]['fc']['kernel'] + p[name]['fc']['bias']) / 0.5)
    return np.maximum(w[..., :1] * x + w[..., 1:] * att, 0)

  g_a, g_v = stage1(audio, att_a, 'audio_gate'), stage1(video, att_v, 'video_gate')
  hidden = np.maximum(dense(np.concatenate([g_a, g_v], -1), 'modality_hidden'), 0)
  w = softmax(dense(hidden, 'modality_gate') / 2.0)
  np.testing.assert_allclose(np.asarray(gates['modality']), w, rtol=1e-5, atol=1e-6)
  expected = np.concatenate([w[..., 1:] * g_v, w[..., :1] * g_a], -1)
  np.testing.assert_allclose(np.asarray(fused), expected, rtol=1e-5, atol=1e-6)
  assert p['modality_hidden']['kernel'].shape == (8, 4)
