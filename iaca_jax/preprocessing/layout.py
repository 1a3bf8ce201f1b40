"""The Aff-Wild2 folder layout (docs/DESIGN.md §6), shared by both builders.

    <root>/cropped_aligned/<video>/<frame>.jpg         112x112 faces, 1-based (see list_crops)
    <root>/raw_videos/**/<video>.mp4|.avi              audio source
    <root>/<N>th_ABAW_Annotations/VA_Estimation_Challenge/
        Train_Set/<video>.txt, Validation_Set/<video>.txt
        Test_Set.txt                                   the test list (see find_test_list)

Videos with two annotated people are `<base>_left` / `<base>_right` and share
the audio of `<base>`. Names like `12-24-1920x1080` carry id-fps-resolution.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import re

from iaca_jax.preprocessing.errors import DataError

CROPS_DIR = 'cropped_aligned'
RAW_VIDEOS_DIR = 'raw_videos'
VA_DIR = 'VA_Estimation_Challenge'
SPLIT_DIRS = {'train': 'Train_Set', 'validation': 'Validation_Set'}
RAW_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.mov', '.webm', '.wav')
# Test list names tried in order, relative to the VA folder, the annotation
# folder and the root.
TEST_LIST_NAMES = (
  'Test_Set.txt',
  'test_set.txt',
  'Valence_Arousal_Estimation_Challenge_test_set_release.txt',
)

_ANNOTATION_ROOT = re.compile(r'^(\d+)(?:st|nd|rd|th)_ABAW_Annotations$')
_FPS_IN_NAME = re.compile(r'^\d+-(\d+)-\d+x\d+')
# A face crop is `<frame number>.<image extension>`, any zero padding (`00010.jpg`, `10.png`).
CROP_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
_CROP_NAME = re.compile(r'^(\d+)(\.[a-z]+)$', re.IGNORECASE)
# What file systems and file browsers leave in folders: ignored without naming each one.
SYSTEM_FILES = ('thumbs.db', 'desktop.ini', 'icon\r')


def find_annotation_root(root: str) -> str:
  """The `<N>th_ABAW_Annotations` folder (the highest N if there are several)."""
  found = []
  for name in os.listdir(root) if os.path.isdir(root) else []:
    m = _ANNOTATION_ROOT.match(name)
    if m and os.path.isdir(os.path.join(root, name)):
      found.append((int(m.group(1)), name))
  if not found:
    raise DataError(f'no <N>th_ABAW_Annotations folder in {root}')
  found.sort()
  if len(found) > 1:
    logging.warning('several annotation folders in %s, using %s', root, found[-1][1])
  return os.path.join(root, found[-1][1])


def va_dir(root: str) -> str:
  path = os.path.join(find_annotation_root(root), VA_DIR)
  if not os.path.isdir(path):
    raise DataError(f'missing folder {path}')
  return path


def split_annotation_files(root: str, split: str) -> dict[str, str]:
  """{video name: annotation path} of a labelled split ('train' or 'validation')."""
  folder = os.path.join(va_dir(root), SPLIT_DIRS[split])
  if not os.path.isdir(folder):
    raise DataError(f'missing annotation folder {folder}')
  files = sorted(glob.glob(os.path.join(folder, '*.txt')))
  if not files:
    raise DataError(f'annotation folder {folder} holds no .txt file')
  return {os.path.splitext(os.path.basename(f))[0]: f for f in files}


def find_test_list(root: str) -> str | None:
  """Path of the test list, or None if there is none."""
  ann = find_annotation_root(root)
  for folder in (os.path.join(ann, VA_DIR), ann, root):
    for name in TEST_LIST_NAMES:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return path
  return None


def audio_source_name(video: str) -> str:
  """`<base>_left` / `<base>_right` share the audio of `<base>`."""
  for suffix in ('_left', '_right'):
    if video.endswith(suffix):
      return video[: -len(suffix)]
  return video


def fps_from_name(video: str) -> float | None:
  """The frame rate in names like `12-24-1920x1080` (id-fps-resolution), else None."""
  m = _FPS_IN_NAME.match(video)
  return float(m.group(1)) if m else None


def index_raw_videos(root: str) -> dict[str, str]:
  """{name without extension: path} of every raw video under `raw_videos/` (recursive)."""
  folder = os.path.join(root, RAW_VIDEOS_DIR)
  index = {}
  for dirpath, _, filenames in os.walk(folder):
    for fname in sorted(filenames):
      stem, ext = os.path.splitext(fname)
      if ext.lower() in RAW_EXTENSIONS:
        if stem in index:
          # Prefer containers in the order of RAW_EXTENSIONS.
          old_ext = os.path.splitext(index[stem])[1].lower()
          if RAW_EXTENSIONS.index(old_ext) <= RAW_EXTENSIONS.index(ext.lower()):
            continue
        index[stem] = os.path.join(dirpath, fname)
  return index


def raw_video_for(video: str, raw_index: dict[str, str]) -> str | None:
  """The raw video holding the audio of `video` (its own file first, then its base)."""
  return raw_index.get(video) or raw_index.get(audio_source_name(video))


def crop_dir(root: str, video: str) -> str:
  return os.path.join(root, CROPS_DIR, video)


@dataclasses.dataclass
class CropFolder:
  """What one video's crop folder holds: its face crops and the entries that are not face crops."""

  crops: dict[int, str]  # 1-based frame number -> path
  others: list[str]  # names of the entries that are not `<frame number>.<CROP_EXTENSIONS>`
  system: list[str]  # names of file-system litter (hidden files, Thumbs.db, desktop.ini)


def is_system_file(name: str) -> bool:
  return name.startswith('.') or name.lower() in SYSTEM_FILES


def read_crop_folder(folder: str) -> CropFolder:
  """The face crops and the other entries of one video's crop folder.

  Raises:
    DataError if two files name one frame (`00020.jpg`, `20.jpg`, `0020.png`): which one is the face
    is not knowable.
  """
  named: dict[int, list[str]] = collections.defaultdict(list)
  others, system = [], []
  for name in sorted(os.listdir(folder)):
    m = _CROP_NAME.match(name)
    if m and m.group(2).lower() in CROP_EXTENSIONS and os.path.isfile(os.path.join(folder, name)):
      named[int(m.group(1))].append(name)
    elif is_system_file(name):
      system.append(name)
    else:
      others.append(name)
  clashes = {frame: names for frame, names in sorted(named.items()) if len(names) > 1}
  if clashes:
    listed = '; '.join(f'frame {frame}: {", ".join(names)}' for frame, names in list(clashes.items())[:5])
    more = f' and {len(clashes) - 5} more frames' if len(clashes) > 5 else ''
    raise DataError(
      f'crop folder {folder} holds several files for one frame ({listed}{more}): keep one file per frame'
    )
  crops = {frame: os.path.join(folder, names[0]) for frame, names in named.items()}
  return CropFolder(crops=crops, others=others, system=system)


def list_crops(folder: str) -> dict[int, str]:
  """{1-based frame number: path} of the face crops in one video's folder (see `read_crop_folder`)."""
  return read_crop_folder(folder).crops
