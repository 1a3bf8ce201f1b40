"""The gates against the synthetic set's ground truth, per kind of corruption (`corruptions.json`).

- `clip_groups`: the clean clips and the clips corrupted in each way (video: blur, occlusion, pose,
  missing; audio: noise, silence, inconsistent), read from the sidecar by (video, end frame);
- `gate_aurocs`: how well each gate output separates the clips of each kind from the clean clips
  (AUROC, with a percentile bootstrap over videos);
- `replica_gate_aurocs`: the same AUROCs of every replica (seed), with their t-interval over seeds;
- `kind_differences`: the paired CCC difference of two variants over the frames of each kind, over
  their shared seeds;
- `scale_stage2_audio`: an interceptor that forces the stage-2 audio weight up or down, to measure
  what the loss makes of a gate that moved it (`evaluate_lib.predict_each_intervened`).

The examples carry only one flag per modality (`corrupt_video`, `corrupt_audio`), so the kind of a
clip comes from the sidecar with the build's rule (`corruptions.clip_corrupt`: at least half of
the clip's 32 frames in intervals of that kind); the flags the sidecar gives must equal the
examples', which catches the sidecar of another set. A clip is clean when none of its 32 frames lies
in a corrupted interval of either modality (clips corrupted only in part belong to no group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import scipy.stats

from iaca_jax import metrics, reports, stats
from iaca_jax.preprocessing import corruptions, windows

CLEAN = 'clean'
# (the clip flag's modality, the sidecar's key, its kinds)
MODALITIES = (('video', 'face', corruptions.FACE_KINDS), ('audio', 'audio', corruptions.AUDIO_KINDS))
CORRUPT_FRAMES = corruptions.CLIP_CORRUPT_FRACTION * windows.FRAMES_PER_CLIP


def scale_stage2_audio(scale: float):
  """A `flax.linen.intercept_methods` interceptor: every stage-2 modality weight pair [w_a, w_v]
  (`_Gate.modality_weights`) becomes [s w_a, w_v] / (s w_a + w_v)."""

  def interceptor(next_fun, args, kwargs, context):
    weights = next_fun(*args, **kwargs)
    if context.method_name != 'modality_weights':
      return weights
    audio, video = weights[..., :1] * scale, weights[..., 1:]
    return jnp.concatenate([audio, video], axis=-1) / (audio + video)

  return interceptor


def mann_whitney_u(positive: np.ndarray, negative: np.ndarray) -> float:
  """The pairs (p, n) with p > n, ties counted half, from the ranks of the pooled scores: the sum of
  the positives' (average) ranks minus its least possible value P (P + 1) / 2."""
  positive, negative = np.ravel(positive), np.ravel(negative)
  ranks = scipy.stats.rankdata(np.concatenate([positive, negative]))
  return float(ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve of `scores` for the boolean labels `positive` (same shape): the share
  of (positive, negative) pairs ranked the right way, ties half. NaN without both classes."""
  scores, positive = np.ravel(scores), np.ravel(positive).astype(bool)
  pairs = positive.sum() * (~positive).sum()
  return mann_whitney_u(scores[positive], scores[~positive]) / pairs if pairs else float('nan')


def _names(clips: Mapping[str, np.ndarray]) -> np.ndarray:
  return np.array([n.decode() if isinstance(n, bytes) else str(n) for n in clips['video_name']])


def frames_in(intervals: Sequence[dict], num_frames: int, end_frames: np.ndarray) -> np.ndarray:
  """How many of the 32 frames of each clip ending at `end_frames` (1-based, any shape) lie in
  `intervals`; 0 for an end frame outside 1..num_frames (as `corruptions.clip_corrupt`)."""
  inside = np.concatenate([[0], np.cumsum(corruptions.frame_mask(intervals, num_frames))])
  end = np.asarray(end_frames)
  within = (end >= 1) & (end <= num_frames)
  end = np.where(within, end, 0)
  return np.where(within, inside[end] - inside[np.maximum(end - windows.FRAMES_PER_CLIP, 0)], 0)


def clip_groups(clips: Mapping[str, np.ndarray], sidecar: Mapping[str, dict]) -> dict[str, np.ndarray]:
  """{'clean': (N, L) bool, 'video: blur': (N, L) bool, ...}: the real clips of each group, the kinds
  in MODALITIES order, those without a clip left out. Clips silenced by the missing-audio sweep
  (`silenced`) are in no group.

  clips: `inference.predict_split` output of one model (`video_name` (N,), `end_frame` (N, L),
  `corrupt_video` / `corrupt_audio` (N, L)); sidecar: `corruptions.read_corruptions` of its set.
  """
  names, end = _names(clips), np.asarray(clips['end_frame'])
  real = (end > 0) & ~np.asarray(clips.get('silenced', np.zeros(end.shape, bool)), bool)
  absent = sorted(set(names) - set(sidecar))
  if absent:
    raise ValueError(f'clip_groups: videos {", ".join(absent[:3])} are not in the corruption sidecar')
  touched = np.zeros(end.shape, bool)
  groups = {}
  for modality, key, kinds in MODALITIES:
    counts = {kind: np.zeros(end.shape, int) for kind in (None, *kinds)}  # None: any kind
    for video in np.unique(names):
      rows, entry = names == video, sidecar[video]
      for kind in counts:
        chosen = [iv for iv in entry.get(key, []) if kind is None or iv['kind'] == kind]
        counts[kind][rows] = frames_in(chosen, entry['num_frames'], end[rows])
    flags = np.asarray(clips[f'corrupt_{modality}'], bool)
    wrong = real & (flags != (counts[None] >= CORRUPT_FRAMES))
    if wrong.any():
      raise ValueError(
        f'clip_groups: the sidecar flags {int(wrong.sum())} clips otherwise than their corrupt_{modality}; '
        'is it the corruptions.json of this set?'
      )
    touched |= counts[None] > 0
    groups.update({f'{modality}: {kind}': real & (counts[kind] >= CORRUPT_FRAMES) for kind in kinds})
  groups = {CLEAN: real & ~touched, **{g: m for g, m in groups.items() if m.any()}}
  return groups


def gate_columns(clips: Mapping[str, np.ndarray]) -> list[tuple[str, int, str]]:
  """(key, column, label) of each gate output of a model's clips: those of reports.GATE_COLUMNS in its
  order (one column per two-way softmax: the other is its complement), then the other gates' columns."""
  named = [column for column in reports.GATE_COLUMNS if column[0] in clips]
  others = sorted(k for k in clips if k.startswith('gate_') and k not in {key for key, _, _ in named})
  for key in (*(key for key, _, _ in named), *others):
    if np.ndim(clips[key]) != 3:
      raise ValueError(f'gate_columns: {key} is {np.shape(clips[key])}, not (N, L, K): pick one replica')
  columns = list(named)
  for key in others:
    width = clips[key].shape[-1]
    columns += [(key, j, f'{key[5:]} weight {j}') for j in ([1] if width == 2 else range(width))]
  return columns


def video_pair_counts(
  scores: np.ndarray, video: np.ndarray, positive: np.ndarray, negative: np.ndarray, num_videos: int
) -> np.ndarray:
  """(V, V): entry (v, u) is the Mann-Whitney count of the positives of video v against the negatives
  of video u. scores, video (index in 0..V-1), positive, negative: per clip, the same shape."""
  counts = np.zeros((num_videos, num_videos))
  for v in np.unique(video[positive]):
    for u in np.unique(video[negative]):
      counts[v, u] = mann_whitney_u(scores[positive & (video == v)], scores[negative & (video == u)])
  return counts


def auroc_over_videos(
  scores: np.ndarray,
  video: np.ndarray,
  positive: np.ndarray,
  negative: np.ndarray,
  *,
  resamples: int = 2000,
  seed: int = 0,
) -> tuple[float, float, float]:
  """(AUROC of the `positive` clips against the `negative` ones, low, high): `stats.bootstrap_videos`,
  a resample repeating a video's clips as often as it draws the video (resamples without both
  classes left out). scores, video (index 0..V-1), positive, negative: per clip, the same shape."""
  num_videos = int(video.max()) + 1
  pairs = video_pair_counts(scores, video, positive, negative, num_videos)
  num_positive = np.bincount(video[positive], minlength=num_videos)
  num_negative = np.bincount(video[negative], minlength=num_videos)

  def statistic(idx: np.ndarray) -> float:
    # A pair's count enters as often as both its videos are drawn: (draws of v) x (draws of u).
    drawn = np.bincount(idx, minlength=num_videos)
    total = (drawn @ num_positive) * (drawn @ num_negative)
    return float(drawn @ pairs @ drawn / total) if total else float('nan')

  return stats.bootstrap_videos(statistic, num_videos, resamples=resamples, seed=seed, omit_undefined=True)


def gate_aurocs(
  clips: Mapping[str, np.ndarray], groups: Mapping[str, np.ndarray], *, resamples: int = 2000, seed: int = 0
) -> list[dict]:
  """Per group of `clip_groups` but the clean one: its clip and video counts (`n`, `videos`) and per
  gate column label (`gate_columns`) the (AUROC, low, high) of that gate value separating the group's
  clips from the clean clips; above 0.5 the gate value is higher on the corrupted clips."""
  names = _names(clips)
  video = np.broadcast_to(np.unique(names, return_inverse=True)[1][:, None], clips['end_frame'].shape)
  rows = []
  for group, selected in groups.items():
    if group == CLEAN:
      continue
    row = {'clips': group, 'n': int(selected.sum()), 'videos': int(np.unique(video[selected]).size)}
    for key, index, label in gate_columns(clips):
      scores = np.asarray(clips[key][..., index], np.float64)
      row[label] = auroc_over_videos(scores, video, selected, groups[CLEAN], resamples=resamples, seed=seed)
    rows.append(row)
  return rows


def replica_gate_aurocs(
  each: Sequence[Mapping[str, np.ndarray]], groups: Mapping[str, np.ndarray], scores: Sequence[str] = ()
) -> list[dict]:
  """As `gate_aurocs`, from every replica's clips (`each`, the same windows): per gate column label
  the mean AUROC over the replicas and its 95% t-interval (the spread over seeds, where
  `gate_aurocs` gives one model's spread over videos). `scores`: other per-clip values (N, L) to
  treat alike, e.g. the cross-attention's `score_audio`."""
  rows = []
  for group, selected in groups.items():
    if group == CLEAN:
      continue
    scored = selected | groups[CLEAN]
    row = {
      'clips': group,
      'n': int(selected.sum()),
      'videos': int(np.unique(_names(each[0])[selected.any(-1)]).size),
    }
    columns = [(key, (Ellipsis, index), label) for key, index, label in gate_columns(each[0])]
    for key, at, label in columns + [(key, Ellipsis, key) for key in scores]:
      values = [auroc(np.asarray(c[key])[at][scored], selected[scored]) for c in each]
      row[label] = stats.t_interval(values)
    rows.append(row)
  return rows


def _auroc_rows(rows: Sequence[dict], caption: str) -> str:
  labels = [k for k in (rows[0] if rows else {}) if k not in ('clips', 'n', 'videos')]
  if not labels:
    return ''
  lines = [
    caption + ' Above 0.5 the value is higher on the corrupted clips, below 0.5 lower; 0.5 does not '
    'separate them.',
    '',
    '| corruption | clips | videos | ' + ' | '.join(labels) + ' |',
    '|---' * (len(labels) + 3) + '|',
  ]
  for row in rows:
    cells = ' | '.join(stats.format_interval(*row[label]) for label in labels)
    lines.append(f'| {row["clips"]} | {row["n"]} | {row["videos"]} | {cells} |')
  return '\n'.join(lines) + '\n'


def gate_auroc_table(rows: Sequence[dict], clean: int, resamples: int = 2000) -> str:
  """`gate_aurocs` rows as a Markdown table ('' without rows or gates); `clean`: the clean clips."""
  return _auroc_rows(
    rows,
    f'AUROC of each gate value separating the clips corrupted in one way from the {clean} clean clips '
    '(none of their 32 frames corrupted in either modality), with the 95% percentile interval of a '
    f'bootstrap over the validation videos ({resamples} resamples).',
  )


def replica_auroc_table(rows: Sequence[dict], clean: int, replicas: int) -> str:
  """`replica_gate_aurocs` rows as a Markdown table."""
  return _auroc_rows(
    rows,
    f'AUROC of each gate value separating the clips corrupted in one way from the {clean} clean clips '
    f'(none of their 32 frames corrupted in either modality): mean [95% t-interval] over {replicas} '
    'replicas (seeds).',
  )


def frame_subsets(
  clips: Mapping[str, np.ndarray], groups: Mapping[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
  """{group: {video: (n,) bool}}: the frames whose clip (the clip ending on the frame, as
  `metrics.clips_to_frames` assigns predictions) is in the group; n = the video's last end frame."""
  names, end = _names(clips), np.asarray(clips['end_frame'])
  real = end > 0
  lengths = {video: int(end[names == video].max()) for video in np.unique(names)}
  subsets = {}
  for group, selected in groups.items():
    subsets[group] = {video: np.zeros(n, bool) for video, n in lengths.items()}
    for video in lengths:
      rows = (names == video)[:, None] & real & selected
      subsets[group][video][end[rows] - 1] = True
  return subsets


def kind_scores(
  clips: Mapping[str, np.ndarray], groups: Mapping[str, np.ndarray], protocol: str = 'challenge'
) -> dict[str, float]:
  """`metrics.frame_ccc` of one model's clips with `<group>/ccc_mean` (etc.) over each group's frames."""
  videos = metrics.clips_to_frames(clips)
  return metrics.frame_ccc(
    {n: v['predictions'] for n, v in videos.items()},
    {n: v['labels'] for n, v in videos.items()},
    subsets=frame_subsets(clips, groups),
    protocol=protocol,
  )


def kind_differences(
  variant: Sequence[Mapping[str, np.ndarray]],
  baseline: Sequence[Mapping[str, np.ndarray]],
  groups: Mapping[str, np.ndarray],
  protocol: str = 'challenge',
) -> list[dict]:
  """Per group of `clip_groups`: `stats.paired_difference` of the mean CCC over the group's frames,
  replica k of `variant` against replica k of `baseline` (the same seed), with the scored frame
  count `frames` and the verdict. variant, baseline: per replica, the clips of the same split."""
  for clips in (*variant, *baseline):
    same = np.array_equal(clips['end_frame'], variant[0]['end_frame'])
    if not same or not np.array_equal(_names(clips), _names(variant[0])):
      raise ValueError('kind_differences: the clips are not of the same windows; score the same split')
  scores = {
    side: [kind_scores(c, groups, protocol) for c in each] for side, each in (('a', variant), ('b', baseline))
  }
  rows = []
  for group in groups:
    key = f'{group}/ccc_mean'
    diff = stats.paired_difference([s[key] for s in scores['a']], [s[key] for s in scores['b']])
    frames = int(scores['a'][0][f'{group}/n_frames'])
    rows.append(dict(diff, clips=group, frames=frames, verdict=stats.verdict(diff['low'], diff['high'])))
  return rows


def kind_difference_table(rows: Sequence[dict], label: str) -> str:
  """`kind_differences` rows as a Markdown table; `label` names the difference ('IACA - no gate')."""
  lines = [
    f'Paired difference {label} of the mean CCC over the frames whose clip is corrupted in one way '
    '(at least 16 of its 32 frames) or clean (none), over the shared seeds: mean [95% t-interval].',
    '',
    '| corruption | frames | difference | p (paired t) | replicas | at 95% |',
    '|---|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["clips"]} | {row["frames"]} | '
      f'{stats.format_interval(row["mean"], row["low"], row["high"], signed=True)} | {row["p"]:.3f} | '
      f'{row["n"]} | {row["verdict"]} |'
    )
  return '\n'.join(lines) + '\n'
