"""The gates against the corruptions' ground truth, against pairwise counts, hand-worked clip kinds,
a direct bootstrap and the per-seed differences computed on their own."""

import json

import numpy as np
import pytest
import scipy.stats

from iaca_jax import gate_analysis, metrics


def brute_force_auroc(positive, negative):
  """Every (positive, negative) pair: 1 ordered right, 1/2 tied."""
  wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
  return wins / (len(positive) * len(negative))


def test_auroc_is_the_share_of_correctly_ordered_pairs_with_ties_counted_half():
  # By hand: 0.35 beats 0.1 and loses to 0.4, 0.8 beats both: 3 of 4 pairs.
  assert gate_analysis.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
  # A tie counts half: 0.4 ties 0.4 and beats 0.1 -> (0.5 + 1) / 2.
  assert gate_analysis.auroc(np.array([0.1, 0.4, 0.4]), np.array([0, 0, 1])) == 0.75
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, size=(7, 9)) / 5  # many ties
  positive = rng.random((7, 9)) < 0.3
  assert gate_analysis.auroc(scores, positive) == pytest.approx(
    brute_force_auroc(scores[positive], scores[~positive])
  )
  assert np.isnan(gate_analysis.auroc(scores, np.zeros_like(positive)))


SIDECAR = {
  'a': {
    'num_frames': 100,
    'face': [{'start': 10, 'end': 60, 'kind': 'blur'}],
    'audio': [{'start': 70, 'end': 100, 'kind': 'noise'}],
  },
  'b': {'num_frames': 50, 'face': [], 'audio': [{'start': 1, 'end': 20, 'kind': 'silence'}]},
}


def tiny_clips():
  """Two windows of four clips. The clip ending at f covers frames f-31..f; by hand:
  a: 9 -> 1-9 clean; 20 -> 11 blur frames (10-20), neither; 41 -> 10-41 all blur; 75 -> 44-75, 17
  blur and 6 noise frames: blur; 85 -> 54-85, 7 blur and 16 noise: noise; 100 -> 69-100, 31 noise.
  b: 20 -> 1-20 silence (20 frames); 50 -> 19-50, 2 silent frames: neither; 0 padding."""
  return {
    'video_name': np.array([b'a', b'a', b'b']),
    'end_frame': np.array([[9, 20, 41, 75], [85, 100, 0, 0], [20, 50, 0, 0]]),
    'corrupt_video': np.array([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], bool),
    'corrupt_audio': np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], bool),
  }


