"""What the entry points share: checks before any work, and user errors as one line, not a traceback."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from absl import flags
from ml_collections.config_dict import FieldReference

from iaca_jax import run_config
from iaca_jax.preprocessing.errors import reason

# Errors that a user's input or setting causes (DataError and ConversionError are ValueErrors). They are
# reported as `error: <message>` with exit status 1; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def check_writable_dir(path: str, what: str = 'workdir') -> str:
  """Creates `path` if needed and checks that a file can be written in it; returns it absolute."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f'{what} {path} exists and is not a directory')
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write-test-'):
      pass
  except OSError as e:
    raise OSError(f'{what} {path} is not writable: {e.strerror or e}') from e
  return path


def run_reporting_user_errors(fn: Callable[[], object]) -> object:
  """Calls `fn`; a user error ends the process with one line on stderr and exit status 1."""
  try:
    return fn()
  except USER_ERRORS as e:
    print(f'error: {reason(e)}', file=sys.stderr, flush=True)
    sys.exit(1)


def _is_unset(arg: str) -> bool:
  return arg.startswith('--config.') and arg.partition('=')[2] in ('None', 'none')


def _unset_field(config, key: str) -> None:
  """Sets an optional field (a `placeholder` of the config file, whose unset value is None) to None."""
  *groups, name = key.split('.')
  for group in groups:
    config = config[group]
  if name not in config:
    raise KeyError(key)
  if not isinstance(config._fields[name], FieldReference):  # noqa: SLF001 - how placeholders are stored
    raise ValueError(f'--config.{key} cannot be None: the field needs a value')
  config[name] = None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`: a bad flag or an unknown
  `--config.<key>` ends the process with one line (ml_collections raises AttributeError for the
  latter, which absl would show as a traceback). A field of the flat layout the configs had before they
  were grouped gets its new name."""
  for arg in argv[1:]:
    key = arg.removeprefix('--config.').split('=')[0]
    if arg.startswith('--config.') and key in run_config.FLAT_KEYS:
      group, new = run_config.FLAT_KEYS[key]
      print(
        f'error: --config.{key} is now --config.{group}.{new} (the config is grouped: configs/default.py)',
        file=sys.stderr,
        flush=True,
      )
      sys.exit(2)
  # `--config.<key>=None` unsets an optional field; ml_collections would store the text 'None' in a
  # string field (a features_dir named 'None'), or refuse it for a number.
  unset = [arg.split('=')[0].removeprefix('--config.') for arg in argv[1:] if _is_unset(arg)]
  argv = [arg for arg in argv if not _is_unset(arg)]
  try:
    remaining = flags.FLAGS(argv)
    for key in unset:
      _unset_field(flags.FLAGS['config'].value, key)
    return remaining
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:
    message = (
      f"unknown config field '{str(e).strip(chr(34) + chr(39))}'; the config file lists the valid ones"
    )
  except (ValueError, TypeError) as e:
    message = f'bad config override: {e}'
  print(f'error: {message} (see --helpfull)', file=sys.stderr, flush=True)
  sys.exit(2)
