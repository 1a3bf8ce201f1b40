"""What evaluate.py does: restore a checkpoint, score a split, the missing-audio sweep, the
attention-score figure and the challenge submission file."""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from iaca_jax import evaluation, input_pipeline, metrics, train_lib
from iaca_jax.checkpoints import Checkpoints

MISSING_AUDIO_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def atomic_write(path: str, text: str) -> None:
  """Writes to a temporary name, then renames, so a crash never leaves a half-written file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


class Evaluator:
  """A restored model with its data source; `which` is 'best' or 'latest'."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, which: str = 'best'):
    self.config = config
    self.model = train_lib.build_model(config.model)
    self.trainer = train_lib.Trainer(self.model, train_lib.create_mesh())
    self.data = train_lib.DataConfig(config)
    tx = train_lib.make_optimizer(config, steps_per_epoch=1)
    state = train_lib.create_train_state(config, self.model, self.data, self.trainer, tx)
    checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
    restored = checkpoints.restore(train_lib.abstract_like(state, self.trainer.replicated), best=which == 'best')
    if restored is None:
      raise FileNotFoundError(f'No {which} checkpoint under {workdir}/checkpoints: train first '
                              f'(python train.py --workdir {workdir} ...).')
    self.state, self.meta = restored
    self.step = int(jax.device_get(self.state.step))
    checkpoints.close()

  def predict(self, split: str, **kwargs) -> dict:
    batches = self.data.eval_batches(self.config, split)
    if kwargs.get('silence_fraction', 0) > 0:
      kwargs.setdefault('silent_audio', self.data.silent_audio())
    return evaluation.predict_split(self.trainer, self.state, batches, **kwargs)


def metrics_table(scores: dict) -> str:
  groups = [('all frames', '')] + [(name.replace('_', ' '), f'{name}/') for name in
                                   ('clean_video', 'corrupt_video', 'clean_audio', 'corrupt_audio')
                                   if f'{name}/ccc_mean' in scores]
  lines = ['| frames | CCC_v | CCC_a | mean | n |', '|---|---|---|---|---|']
  for label, prefix in groups:
    lines.append(f'| {label} | {scores[prefix + "ccc_valence"]:.4f} | {scores[prefix + "ccc_arousal"]:.4f} | '
                 f'{scores[prefix + "ccc_mean"]:.4f} | {int(scores[prefix + "n_frames"])} |')
  return '\n'.join(lines) + '\n'


def evaluate_split(evaluator: Evaluator, split: str, output_dir: str) -> dict:
  scores = evaluation.score(evaluator.predict(split))
  atomic_write(os.path.join(output_dir, f'metrics_{split}.json'), json.dumps(scores, indent=1))
  atomic_write(os.path.join(output_dir, f'metrics_{split}.md'), metrics_table(scores))
  return scores


def missing_audio_sweep(evaluator: Evaluator, split: str, output_dir: str,
                        fractions: Sequence[float] = MISSING_AUDIO_FRACTIONS, seeds: Sequence[int] = (0, 1, 2),
                        label: str = 'model') -> dict:
  """CCC with the audio of a random share of the clips silenced (SPEC 5, the paper's Fig. 3)."""
  rows = []
  for fraction in fractions:
    runs = []
    for seed in seeds:
      clips = evaluator.predict(split, silence_fraction=fraction, seed=seed)
      runs.append(evaluation.score(clips))
      runs[-1]['silenced_share'] = float(clips['silenced'][clips['end_frame'] > 0].mean())
    rows.append({'fraction': fraction, 'seeds': list(seeds), **{
        f'{k}_{stat}': float(fn([r[k] for r in runs])) for k in ('ccc_valence', 'ccc_arousal', 'ccc_mean',
                                                                   'silenced_share')
        for stat, fn in (('mean', np.mean), ('std', np.std))}})
  result = {'label': label, 'split': split, 'rows': rows}
  atomic_write(os.path.join(output_dir, 'missing_audio.json'), json.dumps(result, indent=1))
  atomic_write(os.path.join(output_dir, 'missing_audio.md'), missing_audio_table([result]))
  plot_missing_audio([result], os.path.join(output_dir, 'missing_audio.png'))
  return result


def missing_audio_table(results: Sequence[dict]) -> str:
  lines = ['| model | silenced clips | CCC_v | CCC_a | mean |', '|---|---|---|---|---|']
  for result in results:
    for row in result['rows']:
      lines.append(f'| {result["label"]} | {100 * row["fraction"]:.0f}% | '
                   f'{row["ccc_valence_mean"]:.4f} ± {row["ccc_valence_std"]:.4f} | '
                   f'{row["ccc_arousal_mean"]:.4f} ± {row["ccc_arousal_std"]:.4f} | {row["ccc_mean_mean"]:.4f} |')
  return '\n'.join(lines) + '\n'


GATE_COLUMNS = (('gate_modality', 0, 'stage-2 audio weight'),
                ('gate_audio', 1, 'stage-1 weight on the attended audio'),
                ('gate_video', 1, 'stage-1 weight on the attended video'))


