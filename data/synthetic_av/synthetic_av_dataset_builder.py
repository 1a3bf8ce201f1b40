"""tfds builder of the synthetic audio-visual emotion set (docs/DESIGN.md §7).

Reads a set written by `python -m data.synthetic_av.generate` from the manual
directory. Build with `python -m data.build --dataset=synthetic_av
--manual_dir=DIR --data_dir=DIR` (see docs/DATA.md). All logic lives in
`iaca_jax.preprocessing`.
"""

from iaca_jax.preprocessing import tfds_builder


class Builder(tfds_builder.AvLayoutBuilder):
  """Synthetic set: clip corruption flags come from the generator's sidecar file."""

  BUILDER_CONFIGS = tfds_builder.make_configs(frame_count_tolerance=0)
  HAS_CORRUPTIONS = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Generate the raw set with `python -m data.synthetic_av.generate --out_dir=DIR` and pass '
    'DIR as the manual directory.'
  )