def test_clip_groups_read_each_clips_kind_from_the_sidecar_by_video_and_end_frame():
  groups = gate_analysis.clip_groups(tiny_clips(), SIDECAR)
  assert list(groups) == ['clean', 'video: blur', 'audio: noise', 'audio: silence']
  expected = {
    'clean': [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    'video: blur': [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
    'audio: noise': [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]],
    'audio: silence': [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
  }
  for name, mask in expected.items():
    np.testing.assert_array_equal(groups[name], np.array(mask, bool), err_msg=name)
  silenced = dict(tiny_clips(), silenced=np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool))
  assert not gate_analysis.clip_groups(silenced, SIDECAR)['clean'].any()
  wrong = dict(tiny_clips(), corrupt_video=np.zeros((3, 4), bool))
  with pytest.raises(ValueError, match='corruptions.json of this set'):
    gate_analysis.clip_groups(wrong, SIDECAR)
  with pytest.raises(ValueError, match='not in the corruption sidecar'):
    gate_analysis.clip_groups(tiny_clips(), {'a': SIDECAR['a']})


def random_clips(rng, videos=5, windows=3, length=6):
  names = np.repeat([f'v{i}'.encode() for i in range(videos)], windows)
  end = np.tile(np.arange(1, windows * length + 1).reshape(windows, length), (videos, 1))
  n = len(names)
  return {
    'video_name': names,
    'end_frame': end,
    'gate_modality': rng.dirichlet([1, 1], size=(n, length)),
    'gate_audio': np.round(rng.dirichlet([1, 1], size=(n, length)), 1),  # ties
    'gate_video': rng.dirichlet([1, 1], size=(n, length)),
    'predictions': rng.normal(size=(n, length, 2)) * 0.3,
    'frame_labels': rng.uniform(-0.8, 0.8, size=(n, length, 2)),
    'frame_mask': np.ones((n, length), bool),
  }


def test_gate_aurocs_match_pairwise_counts_and_a_direct_bootstrap_over_videos():
  rng = np.random.default_rng(1)
  clips = random_clips(rng)
  kind = rng.random(clips['end_frame'].shape)
  groups = {'clean': kind < 0.5, 'audio: noise': (kind > 0.7) & (clips['video_name'][:, None] != b'v1')}
  clips['gate_modality'][groups['audio: noise'], 0] -= 0.3  # the audio weight drops where the audio is bad
  (row,) = gate_analysis.gate_aurocs(clips, groups, resamples=3000, seed=2)
  assert (row['clips'], row['n'], row['videos']) == ('audio: noise', int(groups['audio: noise'].sum()), 4)
  video = np.array([int(n[1:]) for n in clips['video_name']])
  for key, column, label in (
    ('gate_modality', 0, 'stage-2 audio weight'),
    ('gate_audio', 1, 'stage-1 weight on the attended audio'),
    ('gate_video', 1, 'stage-1 weight on the attended video'),
  ):
    scores = clips[key][..., column]
    value, low, high = row[label]
    assert value == pytest.approx(brute_force_auroc(scores[groups['audio: noise']], scores[groups['clean']]))
    # Direct: resample videos, repeat each drawn video's clips, count pairs; skip one-class draws.
    draws = np.random.default_rng(3).integers(0, 5, size=(4000, 5))
    direct = []
    for draw in draws:
      pos = np.concatenate([scores[video == v][groups['audio: noise'][video == v]] for v in draw])
      neg = np.concatenate([scores[video == v][groups['clean'][video == v]] for v in draw])
      if pos.size and neg.size:
        direct.append(
          ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
        )
    np.testing.assert_allclose((low, high), np.percentile(direct, [2.5, 97.5]), atol=0.03)
  assert row['stage-2 audio weight'][0] < 0.3
  table = gate_analysis.gate_auroc_table([row], int(groups['clean'].sum()), 3000).splitlines()
  assert table[2] == (
    '| corruption | clips | videos | stage-2 audio weight | stage-1 weight on the attended audio | '
    'stage-1 weight on the attended video |'
  )
  value, low, high = row['stage-1 weight on the attended video']
  assert (
    table[4].startswith(f'| audio: noise | {row["n"]} | 4 | ')
    and f'{value:.3f} [{low:.3f}, {high:.3f}] |' in table[4]
  )
  with pytest.raises(ValueError, match='pick one replica'):
    gate_analysis.gate_aurocs(dict(clips, gate_audio=clips['gate_audio'][:, None]), groups)


def test_kind_differences_pair_the_replicas_on_each_kinds_frames():
  rng = np.random.default_rng(4)
  base = random_clips(rng, videos=3, windows=4, length=8)
  kind = rng.random(base['end_frame'].shape)
  groups = {'clean': kind < 0.5, 'video: blur': kind > 0.6}
  variant, baseline = [], []
  for _ in range(3):
    noise = lambda scale: base['frame_labels'] + rng.normal(scale=scale, size=base['frame_labels'].shape)
    variant.append(dict(base, predictions=noise(0.2)))
    baseline.append(dict(base, predictions=noise(0.5)))
  rows = {r['clips']: r for r in gate_analysis.kind_differences(variant, baseline, groups)}
  # Direct: each group's frames, written out clip by clip, scored as a frame subset.
  subsets = {}
  for group, selected in groups.items():
    subsets[group] = {f'v{i}': np.zeros(32, bool) for i in range(3)}
    for i, name in enumerate(base['video_name']):
      for j, end in enumerate(base['end_frame'][i]):
        if selected[i, j]:
          subsets[group][name.decode()][end - 1] = True

  def score(clips, group):
    videos = metrics.clips_to_frames(clips)
    out = metrics.frame_ccc(
      {n: v['predictions'] for n, v in videos.items()},
      {n: v['labels'] for n, v in videos.items()},
      subsets={group: subsets[group]},
    )
    return out[f'{group}/ccc_mean'], out[f'{group}/n_frames']

  for group in groups:
    d = np.array([score(a, group)[0] - score(b, group)[0] for a, b in zip(variant, baseline)])
    low, high = scipy.stats.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(3))
    row = rows[group]
    assert (row['mean'], row['low'], row['high']) == pytest.approx((d.mean(), low, high))
    assert row['frames'] == score(variant[0], group)[1] == groups[group].sum() and row['n'] == 3
    assert row['verdict'] == ('supported' if low > 0 else 'not supported' if high < 0 else 'undecided')
  table = gate_analysis.kind_difference_table(list(rows.values()), 'IACA - no gate')
  assert '| video: blur |' in table and 'IACA - no gate' in table
  with pytest.raises(ValueError, match='same windows'):
    gate_analysis.kind_differences(
      variant, [dict(b, end_frame=b['end_frame'][::-1]) for b in baseline], groups
    )


