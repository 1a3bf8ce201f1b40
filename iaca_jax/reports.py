"""Reports of evaluation results: Markdown tables and figures (no model, no data reading here)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')  # files only, never a screen

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iaca_jax import stats  # noqa: E402
from iaca_jax.fileio import atomic_savefig  # noqa: E402
from iaca_jax.input_pipeline import KINETICS_MEAN, KINETICS_STD  # noqa: E402


def metrics_table(scores: dict) -> str:
  groups = [('all frames', '')] + [
    (name.replace('_', ' '), f'{name}/')
    for name in ('clean_video', 'corrupt_video', 'clean_audio', 'corrupt_audio')
    if f'{name}/ccc_mean' in scores
  ]
  lines = ['| frames | CCC_v | CCC_a | mean | n |', '|---|---|---|---|---|']
  for label, prefix in groups:
    lines.append(
      f'| {label} | {scores[prefix + "ccc_valence"]:.4f} | {scores[prefix + "ccc_arousal"]:.4f} | '
      f'{scores[prefix + "ccc_mean"]:.4f} | {int(scores[prefix + "n_frames"])} |'
    )
  return '\n'.join(lines) + '\n'


def replica_table(per_replica: Sequence[dict]) -> str:
  """Each replica's CCC (all frames and the corrupted subsets) and a last row with the mean and its
  95% t-interval over the K replicas."""
  columns = [('CCC_v', 'ccc_valence'), ('CCC_a', 'ccc_arousal'), ('mean', 'ccc_mean')] + [
    (f'mean, {name.replace("_", " ")}', f'{name}/ccc_mean')
    for name in ('corrupt_video', 'corrupt_audio')
    if f'{name}/ccc_mean' in per_replica[0]
  ]
  lines = [
    f'Mean and 95% t-interval over {len(per_replica)} replicas (seeds) in the last row.',
    '',
    '| replica | ' + ' | '.join(c for c, _ in columns) + ' |',
    '|---' * (len(columns) + 1) + '|',
  ]
  for k, scores in enumerate(per_replica):
    lines.append(f'| {k} | ' + ' | '.join(f'{scores[key]:.4f}' for _, key in columns) + ' |')
  summary = [stats.format_interval(*stats.t_interval([s[key] for s in per_replica])) for _, key in columns]
  lines.append('| mean [95% CI] | ' + ' | '.join(summary) + ' |')
  return '\n'.join(lines) + '\n'


def missing_audio_table(results: Sequence[dict]) -> str:
  """One row per model and share of silenced clips: mean ± std over the silencing seeds, or with
  replicas the mean and its 95% t-interval over replicas."""
  with_replicas = any('ccc_mean_low' in row for result in results for row in result['rows'])
  lines = ['| model | silenced clips | CCC_v | CCC_a | mean |', '|---|---|---|---|---|']
  if with_replicas:
    lines.insert(0, "Mean [95% t-interval over replicas] of each replica's mean over the silencing seeds.\n")
  for result in results:
    for row in result['rows']:
      if with_replicas:
        cells = [
          stats.format_interval(row[f'{k}_mean'], row.get(f'{k}_low', np.nan), row.get(f'{k}_high', np.nan))
          for k in ('ccc_valence', 'ccc_arousal', 'ccc_mean')
        ]
      else:
        cells = [
          f'{row["ccc_valence_mean"]:.4f} ± {row["ccc_valence_std"]:.4f}',
          f'{row["ccc_arousal_mean"]:.4f} ± {row["ccc_arousal_std"]:.4f}',
          f'{row["ccc_mean_mean"]:.4f}',
        ]
      lines.append(f'| {result["label"]} | {100 * row["fraction"]:.0f}% | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


GATE_COLUMNS = (
  ('gate_modality', 0, 'stage-2 audio weight'),
  ('gate_audio', 1, 'stage-1 weight on the attended audio'),
  ('gate_video', 1, 'stage-1 weight on the attended video'),
)


def gate_summary(clips: dict) -> list[dict]:
  """Mean gate values over real clips, for clean clips and for clips with a corrupted modality.

  clips: `inference.predict_split` output: `gate_*` (N, L, K) weights, `corrupt_audio` /
  `corrupt_video` (N, L) flags, `end_frame` (N, L) (0 = padding). Returns one row per clip group with
  the mean of each gate column that the model has (GATE_COLUMNS) and the clip count n.
  """
  real = clips['end_frame'] > 0
  corrupt_audio, corrupt_video = clips['corrupt_audio'].astype(bool), clips['corrupt_video'].astype(bool)
  groups = (
    ('both clean', real & ~corrupt_audio & ~corrupt_video),
    ('audio corrupted', real & corrupt_audio),
    ('video corrupted', real & corrupt_video),
  )
  rows = []
  for name, selected in groups:
    row = {'clips': name, 'n': int(selected.sum())}
    for key, index, label in GATE_COLUMNS:
      if key in clips and row['n']:
        row[label] = float(clips[key][..., index][selected].mean())
    rows.append(row)
  return rows


def gate_table(clips: dict) -> str:
  """`gate_summary` as a Markdown table ('' for a model without stage-1/stage-2 gates)."""
  rows = gate_summary(clips)
  labels = [label for key, _, label in GATE_COLUMNS if key in clips]
  if not labels:
    return ''
  lines = ['| clips | ' + ' | '.join(labels) + ' | n |', '|---' * (len(labels) + 2) + '|']
  for row in rows:
    values = ' | '.join(f'{row[label]:.3f}' if label in row else '-' for label in labels)
    lines.append(f'| {row["clips"]} | {values} | {row["n"]} |')
  return '\n'.join(lines) + '\n'


def plot_missing_audio(results: Sequence[dict], path: str) -> None:
  """Valence and arousal CCC against the share of silenced clips, one line per model (Fig. 3 style)."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
  for ax, dim in zip(axes, ('valence', 'arousal')):
    for result in results:
      x = [100 * r['fraction'] for r in result['rows']]
      y = [r[f'ccc_{dim}_mean'] for r in result['rows']]
      err = [r[f'ccc_{dim}_std'] for r in result['rows']]
      ax.errorbar(x, y, yerr=err, marker='o', capsize=3, label=result['label'])
    ax.set_title(f'{dim.capitalize()}')
    ax.set_xlabel('clips with missing audio (%)')
    ax.set_ylabel('CCC')
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