def gate_summary(clips: dict) -> list[dict]:
  """Mean gate values over real clips, for clean clips and for clips with a corrupted modality.

  clips: `evaluation.predict_split` output: `gate_*` (N, L, K) weights, `corrupt_audio` /
  `corrupt_video` (N, L) flags, `end_frame` (N, L) (0 = padding). Returns one row per clip group with
  the mean of each gate column that the model has (GATE_COLUMNS) and the clip count n.
  """
  real = clips['end_frame'] > 0
  corrupt_audio, corrupt_video = clips['corrupt_audio'].astype(bool), clips['corrupt_video'].astype(bool)
  groups = (('both clean', real & ~corrupt_audio & ~corrupt_video), ('audio corrupted', real & corrupt_audio),
            ('video corrupted', real & corrupt_video))
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
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
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
  fig.savefig(path + '.tmp.png', dpi=120)
  plt.close(fig)
  os.replace(path + '.tmp.png', path)


def _find_window(config, video: str, split: str) -> dict:
  """The first window of `video` in the source shards (faces and log-mels) whose clips are all real."""
  batches = input_pipeline.create_eval_dataset(
      config.dataset.name, config.dataset.data_dir, global_batch_size=1, split=split,
      features=['video', 'audio', 'video_name', 'end_frame'], process_index=0, process_count=1)
  fallback = None
  for batch in batches:
    if batch['video_name'][0].decode() != video:
      if fallback is not None:
        break
      continue
    window = {k: v[0] for k, v in batch.items()}
    if fallback is None:
      fallback = window
    if np.all(window['end_frame'] > 0) and window['end_frame'][0] > 1:
      return window
  if fallback is None:
    raise KeyError(f'Video {video!r} is not in the {split} split of {config.dataset.name}.')
  return fallback


def attention_figure(evaluator: Evaluator, video: str, split: str, output_dir: str,
                     clips: dict | None = None) -> str:
  """Faces, the spectrogram, and per-clip cross-attention scores of each modality, min-max normalised
  to [0, 1] and drawn as two heat strips (the paper's Fig. 1); the stage-2 gate below when present.
  `clips`: the split's predictions when the caller already has them."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  window = _find_window(evaluator.config, video, split)
  clips = evaluator.predict(split) if clips is None else clips
  names = np.array([n.decode() for n in clips['video_name']])
  rows = np.flatnonzero((names == video) & np.all(clips['end_frame'] == window['end_frame'], axis=1))
  if rows.size == 0:
    raise KeyError(f'No prediction for the chosen window of {video!r}.')
  row = rows[0]
  minmax = lambda x: (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
  strips = {'visual attention': minmax(clips['score_video'][row]), 'audio attention': minmax(clips['score_audio'][row])}
  if 'gate_modality' in clips:
    strips['stage-2 audio weight'] = clips['gate_modality'][row][:, 0]
  faces = window['video'][:, -1] * np.array(input_pipeline.KINETICS_STD) + np.array(input_pipeline.KINETICS_MEAN)
  height = [1.2, 1.0] + [0.35] * len(strips)
  fig, axes = plt.subplots(len(height), 1, figsize=(12, sum(height) + 0.8), gridspec_kw={'height_ratios': height})
  axes[0].imshow(np.concatenate(list(np.clip(faces, 0, 1)), axis=1))
  real = window['end_frame'][window['end_frame'] > 0]
  axes[0].set_title(f'{video}: clips ending at frames {real.min()}-{real.max()} (last frame of each clip shown)')
  axes[1].imshow(np.concatenate(list(window['audio']), axis=1), aspect='auto', origin='lower', cmap='magma')
  axes[1].set_ylabel('mel')
  for ax, (name, values) in zip(axes[2:], strips.items()):
    ax.imshow(values[None], aspect='auto', cmap='viridis', vmin=0, vmax=1)
    ax.set_yticks([0], [name])
  for ax in axes:
    ax.set_xticks([])
  fig.tight_layout()
  path = os.path.join(output_dir, f'attention_{video}.png')
  fig.savefig(path + '.tmp.png', dpi=110)
  plt.close(fig)
  os.replace(path + '.tmp.png', path)
  return path


def write_submission(evaluator: Evaluator, split: str, output_dir: str) -> str:
  """The challenge file: `image_location,valence,arousal`, one post-processed row per frame."""
  videos = evaluation.to_frames(evaluator.predict(split))
  lines = ['image_location,valence,arousal']
  for name in sorted(videos):
    predictions = videos[name]['predictions']
    if np.isnan(predictions).any():
      raise ValueError(f'Video {name}: {int(np.isnan(predictions).any(-1).sum())} frames have no prediction.')
    smoothed = metrics.postprocess_video_predictions(predictions)
    lines += [f'{name}/{i + 1:05d}.jpg,{v:.6f},{a:.6f}' for i, (v, a) in enumerate(smoothed)]
  path = os.path.join(output_dir, f'submission_{split}.csv')
  atomic_write(path, '\n'.join(lines) + '\n')
  return path