def test_the_demo_writes_the_auroc_and_per_kind_tables_from_the_sidecar(tmp_path):
  import experiments  # noqa: PLC0415 - the entry point's helpers, without running it

  rng = np.random.default_rng(5)
  clips = dict(tiny_clips(), **{k: v for k, v in random_clips(rng, 3, 1, 4).items() if k != 'video_name'})
  clips['end_frame'] = tiny_clips()['end_frame']
  each = [
    [dict(clips, predictions=clips['frame_labels'] + rng.normal(0, s, (3, 4, 2))) for _ in range(2)]
    for s in (0.1, 0.4)
  ]
  path = tmp_path / 'corruptions.json'
  path.write_text(json.dumps({'format': 'synthetic_av_corruptions/1', 'seed': 0, 'videos': SIDECAR}))
  lines, rows = experiments.ground_truth_sections(clips, each, str(path), 'IACA - no gate')
  text = '\n'.join(lines)
  assert '| corruption | clips | videos | stage-2 audio weight |' in text and 'from the 1 clean clips' in text
  assert [r['clips'] for r in rows['gate_aurocs']] == ['video: blur', 'audio: noise', 'audio: silence']
  assert '## IACA - no gate per kind of corruption' in text and '| audio: silence | 1 |' in text
  assert [r['clips'] for r in rows['kind_differences']] == [
    'clean',
    'video: blur',
    'audio: noise',
    'audio: silence',
  ]
  json.dumps(rows, default=float)  # results.json
  lines, rows = experiments.ground_truth_sections(
    clips, each, str(tmp_path / 'absent.json'), 'IACA - no gate'
  )
  assert rows == {} and 'No ' in lines[0]


def test_replica_gate_aurocs_give_each_seeds_auroc_and_their_t_interval():
  rng = np.random.default_rng(6)
  base = random_clips(rng)
  kind = rng.random(base['end_frame'].shape)
  groups = {'clean': kind < 0.5, 'audio: noise': kind > 0.7}
  each = []
  for shift in (0.1, 0.2, 0.25):
    clips = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
    clips['gate_modality'] = rng.random(base['gate_modality'].shape)
    clips['gate_audio'] = rng.random(base['gate_audio'].shape)
    clips['gate_modality'][groups['audio: noise'], 0] -= shift
    each.append(clips)
  for clips in each:
    clips['score_audio'] = rng.random(base['end_frame'].shape)
  groups['audio: noise'][base['video_name'] == b'v2'] = False  # one video without such clips
  (row,) = gate_analysis.replica_gate_aurocs(each, groups, scores=('score_audio',))
  assert (row['clips'], row['n'], row['videos']) == ('audio: noise', int(groups['audio: noise'].sum()), 4)
  per_seed = [
    brute_force_auroc(c['score_audio'][groups['audio: noise']], c['score_audio'][groups['clean']])
    for c in each
  ]
  assert row['score_audio'][0] == pytest.approx(np.mean(per_seed))
  for key, column, label in (
    ('gate_modality', 0, 'stage-2 audio weight'),
    ('gate_audio', 1, 'stage-1 weight on the attended audio'),
  ):
    per_seed = [
      brute_force_auroc(c[key][..., column][groups['audio: noise']], c[key][..., column][groups['clean']])
      for c in each
    ]
    low, high = scipy.stats.t.interval(0.95, 2, loc=np.mean(per_seed), scale=scipy.stats.sem(per_seed))
    assert row[label] == pytest.approx((np.mean(per_seed), low, high))
  table = gate_analysis.replica_auroc_table([row], int(groups['clean'].sum()), 3)
  assert 'over 3 replicas (seeds)' in table and '| audio: noise |' in table