def attention_figure(window: dict, clips: dict, video: str, path: str) -> str:
  """Faces, the spectrogram, and per-clip cross-attention scores of each modality, min-max normalised
  to [0, 1] and drawn as two heat strips (the paper's Fig. 1); the stage-2 gate below when present.

  window: one window of `video` from the source shards ('video' (16, 8, H, W, 3) normalised faces,
  'audio' (16, 64, frames), 'end_frame' (16,)); clips: `inference.predict_split` output of its split.
  """
  names = np.array([n.decode() for n in clips['video_name']])
  rows = np.flatnonzero((names == video) & np.all(clips['end_frame'] == window['end_frame'], axis=1))
  if rows.size == 0:
    raise ValueError(f'No prediction for the chosen window of {video!r}.')
  row = rows[0]
  minmax = lambda x: (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
  strips = {
    'visual attention': minmax(clips['score_video'][row]),
    'audio attention': minmax(clips['score_audio'][row]),
  }
  if 'gate_modality' in clips:
    strips['stage-2 audio weight'] = clips['gate_modality'][row][:, 0]
  faces = window['video'][:, -1] * np.array(KINETICS_STD) + np.array(KINETICS_MEAN)
  height = [1.2, 1.0] + [0.35] * len(strips)
  fig, axes = plt.subplots(
    len(height), 1, figsize=(12, sum(height) + 0.8), gridspec_kw={'height_ratios': height}
  )
  axes[0].imshow(np.concatenate(list(np.clip(faces, 0, 1)), axis=1))
  real = window['end_frame'][window['end_frame'] > 0]
  axes[0].set_title(
    f'{video}: clips ending at frames {real.min()}-{real.max()} (last frame of each clip shown)'
  )
  axes[1].imshow(np.concatenate(list(window['audio']), axis=1), aspect='auto', origin='lower', cmap='magma')
  axes[1].set_ylabel('mel')
  for ax, (name, values) in zip(axes[2:], strips.items()):
    ax.imshow(values[None], aspect='auto', cmap='viridis', vmin=0, vmax=1)
    ax.set_yticks([0], [name])
  for ax in axes:
    ax.set_xticks([])
  fig.tight_layout()
  atomic_savefig(fig, path, dpi=110)
  plt.close(fig)
  return path
