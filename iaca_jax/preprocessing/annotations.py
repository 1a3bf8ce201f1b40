"""Aff-Wild2 annotation files and video lists (docs/DESIGN.md §6).

An annotation file is `<video>.txt`: the header `valence,arousal`, then one
`v,a` line per frame of the video (line i+1 is frame i, 1-based); `-5` marks
an invalid frame, every other value lies in [-1, 1].
"""

from __future__ import annotations

import math
import os

import numpy as np

from iaca_jax.preprocessing.errors import DataError, reason

HEADER = ('valence', 'arousal')
INVALID = -5.0


def read_annotation(path: str) -> np.ndarray:
  """Reads one annotation file.

  Returns:
    float32 array (num_frames, 2) of [valence, arousal]; row i is frame i+1;
    invalid entries keep the value -5.

  Raises:
    DataError naming the file (and line) if the header is not
    `valence,arousal`, a line does not hold two numbers, a value is neither
    -5 nor in [-1, 1], or there is no data line.
  """
  try:
    with open(path, encoding='utf-8-sig') as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise DataError(f'cannot read annotation file {path}: {reason(e)}') from e
  except UnicodeDecodeError as e:
    raise DataError(f'annotation file {path} is not UTF-8 text (byte {e.start}: {e.reason})') from e
  if not lines:
    raise DataError(f'annotation file {path} is empty (expected the header "valence,arousal")')
  header = tuple(h.strip().lower() for h in lines[0].split(','))
  if header != HEADER:
    raise DataError(f'annotation file {path} has header {lines[0]!r}, expected "valence,arousal"')
  rows = []
  for lineno, line in enumerate(lines[1:], start=2):
    if not line.strip():
      if any(l.strip() for l in lines[lineno:]):
        raise DataError(f'annotation file {path} line {lineno}: empty line inside the data')
      break
    parts = line.split(',')
    if len(parts) != 2:
      raise DataError(f'annotation file {path} line {lineno}: expected "v,a", got {line!r}')
    try:
      v, a = float(parts[0]), float(parts[1])
    except ValueError as e:
      raise DataError(f'annotation file {path} line {lineno}: not numbers: {line!r}') from e
    for x in (v, a):
      if not (x == INVALID or (math.isfinite(x) and -1.0 <= x <= 1.0)):
        raise DataError(f'annotation file {path} line {lineno}: value {x} is neither -5 nor in [-1, 1]')
    rows.append((v, a))
  if not rows:
    raise DataError(f'annotation file {path} has a header but no label line')
  return np.asarray(rows, np.float32)


def label_valid(labels: np.ndarray) -> np.ndarray:
  """Per-frame validity: False where either dimension is -5."""
  return np.all(labels != INVALID, axis=-1)


def read_video_list(path: str) -> list[str]:
  """Reads a test list: one video name a line (blank lines and `#` comments ignored).

  Names may carry a file extension or a directory; both are stripped.
  """
  try:
    with open(path, encoding='utf-8-sig') as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise DataError(f'cannot read video list {path}: {reason(e)}') from e
  except UnicodeDecodeError as e:
    raise DataError(f'video list {path} is not UTF-8 text (byte {e.start}: {e.reason})') from e
  names = []
  for line in lines:
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    name = os.path.basename(line.rstrip('/'))
    root, ext = os.path.splitext(name)
    if ext.lower() in ('.mp4', '.avi', '.txt', '.mkv', '.mov', '.wav'):
      name = root
    names.append(name)
  if len(set(names)) != len(names):
    raise DataError(f'video list {path} names a video twice')
  return names