def test_the_claims_decide_each_kinds_difference_on_both_seed_sets(tmp_path, monkeypatch):
  import experiments  # noqa: PLC0415 - the entry point's helpers, without running it

  rng = np.random.default_rng(7)
  clips = dict(tiny_clips(), **{k: v for k, v in random_clips(rng, 3, 1, 4).items() if k != 'video_name'})
  clips['end_frame'] = tiny_clips()['end_frame']

  class Predicted:  # an Evaluator's per-replica clips, 4 replicas
    protocol, config = 'challenge', None

    def __init__(self, noise):
      self.each = [
        dict(clips, predictions=clips['frame_labels'] + rng.normal(0, noise, (3, 4, 2))) for _ in range(4)
      ]

    def predict_each(self, split):
      assert split == 'validation'
      return self.each

  results = [
    {'name': name, 'workdir': name, 'evaluator': Predicted(0.1 if overrides['gating'] == 'iaca' else 0.4)}
    for name, overrides in experiments.CLAIMS_VARIANTS
  ]
  forced = []

  def intervened(config, workdir, split, interceptor):  # the counterfactual runs of rjca_iaca
    forced.append(workdir)
    return Predicted(0.3).each

  monkeypatch.setattr(experiments.evaluate_lib, 'predict_each_intervened', intervened)
  path = tmp_path / 'corruptions.json'
  path.write_text(json.dumps({'format': 'synthetic_av_corruptions/1', 'seed': 0, 'videos': SIDECAR}))
  lines, rows = experiments.claims_gate_sections(results, str(path), 'validation', 'challenge')
  text = '\n'.join(lines)
  gated = [n for n, o in experiments.CLAIMS_VARIANTS if n.startswith('rjca_') and o['gating'] != 'none']
  assert list(rows['gate_aurocs']) == gated and all(f'### {n}' in text for n in gated)
  assert 'over 4 replicas (seeds)' in text
  labels = [r['label'] for r in rows['kind_differences']]
  assert (
    len(labels) == 3 * 4 and labels[0] == 'CA: IACA - no gate, clean (1 frames)'
  )  # one clip, scored at its end frame
  assert [len(r['sets']) for r in rows['kind_differences']] == [2] * 12
  assert '| seeds 0-1 | seeds 2-3 |' in text
  assert forced == ['rjca_iaca'] * len(experiments.STAGE2_AUDIO_SCALES)
  assert [r['label'] for r in rows['stage2_audio_scaled']][:2] == [
    'audio weight x 0.5, clean',
    'audio weight x 0.5, video: blur',
  ]
  json.dumps(rows, default=float)  # claims.json


def test_scaling_the_stage2_audio_weight_rescales_and_renormalises_the_modality_weights():
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415

  from iaca_jax.models import Attended, make_gate  # noqa: PLC0415

  rng = np.random.default_rng(8)
  audio, video = (rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(2))
  attended = Attended(audio, video, np.ones((2, 3)), np.ones((2, 3)), ((audio, video),))
  gate = make_gate('iaca', temperature=1.0)
  variables = gate.init(jax.random.key(0), audio, video, attended)
  fused, gates = gate.apply(variables, audio, video, attended)
  w = np.asarray(gates['modality'])
  for scale in (0.0, 0.5, 3.0):
    with nn.intercept_methods(gate_analysis.scale_stage2_audio(scale)):
      scaled_fused, scaled = gate.apply(variables, audio, video, attended)
    expected = np.stack([scale * w[..., 0], w[..., 1]], -1) / (scale * w[..., :1] + w[..., 1:])
    np.testing.assert_allclose(np.asarray(scaled['modality']), expected, rtol=1e-6)
    # Fused = [w_v * gated video, w_a * gated audio]: each half rescaled by its new weight.
    np.testing.assert_allclose(
      np.asarray(scaled_fused[..., 4:]),
      np.asarray(fused[..., 4:]) * expected[..., :1] / w[..., :1],
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(
      np.asarray(scaled_fused[..., :4]),
      np.asarray(fused[..., :4]) * expected[..., 1:] / w[..., 1:],
      rtol=1e-5,
      atol=1e-6,
    )


def test_the_why_table_gives_the_stage2_audio_weights_auroc_per_kind_and_variant():
  import experiments  # noqa: PLC0415 - the entry point's helpers, without running it

  row = lambda kind, value: {
    'clips': kind,
    'n': 5,
    'videos': 2,
    'stage-2 audio weight': (value, value - 0.1, value + 0.1),
  }
  table = experiments.stage2_audio_table(
    {
      'base': [row('audio: noise', 0.2), row('audio: inconsistent', 0.6)],
      'longer': [row('video: missing', 0.7)],
    }
  ).splitlines()
  assert table[0] == '| variant | audio: noise | audio: silence | audio: inconsistent | video: missing |'
  assert table[2] == '| base | 0.200 [0.100, 0.300] | - | 0.600 [0.500, 0.700] | - |'
  assert table[3] == '| longer | - | - | - | 0.700 [0.600, 0.800] |'
  config = experiments.demo_config('r', 2, training=dict(num_epochs=8), stage2_temperature=0.3)
  assert (config.training.num_epochs, config.model.stage2_temperature, config.replicas.count) == (8, 0.3, 2)
