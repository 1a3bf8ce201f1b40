"""Writing result files so that a crash never leaves a half-written one: temporary name, then rename."""

from __future__ import annotations

import os
from typing import Any


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder, then renames it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def atomic_savefig(figure: Any, path: str, **kwargs) -> None:
  """`figure.savefig(path)` through a temporary file (same extension, so the format is kept)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp-{os.getpid()}{ext}'
  figure.savefig(tmp, **kwargs)
  os.replace(tmp, path)
