"""Which prepared dataset a name means: `<data_dir>/<dataset>/<config>/<version>/`, the version this code
reads unless one is named, and whether that folder holds a complete dataset. Every problem is one line
that says what was found and how to build what is missing (no search through tfds's registry)."""

from __future__ import annotations

import json
import os
import re

import tensorflow_datasets as tfds
from etils import epath

from iaca_jax.preprocessing.errors import DataError, reason
from iaca_jax.preprocessing.examples import DATASET_VERSION

_VERSION = re.compile(r'^\d+\.\d+\.\d+$')


def is_path(dataset: str) -> bool:
  """Whether `dataset` is the path of a version folder rather than a name like `synthetic_av/sr16000`."""
  return (
    dataset.startswith(('/', '.', '~'))
    or '://' in dataset
    or os.path.isfile(os.path.join(dataset, 'dataset_info.json'))
  )


def build_command(name: str, config: str | None, data_dir: str) -> str:
  config_flag = f' --config={config}' if config else ''
  return f'python -m data.build --dataset={name}{config_flag} --data_dir={data_dir} --manual_dir=<raw folder>'


def _found(names: list[str]) -> str:
  return f'found: {", ".join(names)}' if names else 'found nothing'


def _subfolders(path: epath.Path) -> list[str]:
  return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith('.'))


def version_dir(dataset: str, data_dir: str | None = None) -> epath.Path:
  """The version folder of `dataset` ('synthetic_av', 'synthetic_av/sr16000', 'aff_wild2:1.0.0'; the
  config defaults to the dataset's default one, the version to DATASET_VERSION) under `data_dir`
  (default: tfds's, $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Raises:
    DataError naming what is there instead (datasets, configs, versions) and how to build it.
  """
  spec, _, version = dataset.partition(':')
  name, _, config = spec.partition('/')
  root = epath.Path(os.path.expanduser(data_dir or tfds.core.constants.get_default_data_dir()))
  folder = root / name
  if not folder.is_dir():
    found = [n for n in _subfolders(root) if n != 'downloads'] if root.is_dir() else []
    raise DataError(
      f'no dataset {name} in {root} ({_found(found)}); build it with {build_command(name, config, str(root))}'
    )
  config = config or _default_config(folder)
  config_dir = folder / config
  if not config_dir.is_dir():
    raise DataError(
      f'no config {config} of {name} in {folder} ({_found(_subfolders(folder))}); name one '
      f'({name}/<config>) or build it with {build_command(name, config, str(root))}'
    )
  reads = f'asked for {version}' if version else f'this code reads {DATASET_VERSION}'
  version = version or DATASET_VERSION
  path = config_dir / version
  if not path.is_dir():
    names = _subfolders(config_dir)
    found = [n for n in names if _VERSION.match(n)]
    partial = [n for n in names if n.startswith('incomplete.')]
    versions = f'found version {", ".join(found)}' if found else 'found no version'
    left = f'; an interrupted build left {", ".join(partial)}' if partial else ''
    what = (
      'build it with'
      if version == DATASET_VERSION
      else f'name a version found, or build {DATASET_VERSION} with'
    )
    raise DataError(
      f'no {name}/{config} version {version} in {config_dir} ({reads}; {versions}{left}): {what} '
      f'{build_command(name, config, str(root))}'
    )
  return path


def _default_config(folder: epath.Path) -> str:
  """The config tfds recorded as the default (`<dataset>/.config/metadata.json`), else the only one."""
  metadata = folder / '.config' / 'metadata.json'
  if metadata.exists():
    default = json.loads(metadata.read_text()).get('default_config_name')
    if default:
      return default
  configs = _subfolders(folder)
  if len(configs) == 1:
    return configs[0]
  raise DataError(
    f'which config of {folder.name} in {folder}? ({_found(configs)}); name one ({folder.name}/<config>)'
  )


def _read(path: epath.Path):
  """(the builder of the version folder `path`, None) when it holds a complete dataset, else
  (None, why not: 'no dataset_info.json', shards missing, ...)."""
  if not path.is_dir():
    return None, 'no such folder'
  if not (path / 'dataset_info.json').exists():
    return None, 'no dataset_info.json'
  try:
    builder = tfds.builder_from_directory(os.fspath(path))
  except ValueError as e:  # a damaged dataset_info.json
    return None, f'unreadable dataset_info.json: {reason(e)}'
  names = {p.name for p in path.iterdir()}
  splits = builder.info.splits.values()
  missing = [f.name for split in splits for f in split.filepaths if f.name not in names]
  if missing:
    return None, f'{len(missing)} shard files missing, e.g. {missing[0]}'
  return builder, None


def incomplete_reason(path: epath.Path | str) -> str | None:
  """Why the version folder `path` is not a complete dataset, or None when it is."""
  return _read(epath.Path(path))[1]


def open_builder(path: epath.Path | str):
  """The tfds builder of the complete dataset in the version folder `path`.

  Raises:
    DataError when the folder holds no complete dataset.
  """
  builder, problem = _read(epath.Path(path))
  if problem:
    raise DataError(
      f'no complete dataset at {path} ({problem}): build it (python -m data.build, or cache_features.py '
      'for cached features; --overwrite replaces an incomplete one)'
    )
  return builder


def windows(builder) -> str:
  """'train 78, validation 64, test 32 windows'."""
  return ', '.join(f'{split} {info.num_examples}' for split, info in builder.info.splits.items()) + ' windows'


def describe(builder) -> str:
  """'synthetic_av/sr44100 version 1.0.0 at <path> (train 78, validation 64, test 32 windows)'."""
  name = builder.info.full_name.rpartition('/')[0]
  return f'{name} version {builder.info.version} at {builder.data_dir} ({windows(builder)})'
