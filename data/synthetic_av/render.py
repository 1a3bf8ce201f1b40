"""Procedural faces and speech-like audio for the synthetic set (docs/DESIGN.md §7).

By default valence lives mainly in the face (mouth curvature) and weakly in the
voice (spectral tilt); arousal lives mainly in the voice (loudness, pitch,
syllable rate) and weakly in the face (eye and brow opening, mouth opening).
With `cross_cues` (the 'default' preset since issue 12) each modality carries
both: the face adds strong arousal cues (eye and brow opening, mouth opening,
cheek flush) and the voice a strong valence cue (spectral tilt), so that either
modality alone can carry both dimensions while the other is corrupted.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 112


# ------------------------------------------------------------------ curves
def smooth_curve(
  rng: np.random.Generator, num_frames: int, fps: float, max_hz: float = 0.2, amplitude: float = 0.85
) -> np.ndarray:
  """A smooth random curve in [-amplitude, amplitude], one value per frame."""
  t = np.arange(num_frames) / fps
  x = np.zeros(num_frames)
  for _ in range(5):
    f = rng.uniform(0.01, max_hz)
    x += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
  x += rng.uniform(-0.8, 0.8)  # per-video offset
  x = np.tanh(1.2 * x / (np.std(x) + 1e-6))
  return (amplitude * x).astype(np.float32)


def smooth_walk(rng: np.random.Generator, n: int, step: float, limit: float) -> np.ndarray:
  """A bounded, smoothed random walk (head drift)."""
  x = np.cumsum(rng.normal(0, step, n))
  x = np.convolve(x, np.ones(9) / 9, mode='same')
  return np.clip(x - x.mean(), -limit, limit)


# ------------------------------------------------------------------- faces
@dataclasses.dataclass(frozen=True)
class Identity:
  """Per-person appearance (varies per video)."""

  skin: tuple[int, int, int]
  background: tuple[int, int, int]
  hair: tuple[int, int, int]
  lips: tuple[int, int, int]
  cx: float
  cy: float
  rx: float
  ry: float
  eye_dx: float  # eye distance from the centre, fraction of rx
  mouth_w: float  # mouth half-width, fraction of rx


def random_identity(rng: np.random.Generator, tight: bool = False) -> Identity:
  """A random person. `tight`: a tightly cropped face (it fills most of the crop, as in aligned
  face crops) before a muted background, so that the expression, not the identity's colours,
  dominates the image."""
  tone = rng.uniform(0.25, 1.0)
  skin = tuple(int(c) for c in np.array([235, 195, 165]) * tone + np.array([20, 15, 10]) * (1 - tone))
  if tight:
    grey = rng.uniform(90, 160)
    return Identity(
      skin=skin,
      background=tuple(int(grey + c) for c in rng.uniform(-15, 15, 3)),
      hair=tuple(int(c) for c in rng.integers(10, 90, 3)),
      lips=(int(rng.integers(110, 180)), int(rng.integers(30, 70)), int(rng.integers(40, 80))),
      cx=56 + rng.uniform(-3, 3),
      cy=56 + rng.uniform(-3, 3),
      rx=rng.uniform(41, 46),
      ry=rng.uniform(49, 54),
      eye_dx=rng.uniform(0.33, 0.42),
      mouth_w=rng.uniform(0.38, 0.5),
    )
  return Identity(
    skin=skin,
    background=tuple(int(c) for c in rng.integers(20, 235, 3)),
    hair=tuple(int(c) for c in rng.integers(10, 120, 3)),
    lips=(int(rng.integers(110, 180)), int(rng.integers(30, 70)), int(rng.integers(40, 80))),
    cx=56 + rng.uniform(-6, 6),
    cy=58 + rng.uniform(-5, 5),
    rx=rng.uniform(29, 37),
    ry=rng.uniform(37, 45),
    eye_dx=rng.uniform(0.33, 0.42),
    mouth_w=rng.uniform(0.38, 0.5),
  )


def _ellipse(draw, cx, cy, rx, ry, fill, outline=None, width=1):
  draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline, width=width)


def draw_face(
  ident: Identity,
  valence: float,
  arousal: float,
  dx: float = 0.0,
  dy: float = 0.0,
  yaw: float = 0.0,
  cross_cues: bool = False,
) -> Image.Image:
  """A 112x112 face: mouth curvature follows valence, eye/brow opening follows arousal.

  Args:
    ident: the person.
    valence, arousal: in [-1, 1].
    dx, dy: head offset (pixels).
    yaw: -1..1; large values squeeze the features to one side (extreme pose).
    cross_cues: strong arousal cues too (wider eye and brow range, a mouth
      opening over the whole arousal range, cheeks that flush with arousal).
  """
  im = Image.new('RGB', (SIZE, SIZE), ident.background)
  d = ImageDraw.Draw(im)
  cx, cy, rx, ry = ident.cx + dx, ident.cy + dy, ident.rx, ident.ry
  # Hair and head.
  _ellipse(d, cx, cy - 0.12 * ry, rx * 1.08, ry * 1.0, ident.hair)
  _ellipse(d, cx + yaw * 0.15 * rx, cy, rx, ry, ident.skin)
  squeeze = 1.0 - 0.65 * abs(yaw)
  fx = lambda x: cx + yaw * 0.55 * rx + (x - cx) * squeeze  # feature x under yaw
  a01 = (arousal + 1.0) / 2.0
  # Eyes (open more with arousal: weak cue) and brows (raised with arousal).
  eye_y = cy - 0.22 * ry
  eye_w = 0.2 * rx * squeeze
  eye_h = (0.025 * ry + 0.13 * ry * a01) if cross_cues else (0.05 * ry + 0.07 * ry * a01)
  for side in (-1, 1):
    ex = fx(cx + side * ident.eye_dx * rx)
    _ellipse(d, ex, eye_y, eye_w, eye_h, (250, 250, 250), outline=(40, 30, 30))
    _ellipse(d, ex, eye_y, 0.45 * eye_w, min(eye_h, 0.45 * eye_w), (40, 30, 20))
    by = eye_y - eye_h - 0.07 * ry - (0.16 if cross_cues else 0.08) * ry * a01
    inner = by + (0.12 * ry * max(-valence, 0.0) if cross_cues else 0.0)  # frowning brows
    d.line(
      [fx(cx + side * (ident.eye_dx - 0.16) * rx), inner, fx(cx + side * (ident.eye_dx + 0.14) * rx), by],
      fill=ident.hair,
      width=4 if cross_cues else 3,
    )
  # Nose.
  d.line(
    [fx(cx), cy - 0.05 * ry, fx(cx) + 2, cy + 0.22 * ry],
    fill=tuple(int(c * 0.75) for c in ident.skin),
    width=2,
  )
  if cross_cues:  # cheeks flush (red) with arousal, dull (grey-blue) when calm
    flush = (int(120 + 120 * a01), int(150 - 90 * a01), int(170 - 110 * a01))
    for side in (-1, 1):
      _ellipse(d, fx(cx + side * 0.55 * rx), cy + 0.18 * ry, 0.2 * rx * squeeze, 0.13 * ry, flush)
  # Mouth: corners up for positive valence (strong cue); opening grows with arousal (weak cue).
  my = cy + 0.5 * ry
  mw = ident.mouth_w * rx
  bend = valence * (0.3 if cross_cues else 0.22) * ry  # > 0: smile
  if cross_cues:  # opens with arousal and with a smile (showing teeth)
    opening = 2.0 + 6.0 * a01 + 8.0 * max(valence, 0.0)
  else:
    opening = 1.0 + 5.0 * max(arousal, 0.0) * 0.6
  xs = np.linspace(-1.0, 1.0, 15)
  upper = [(fx(cx + x * mw), my + 0.5 * bend - bend * x * x) for x in xs]
  lower = [(fx(cx + x * mw), my + 0.5 * bend - bend * x * x + opening * (1 - x * x) + 1.0) for x in xs[::-1]]
  d.polygon(upper + lower, fill=ident.lips)
  if cross_cues and valence > 0:
    teeth = [
      (x, y + 1.0 + 0.75 * opening * (1 - ((x - fx(cx)) / (mw * squeeze)) ** 2)) for x, y in upper[::-1]
    ]
    d.polygon(upper + teeth, fill=(250, 250, 245))
  d.line(upper, fill=(70, 20, 30), width=2)
  return im


def corrupt_face(im: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
  """Applies a face corruption ('blur', 'occlusion'; 'pose' is drawn with a large yaw)."""
  if kind == 'blur':
    return im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(4.0, 7.0))))
  if kind == 'occlusion':
    d = ImageDraw.Draw(im)
    color = tuple(int(c) for c in rng.integers(0, 255, 3))
    x0 = rng.uniform(5, 40)
    y0 = rng.uniform(45, 60)
    d.rectangle([x0, y0, x0 + rng.uniform(60, 95), y0 + rng.uniform(40, 60)], fill=color)
    return im
  if kind == 'pose':
    return im.rotate(
      float(rng.choice([-1, 1]) * rng.uniform(25, 45)), resample=Image.BILINEAR, fillcolor=(0, 0, 0)
    )
  raise ValueError(kind)


# ------------------------------------------------------------------- audio
def voice(
  rng: np.random.Generator,
  valence: np.ndarray,
  arousal: np.ndarray,
  fps: float,
  sample_rate: int,
  f0_base: float,
  valence_tilt: float = 0.5,
) -> np.ndarray:
  """A voiced, speech-like signal following the per-frame curves.

  Loudness (-40..-8 dB), pitch (x0.65..x1.35) and syllable rate (2..5.5 Hz)
  follow arousal strongly; the spectral tilt (brighter when positive:
  harmonic h has amplitude h^-(1.5 - valence_tilt * valence)) follows valence,
  weakly at the default 0.5, strongly at 1.0 (the 'default' preset).
  """
  n = int(round(len(arousal) / fps * sample_rate))
  frame_pos = (np.arange(n) / sample_rate) * fps - 0.5  # in frame indices
  a = np.interp(frame_pos, np.arange(len(arousal)), arousal).astype(np.float32)
  v = np.interp(frame_pos, np.arange(len(valence)), valence).astype(np.float32)
  rate = 2.0 + 1.75 * (a + 1.0)  # syllables / s
  syl = 2 * np.pi * np.cumsum(rate, dtype=np.float64) / sample_rate
  env = np.clip(np.sin(syl), 0, None).astype(np.float32) ** 1.5
  # Phrases: speech with pauses of 0.3-1.0 s every 2-5 s.
  gate = np.ones(n, np.float32)
  pos = int(rng.uniform(1.0, 4.0) * sample_rate)
  while pos < n:
    pause = int(rng.uniform(0.3, 1.0) * sample_rate)
    gate[pos : pos + pause] = 0.0
    pos += pause + int(rng.uniform(2.0, 5.0) * sample_rate)
  gate = np.convolve(gate, np.ones(441, np.float32) / 441, mode='same')
  f0 = f0_base * (1.0 + 0.35 * a) * (1.0 + 0.06 * np.cos(syl)).astype(np.float32)
  phase = 2 * np.pi * np.cumsum(f0, dtype=np.float64) / sample_rate
  tilt = 1.5 - valence_tilt * v
  src = np.zeros(n, np.float32)
  for h in range(1, 31):
    amp = np.exp(-tilt * np.log(h)).astype(np.float32) * (h * f0 < 7000)
    src += amp * np.sin(h * phase).astype(np.float32)
  src /= np.sqrt(np.mean(src**2)) + 1e-8
  gain = (10.0 ** ((-24.0 + 16.0 * a) / 20.0)).astype(np.float32)
  return src * env * gate * gain


def noise_burst(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
  """Loud noise unrelated to the speaker: white-ish noise plus a random chirp."""
  level = 10.0 ** (rng.uniform(-9.0, -4.0) / 20.0)
  noise = rng.standard_normal(n).astype(np.float32)
  k = int(rng.integers(1, 6))
  if k > 1:  # some colour
    noise = np.convolve(noise, np.ones(k, np.float32) / np.sqrt(k), mode='same')
  t = np.arange(n) / sample_rate
  f = rng.uniform(300, 3000) + rng.uniform(-200, 200) * t
  chirp = np.sin(2 * np.pi * np.cumsum(f) / sample_rate).astype(np.float32)
  return level * (0.8 * noise / (np.std(noise) + 1e-8) + 0.5 * chirp)
