"""What the entry points share: checks before any work, and user errors as one line, not a traceback."""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import NoReturn

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_dict import FieldReference

from iaca_jax import distributed, interrupts, run_config
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


def remove_if_empty(path: str) -> None:
  """Removes the folder `path` if it holds nothing (made by `check_writable_dir` for a refused run)."""
  try:
    os.rmdir(path)
  except OSError:  # not empty (the run wrote something), or gone
    pass


def run_reporting_user_errors(fn: Callable[[], object]) -> object:
  """Calls `fn`; a user error ends the process with one line on stderr and exit status 1, a stop on
  request (Ctrl-C, SIGTERM) with its line and 128 + the signal, a collective that lost another
  process of a multi-process run with one line and exit status 1."""
  try:
    return fn()
  except interrupts.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    distributed.leave(e.exit_status)
  except USER_ERRORS as e:
    print(f'error: {reason(e)}', file=sys.stderr, flush=True)
    distributed.leave(1)
  except jax.errors.JaxRuntimeError as e:
    message = distributed.lost_peer_message(e)
    if message is None:
      raise
    print(f'error: {message}', file=sys.stderr, flush=True)
    distributed.leave(1)


_default_config: dict[str, str] = {}  # flag name -> the config file used when it is not given
_OVERRIDE = re.compile(r'^--?(no)?config\.([^=]+)')


def define_config_flag(default: str, help_string: str) -> None:
  """An entry point's `--config` flag, `default` when not given. ml_collections would read a default
  file, with the command line's overrides, when the flag is defined, at import: a bad override would
  end in a traceback there. `parse_flags` reads it instead, and reports one line."""
  config_flags.DEFINE_config_file('config', None, help_string, lock_config=True)
  flags.FLAGS['config'].default_as_str = repr(default)  # what --helpfull shows
  _default_config['config'] = default


def _config_file(argv: Sequence[str]) -> str | None:
  """The `--config` value in `argv`, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg.partition('=')[2]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_field(config: ml_collections.ConfigDict, key: str) -> str | None:
  """What is wrong with `--config.<key>` for `config`, or None when the field exists."""
  node, path = config, []
  for name in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"unknown config field '{key}': '{'.'.join(path)}' is a setting, not a group"
    if name not in node:
      close = difflib.get_close_matches(name, [str(k) for k in node.keys()], 1, 0.75)
      if close:
        return f"unknown config field '{key}'; did you mean '{'.'.join([*path, close[0]])}'?"
      if path or key != name:
        return f"unknown config field '{key}': there is no '{'.'.join([*path, name])}'"
      return f"unknown config field '{key}'"
    node, path = node[name], [*path, name]
  return None


def _load_config(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
  """The config file named by `argv`'s `--config` as the flag will load it, or None (no such flag, or a
  file that fails to load: the flag reports that itself)."""
  path = _config_file(argv)
  if path is None or 'config' not in flags.FLAGS:
    return None
  try:
    return flags.FLAGS['config'].parser.parse(path)
  except Exception:  # noqa: BLE001 - the flag's own parse reports it
    return None


def _is_placeholder(config: ml_collections.ConfigDict, key: str) -> bool:
  """Whether the (existing) field `key` is optional: a `placeholder` of the config file, unset = None."""
  *groups, name = key.split('.')
  for group in groups:
    config = config[group]
  return isinstance(config._fields[name], FieldReference)  # noqa: SLF001 - how placeholders are stored


def _exit_with(message: str) -> NoReturn:
  message = '; '.join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`: a bad flag or an unknown
  `--config.<key>` ends the process with one line (ml_collections raises AttributeError for the
  latter, which absl would show as a traceback). A field of the flat layout the configs had before they
  were grouped gets its new name."""
  for arg in argv[1:]:
    key = arg.removeprefix('--config.').split('=')[0]
    if arg.startswith('--config.') and key in run_config.FLAT_KEYS:
      group, new = run_config.FLAT_KEYS[key]
      _exit_with(f'--config.{key} is now --config.{group}.{new} (the config is grouped: configs/default.py)')
  default = _default_config.get('config')
  if default is not None and _config_file(argv) is None:
    argv = [argv[0], f'--config={default}', *argv[1:]]
  config_file = _config_file(argv)
  if config_file is not None and not os.path.isfile(config_file.split(':')[0]):
    _exit_with(f'config file {config_file.split(":")[0]} does not exist')
  config = _load_config(argv)
  unset = []
  if config is not None:
    for arg in argv[1:]:
      match = _OVERRIDE.match(arg)
      problem = match and _unknown_field(config, match.group(2))
      if problem:
        _exit_with(f'{problem} (see --helpfull)')
    # `--config.<key>=None` unsets an optional field; ml_collections would store the text 'None' in a
    # string field (a features_dir named 'None'), or refuse it for a number. 'none' is also a value
    # (gating=none): it unsets only an optional field.
    for arg in argv[1:]:
      key, _, value = arg.removeprefix('--config.').partition('=')
      if not arg.startswith('--config.') or value not in ('None', 'none'):
        continue
      if _is_placeholder(config, key):
        unset.append(arg)
      elif value == 'None':
        _exit_with(f'--config.{key} cannot be None: the field needs a value (see --helpfull)')
    argv = [arg for arg in argv if arg not in unset]
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(f'{e} (see --helpfull)')
  except (AttributeError, KeyError) as e:  # ml_collections: a field that does not exist
    _exit_with(f'unknown config field: {e} (see --helpfull)')
  except (ValueError, TypeError) as e:
    _exit_with(f'bad config override: {e} (see --helpfull)')
  for arg in unset:
    *groups, name = arg.removeprefix('--config.').partition('=')[0].split('.')
    holder = flags.FLAGS['config'].value
    for group in groups:
      holder = holder[group]
    holder[name] = None
  _unset_overrides[:] = [arg.removeprefix('--config.').partition('=')[0] for arg in unset]
  return remaining


_unset_overrides: list[str] = []  # the fields `parse_flags` unset (`--config.<key>=None`)


def config_overrides() -> dict[str, object]:
  """The `--config.<key>=<value>` of the command line `parse_flags` read: {key: value}, None for an
  unset optional field."""
  overrides = dict(flags.FLAGS['config'].override_values) if 'config' in flags.FLAGS else {}
  overrides.update(dict.fromkeys(_unset_overrides))
  return overrides
