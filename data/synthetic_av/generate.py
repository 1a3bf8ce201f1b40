r"""Generates the synthetic audio-visual emotion set in the Aff-Wild2 layout (docs/DESIGN.md §6-7).

    python -m data.synthetic_av.generate --out_dir=/tmp/synthetic_av_raw [--seed=0] \
        [--size=default|tiny] [--num_train_videos=36 ...] [--num_workers=2]

Writes, deterministically from the seed:
    cropped_aligned/<video>/<%05d>.jpg                       112x112 faces
    raw_videos/<recording>.mp4                               tiny video + AAC audio (PyAV)
    6th_ABAW_Annotations/VA_Estimation_Challenge/
        Train_Set/<video>.txt, Validation_Set/<video>.txt    "valence,arousal", -5 = invalid
        Test_Set.txt                                         the test list
    synthetic_ground_truth/Test_Set/<video>.txt              test labels (not read by the builder)
    corruptions.json                                         corrupted intervals per modality

The training split holds one `<rec>_left` / `<rec>_right` pair sharing the
audio of `raw_videos/<rec>.mp4`; the first validation video has its frame rate
in its name (`<rec>-24-640x360`, written at 24 fps). The output is written to
`<out_dir>.incomplete` and renamed when complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import time

import av
import numpy as np
import tqdm
from absl import app, flags, logging

from data.synthetic_av import render
from iaca_jax.preprocessing import corruptions as corruptions_lib
from iaca_jax.preprocessing import layout

ANNOTATION_ROOT = '6th_ABAW_Annotations'
GROUND_TRUTH_DIR = 'synthetic_ground_truth'
TEST_LIST = 'Test_Set.txt'


@dataclasses.dataclass(frozen=True)
class Settings:
  """Size and format of the generated set.

  Attributes:
    num_train_videos: annotated training crop videos (the `_left`/`_right`
      pair counts as two when this is >= 2).
    num_validation_videos: validation crop videos (the first has its fps in its name).
    num_test_videos: test videos (listed in the test list, labels kept aside).
    min_frames, max_frames: video length range (frames).
    fps: frame rate of the ordinary videos.
    named_fps: frame rate of the video with its fps in the name.
    sample_rate: audio rate written into the AAC track.
    jpeg_quality: of the face crops.
    raw_size: width and height of the (tiny) video stream of the raw videos.
    corrupt_every: one corrupted interval per modality per this many frames
      (at least one per video and modality).
    corrupt_frames: shortest and longest corrupted interval (frames).
    face_kinds, face_kind_probs: the face corruptions drawn, with their
      probabilities (None: uniform).
    audio_kinds, audio_kind_probs: the same for the audio.
    cross_cues: both modalities carry both dimensions strongly (render.py);
      False: valence mainly in the face, arousal mainly in the voice.
  """

  num_train_videos: int = 12
  num_validation_videos: int = 4
  num_test_videos: int = 3
  min_frames: int = 600
  max_frames: int = 1100
  fps: int = 30
  named_fps: int = 24
  sample_rate: int = 44_100
  jpeg_quality: int = 90
  raw_size: int = 32
  corrupt_every: int = 350
  corrupt_frames: tuple[int, int] = (40, 130)
  face_kinds: tuple[str, ...] = ('blur', 'occlusion', 'pose', 'missing')
  face_kind_probs: tuple[float, ...] | None = None
  audio_kinds: tuple[str, ...] = ('noise', 'silence')
  audio_kind_probs: tuple[float, ...] | None = (0.6, 0.4)
  cross_cues: bool = False


SIZES = {
  # Since issue 12 (docs/DATA.md, "The synthetic set"): many short videos (many identities, a
  # validation split large enough for a bootstrap over videos), both modalities carrying both
  # dimensions, more corrupted frames and an 'inconsistent' kind for voices.
  'default': Settings(
    num_train_videos=36,
    num_validation_videos=12,
    num_test_videos=1,
    min_frames=400,
    max_frames=512,
    corrupt_every=220,
    corrupt_frames=(40, 110),
    face_kind_probs=(0.25, 0.25, 0.25, 0.25),
    audio_kinds=('noise', 'silence', 'inconsistent'),
    audio_kind_probs=(0.3, 0.3, 0.4),
    cross_cues=True,
  ),
  # For tests: 3 train (the pair + 1), 2 validation (one at 24 fps), 1 test; the pre-issue-12 content.
  'tiny': Settings(
    num_train_videos=3, num_validation_videos=2, num_test_videos=1, min_frames=300, max_frames=360
  ),
}


@dataclasses.dataclass(frozen=True)
class Recording:
  """One raw video (one audio track) and the crop videos (people) it holds."""

  index: int
  name: str
  split: str
  fps: int
  num_frames: int
  people: tuple[str, ...]


def plan_recordings(settings: Settings, seed: int) -> list[Recording]:
  """Names, splits, lengths and frame rates of every recording."""
  rng = np.random.default_rng([seed, 0xC0FFEE])
  recs = []

  def add(split, people_fn, fps=settings.fps, name=None):
    index = len(recs)
    name = name or f'syn{index:03d}'
    n = int(rng.integers(settings.min_frames, settings.max_frames + 1))
    recs.append(Recording(index, name, split, fps, n, people_fn(name)))

  n_train = settings.num_train_videos
  if n_train >= 2:
    add('train', lambda r: (f'{r}_left', f'{r}_right'))
    n_train -= 2
  for _ in range(n_train):
    add('train', lambda r: (r,))
  for i in range(settings.num_validation_videos):
    if i == 0:
      name = f'syn{len(recs):03d}-{settings.named_fps}-640x360'
      add('validation', lambda r: (r,), fps=settings.named_fps, name=name)
    else:
      add('validation', lambda r: (r,))
  for _ in range(settings.num_test_videos):
    add('test', lambda r: (r,))
  return recs


def _intervals(rng, n, count, min_len, max_len, avoid=()):
  """Up to `count` disjoint [start, end] (1-based, inclusive) intervals avoiding `avoid`."""
  out = []
  for _ in range(count * 30):
    if len(out) == count:
      break
    length = int(rng.integers(min_len, max_len + 1))
    if length >= n - 2:
      break
    start = int(rng.integers(1, n - length + 1))
    end = start + length - 1
    if any(start <= e + 8 and s - 8 <= end for s, e in list(avoid) + out):
      continue
    out.append((start, end))
  return sorted(out)


def distractor_curves(seed: int, rec_index: int, person: int, num_frames: int, fps: int):
  """The (valence, arousal) curves an 'inconsistent' interval of this person follows, (num_frames,) each.

  Drawn like the true curves from a stream of their own, so that other draws do not move.
  """
  rng = np.random.default_rng([seed, 4, rec_index, person])
  valence = np.round(render.smooth_curve(rng, num_frames, fps), 4)
  return valence, np.round(render.smooth_curve(rng, num_frames, fps), 4)


def _draw_kinds(rng, intervals, kinds, probs):
  if probs is None:
    return [(s, e, str(rng.choice(kinds))) for s, e in intervals]
  return [(s, e, str(rng.choice(kinds, p=list(probs)))) for s, e in intervals]


def _mix(voices, turn):
  return voices[0] if len(voices) == 1 else (1 - turn) * voices[0] + turn * voices[1]


def _write_mp4(path, frames, audio, fps, sample_rate):
  with av.open(path, 'w') as c:
    vs = c.add_stream('mpeg4', rate=fps)
    vs.width, vs.height = frames[0].shape[1], frames[0].shape[0]
    vs.pix_fmt = 'yuv420p'
    ast = c.add_stream('aac', rate=sample_rate)
    ast.layout = 'mono'
    for img in frames:
      for p in vs.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
        c.mux(p)
    for p in vs.encode():
      c.mux(p)
    chunk = 1024
    for i in range(0, len(audio), chunk):
      fr = av.AudioFrame.from_ndarray(audio[None, i : i + chunk], format='fltp', layout='mono')
      fr.sample_rate = sample_rate
      fr.pts = i
      for p in ast.encode(fr):
        c.mux(p)
    for p in ast.encode():
      c.mux(p)


def _write_labels(path, valence, arousal, invalid):
  lines = ['valence,arousal']
  for v, a, bad in zip(valence, arousal, invalid):
    lines.append('-5,-5' if bad else f'{v:.4f},{a:.4f}')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def make_recording(rec: Recording, settings: Settings, seed: int, out_dir: str) -> dict:
  """Writes one recording (crops, raw video, labels); returns its sidecar entries."""
  rng = np.random.default_rng([seed, 1, rec.index])
  n, fps, sr = rec.num_frames, rec.fps, settings.sample_rate
  people = []
  for p, name in enumerate(rec.people):
    prng = np.random.default_rng([seed, 2, rec.index, p])
    valence = np.round(render.smooth_curve(prng, n, fps), 4)
    arousal = np.round(render.smooth_curve(prng, n, fps), 4)
    n_corrupt = max(1, int(round(n / settings.corrupt_every)))
    face = _draw_kinds(
      prng,
      _intervals(prng, n, n_corrupt, *settings.corrupt_frames),
      settings.face_kinds,
      settings.face_kind_probs,
    )
    invalid = _intervals(prng, n, int(prng.integers(1, 3)), 5, 40)
    people.append(
      dict(
        name=name,
        rng=prng,
        ident=render.random_identity(prng, settings.cross_cues),
        valence=valence,
        arousal=arousal,
        face=face,
        invalid=invalid,
        drift_x=render.smooth_walk(prng, n, 0.4, 3.0),
        drift_y=render.smooth_walk(prng, n, 0.3, 2.5),
        f0=float(prng.uniform(110, 230)),
      )
    )
  tilt = 1.0 if settings.cross_cues else 0.5
  for p_idx, p in enumerate(people):
    p['distractor'] = distractor_curves(seed, rec.index, p_idx, n, fps)
  # Audio: one voice per person (turn-taking for the pair), background noise, corruptions.
  num_samples = int(round(n / fps * sr))
  voices = [render.voice(p['rng'], p['valence'], p['arousal'], fps, sr, p['f0'], tilt) for p in people]
  turn = None
  if len(voices) > 1:
    turn = np.zeros(num_samples, np.float32)
    pos, who = 0, 0
    while pos < num_samples:
      length = int(rng.uniform(1.5, 5.0) * sr)
      turn[pos : pos + length] = who
      pos, who = pos + length, 1 - who
    turn = np.convolve(turn, np.ones(2205, np.float32) / 2205, mode='same')
  background = 10 ** (-52 / 20) * rng.standard_normal(num_samples).astype(np.float32)
  audio = _mix(voices, turn) + background
  busy = [(s, e) for p in people for s, e, _ in p['face']]
  n_corrupt = max(1, int(round(n / settings.corrupt_every)))
  audio_iv = _draw_kinds(
    rng,
    _intervals(rng, n, n_corrupt, *settings.corrupt_frames, avoid=busy),
    settings.audio_kinds,
    settings.audio_kind_probs,
  )
  other_audio = None
  if any(kind == 'inconsistent' for _, _, kind in audio_iv):
    # The same voices (pitch, phrasing) following the distractor curves: plausible speech that
    # disagrees with the face.
    other = [
      render.voice(np.random.default_rng([seed, 5, rec.index, i]), *p['distractor'], fps, sr, p['f0'], tilt)
      for i, p in enumerate(people)
    ]
    other_audio = _mix(other, turn) + background
  for s, e, kind in audio_iv:
    a0, a1 = int(round((s - 1) / fps * sr)), min(int(round(e / fps * sr)), num_samples)
    if kind == 'silence':
      audio[a0:a1] = 0.0
    elif kind == 'inconsistent':
      audio[a0:a1] = other_audio[a0:a1]
    else:
      audio[a0:a1] = render.noise_burst(rng, a1 - a0, sr)
  audio = np.clip(audio, -0.99, 0.99).astype(np.float32)

  # Faces.
  raw_frames = []
  ann_dir = os.path.join(out_dir, ANNOTATION_ROOT, layout.VA_DIR)
  for p_idx, p in enumerate(people):
    folder = os.path.join(out_dir, layout.CROPS_DIR, p['name'])
    os.makedirs(folder, exist_ok=True)
    kind_at = [None] * (n + 1)
    iv_at = [None] * (n + 1)
    for j, (s, e, kind) in enumerate(p['face']):
      for f in range(s, e + 1):
        kind_at[f], iv_at[f] = kind, j
    ident = p['ident']
    for f in range(1, n + 1):
      kind = kind_at[f]
      yaw = 0.08 * np.sin(2 * np.pi * f / (fps * 7.0) + p_idx)
      if kind == 'pose':
        yaw = 0.9 if iv_at[f] % 2 == 0 else -0.9
      valence, arousal = p['distractor'] if kind == 'inconsistent' else (p['valence'], p['arousal'])
      im = render.draw_face(
        ident,
        float(valence[f - 1]),
        float(arousal[f - 1]),
        float(p['drift_x'][f - 1]),
        float(p['drift_y'][f - 1]),
        yaw,
        settings.cross_cues,
      )
      if kind in ('blur', 'occlusion', 'pose'):
        # The same corruption parameters throughout one interval.
        im = render.corrupt_face(im, kind, np.random.default_rng([seed, 3, rec.index, p_idx, iv_at[f]]))
      if p_idx == 0:
        raw_frames.append(np.asarray(im.resize((settings.raw_size, settings.raw_size))))
      if kind != 'missing':
        im.save(os.path.join(folder, f'{f:05d}.jpg'), quality=settings.jpeg_quality)
    invalid = np.zeros(n, bool)
    for s, e in p['invalid']:
      invalid[s - 1 : e] = True
    if rec.split == 'test':
      path = os.path.join(out_dir, GROUND_TRUTH_DIR, 'Test_Set', p['name'] + '.txt')
    else:
      path = os.path.join(ann_dir, layout.SPLIT_DIRS[rec.split], p['name'] + '.txt')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_labels(path, p['valence'], p['arousal'], invalid)
  os.makedirs(os.path.join(out_dir, layout.RAW_VIDEOS_DIR), exist_ok=True)
  _write_mp4(os.path.join(out_dir, layout.RAW_VIDEOS_DIR, rec.name + '.mp4'), raw_frames, audio, fps, sr)
  iv = lambda s, e, k=None: dict(start=s, end=e, **({'kind': k} if k else {}))
  return {
    p['name']: dict(
      split=rec.split,
      num_frames=n,
      fps=float(fps),
      audio_source=rec.name,
      face=[iv(*x) for x in p['face']],
      audio=[iv(*x) for x in audio_iv],
      invalid_labels=[iv(*x) for x in p['invalid']],
    )
    for p in people
  }


def generate(
  out_dir: str,
  settings: Settings = SIZES['default'],
  seed: int = 0,
  *,
  num_workers: int = 1,
  overwrite: bool = False,
) -> dict:
  """Writes the whole set to `out_dir`; returns the sidecar's content.

  Raises:
    FileExistsError if `out_dir` exists and is not empty, unless `overwrite`.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f'{out_dir} exists and is not empty (use overwrite)')
  tmp = out_dir + '.incomplete'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  recs = plan_recordings(settings, seed)
  videos = {}
  start = time.time()
  bar = tqdm.tqdm(total=len(recs), desc='synthetic_av recordings', unit='rec')
  if num_workers > 1:
    with concurrent.futures.ProcessPoolExecutor(num_workers) as pool:
      futures = [pool.submit(make_recording, r, settings, seed, tmp) for r in recs]
      for fut in futures:
        videos.update(fut.result())
        bar.update()
  else:
    for r in recs:
      videos.update(make_recording(r, settings, seed, tmp))
      bar.update()
  bar.close()
  videos = dict(sorted(videos.items()))
  test_names = [v for v, d in videos.items() if d['split'] == 'test']
  with open(os.path.join(tmp, ANNOTATION_ROOT, layout.VA_DIR, TEST_LIST), 'w') as f:
    f.write(''.join(name + '\n' for name in test_names))
  sidecar = dict(
    format=corruptions_lib.FORMAT, seed=seed, settings=dataclasses.asdict(settings), videos=videos
  )
  with open(os.path.join(tmp, corruptions_lib.FILENAME), 'w') as f:
    json.dump(sidecar, f, indent=1)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  logging.info(
    'synthetic_av: %d crop videos, %d frames written to %s in %.1f s',
    len(videos),
    sum(d['num_frames'] for d in videos.values()),
    out_dir,
    time.time() - start,
  )
  return sidecar


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string('out_dir', None, 'Folder to write the set into.', required=True)
  flags.DEFINE_integer('seed', 0, 'Random seed: the set is a pure function of it and the sizes.')
  flags.DEFINE_enum('size', 'default', list(SIZES), 'Size preset; the flags below override it.')
  flags.DEFINE_integer('num_train_videos', None, 'Training crop videos (the pair counts as 2).')
  flags.DEFINE_integer('num_validation_videos', None, 'Validation crop videos.')
  flags.DEFINE_integer('num_test_videos', None, 'Test videos.')
  flags.DEFINE_integer('min_frames', None, 'Shortest video (frames).')
  flags.DEFINE_integer('max_frames', None, 'Longest video (frames).')
  flags.DEFINE_integer('sample_rate', None, 'Audio sample rate of the raw videos.')
  flags.DEFINE_integer('num_workers', 1, 'Processes writing recordings in parallel.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing, non-empty out_dir.')


def main(argv):
  del argv
  overrides = {
    k: FLAGS[k].value
    for k in (
      'num_train_videos',
      'num_validation_videos',
      'num_test_videos',
      'min_frames',
      'max_frames',
      'sample_rate',
    )
    if FLAGS[k].value is not None
  }
  settings = dataclasses.replace(SIZES[FLAGS.size], **overrides)
  generate(FLAGS.out_dir, settings, FLAGS.seed, num_workers=FLAGS.num_workers, overwrite=FLAGS.overwrite)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
