"""Converting a PyTorch checkpoint file into a converted-weights directory, and its command line.

  python -m iaca_jax.conversion --kind=tsav --input=TSAV_Sub4_544k.pth.tar --output=/abs/dir

writes an Orbax checkpoint {'params', 'batch_stats'} plus `conversion.json` (kind, source file and
its SHA-256, layout notes, and the `IACAModel` settings the weights need); see docs/CONVERT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from iaca_jax.conversion.name_maps import (
  AUDIO_STEM_MODES,
  KINDS,
  TSAV_AUDIO_PREFIX,
  TSAV_VIDEO_PREFIX,
  FusionDims,
)
from iaca_jax.conversion.state_dict import convert_state_dict
from iaca_jax.conversion.torch_checkpoint import load_torch_checkpoint
from iaca_jax.pretrained import (
  ConversionError,
  combine_converted,
  count_parameters,
  load_converted,
  read_conversion_metadata,
  save_converted,
)


def _read_metadata_or_empty(path: str) -> dict[str, Any]:
  try:
    meta = read_conversion_metadata(path)
  except FileNotFoundError:
    return {}
  return {k: meta[k] for k in ('kind', 'input', 'input_sha256', 'model_config') if k in meta}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def convert_checkpoint(
  input_path: str,
  output: str,
  kind: str,
  *,
  trust_pickle: bool = False,
  overwrite: bool = False,
  also: Sequence[str] = (),
  **kwargs,
) -> dict[str, Any]:
  """Reads `input_path`, converts it (`convert_state_dict` kwargs), writes `output`; returns the metadata.

  also: directories of earlier conversions to include in the same checkpoint (disjoint variables).
  """
  state = load_torch_checkpoint(input_path, trust_pickle=trust_pickle)
  notes: list[str] = []
  converted = convert_state_dict(state, kind, notes=notes, **kwargs)
  included = []
  for path in also:
    converted = combine_converted(converted, load_converted(path))
    included.append({'path': os.path.abspath(path), **_read_metadata_or_empty(path)})
  dims = kwargs.get('dims') or FusionDims()
  metadata = {
    'kind': kind,
    'input': os.path.abspath(input_path),
    'input_sha256': _sha256(input_path),
    'num_torch_tensors': len(state),
    'num_params': count_parameters(converted['params']),
    'num_batch_stats': count_parameters(converted['batch_stats']),
    'options': {
      k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
      for k, v in kwargs.items()
      if k != 'notes'
    },
    'notes': notes,
    'included': included,
    'model_config': {},  # the IACAModel settings these weights need
  }
  for entry in included:
    metadata['model_config'].update(entry.get('model_config', {}))
  metadata['model_config'].update(
    dims.model_kwargs()
    if kind == 'fusion'
    else {'encoder_width': kwargs.get('width', 1.0), 'encoder_blocks_per_stage': 2}
  )
  metadata['output'] = save_converted(converted, output, metadata=metadata, overwrite=overwrite)
  return metadata


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog='python -m iaca_jax.conversion',
    description='Convert a PyTorch checkpoint (CPU) into an Orbax checkpoint of IACAModel variables.',
  )
  p.add_argument('--kind', required=True, choices=KINDS, help='layout of the PyTorch checkpoint')
  p.add_argument('--input', required=True, help='PyTorch checkpoint file (.pt/.pth/.pth.tar)')
  p.add_argument('--output', required=True, help='directory to write (made absolute; must not exist)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  p.add_argument(
    '--prefix',
    default='',
    help='r2plus1d_18/resnet18: key prefix of the encoder, e.g. '
    f"'{TSAV_VIDEO_PREFIX}' (keys outside it are left out)",
  )
  p.add_argument('--video_prefix', default=TSAV_VIDEO_PREFIX, help='tsav: prefix of the R(2+1)D-18 keys')
  p.add_argument('--audio_prefix', default=TSAV_AUDIO_PREFIX, help='tsav: prefix of the ResNet-18 keys')
  p.add_argument(
    '--audio_stem',
    default='sum',
    choices=AUDIO_STEM_MODES,
    help='a 3-channel ResNet-18 stem for the 1-channel audio encoder: sum (default) or mean '
    'over input channels, or exact (refuse)',
  )
  p.add_argument('--width', type=float, default=1.0, help='encoder width multiplier (1.0 = torchvision)')
  p.add_argument(
    '--ignore',
    action='append',
    default=[],
    metavar='REGEX',
    help='leave out keys matching REGEX (repeatable)',
  )
  defaults = FusionDims()
  for field in dataclasses.fields(FusionDims):
    p.add_argument(
      f'--{field.name}',
      type=int,
      default=getattr(defaults, field.name),
      help=f'fusion: {field.name} (default {getattr(defaults, field.name)})',
    )
  p.add_argument(
    '--also',
    action='append',
    default=[],
    metavar='DIR',
    help='an earlier converted directory to include in --output (repeatable), e.g. the TSAV '
    'encoders next to the fusion model',
  )
  p.add_argument(
    '--trust_pickle',
    action='store_true',
    help='torch.load(weights_only=False): only for checkpoints from a trusted source',
  )
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  kwargs: dict[str, Any] = dict(audio_stem=args.audio_stem, width=args.width, ignore=args.ignore)
  if args.kind in ('r2plus1d_18', 'resnet18'):
    kwargs['prefix'] = args.prefix
  elif args.kind == 'tsav':
    kwargs.update(video_prefix=args.video_prefix, audio_prefix=args.audio_prefix)
  else:
    kwargs['dims'] = FusionDims(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FusionDims)})
  try:
    metadata = convert_checkpoint(
      args.input,
      args.output,
      args.kind,
      trust_pickle=args.trust_pickle,
      overwrite=args.overwrite,
      also=args.also,
      **kwargs,
    )
  except (ConversionError, FileExistsError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for note in metadata['notes']:
    print(f'note: {note}')
  print(
    f'wrote {metadata["num_params"]:,} parameters and {metadata["num_batch_stats"]:,} BatchNorm statistics '
    f'({args.kind}) to {metadata["output"]}'
  )
  return 0
