"""The synthetic set's sidecar file of corrupted intervals (`corruptions.json`).

    {"format": "synthetic_av_corruptions/1", "seed": 0,
     "videos": {"<video>": {"split": "train", "num_frames": 900, "fps": 30.0,
                            "audio_source": "<raw video name>",
                            "face":  [{"start": 120, "end": 230, "kind": "blur"}, ...],
                            "audio": [{"start": 400, "end": 470, "kind": "noise"}, ...],
                            "invalid_labels": [{"start": 10, "end": 25}, ...]}}}

Frames are 1-based and intervals inclusive. Face kinds: blur, occlusion, pose,
missing (no crop written), inconsistent (a clean face whose expression follows
another emotion curve); audio kinds: noise, silence, inconsistent (a clean voice
following another emotion curve). Labels go on through every corruption (they
follow the true curves); `invalid_labels` lists the frames written as -5.
"""

from __future__ import annotations

import json

import numpy as np

from iaca_jax.preprocessing import windows
from iaca_jax.preprocessing.errors import DataError, reason

FILENAME = 'corruptions.json'
FORMAT = 'synthetic_av_corruptions/1'
FACE_KINDS = ('blur', 'occlusion', 'pose', 'missing', 'inconsistent')
AUDIO_KINDS = ('noise', 'silence', 'inconsistent')
# [decision] A clip counts as corrupted in a modality when at least this
# fraction of its 32 frames lies in a corrupted interval of that modality.
CLIP_CORRUPT_FRACTION = 0.5


def read_corruptions(path: str) -> dict:
  """Reads and checks the sidecar file; returns its `videos` mapping."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read the corruption sidecar {path}: {reason(e)}') from e
  if not isinstance(data, dict) or data.get('format') != FORMAT or 'videos' not in data:
    raise DataError(f'{path} is not a {FORMAT} file')
  for name, v in data['videos'].items():
    for key, kinds in (('face', FACE_KINDS), ('audio', AUDIO_KINDS)):
      for iv in v.get(key, []):
        if iv.get('kind') not in kinds or not 1 <= iv['start'] <= iv['end']:
          raise DataError(f'{path}: bad {key} interval {iv} for video {name}')
  return data['videos']


def frame_mask(intervals, num_frames: int) -> np.ndarray:
  """bool (num_frames,): True on frames (row i = frame i+1) inside any interval."""
  mask = np.zeros(num_frames, bool)
  for iv in intervals:
    mask[max(iv['start'], 1) - 1 : min(iv['end'], num_frames)] = True
  return mask


def clip_corrupt(mask: np.ndarray, end_frame: int) -> bool:
  """Whether the clip ending at `end_frame` (1-based) is corrupted under `mask`."""
  if end_frame < 1 or end_frame > len(mask):
    return False
  lo = max(end_frame - windows.FRAMES_PER_CLIP, 0)
  return bool(mask[lo:end_frame].sum() >= CLIP_CORRUPT_FRACTION * windows.FRAMES_PER_CLIP)
