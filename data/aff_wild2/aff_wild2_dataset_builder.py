"""tfds builder of Aff-Wild2 (valence-arousal track), read from a manual directory.

Aff-Wild2 is licensed and cannot be downloaded here: the manual directory must
hold the layout of docs/DESIGN.md §6 (cropped_aligned/, raw_videos/,
<N>th_ABAW_Annotations/VA_Estimation_Challenge/{Train_Set,Validation_Set}/ and
a test list). Build with `python -m data.build --dataset=aff_wild2
--manual_dir=DIR --data_dir=DIR` (see docs/DATA.md). All logic lives in
`iaca_jax.preprocessing`.
"""

from iaca_jax.preprocessing import tfds_builder

# [decision] An annotation file may differ from its raw video's frame count by
# up to this many frames (a few Aff-Wild2 files are off by some frames); more
# stops the build with a DataError naming the file.
FRAME_COUNT_TOLERANCE = 5


class Builder(tfds_builder.AvLayoutBuilder):
  """Aff-Wild2: no corruption flags (all False)."""

  BUILDER_CONFIGS = tfds_builder.make_configs(frame_count_tolerance=FRAME_COUNT_TOLERANCE)
  HAS_CORRUPTIONS = False
  HOMEPAGE = 'https://ibug.doc.ic.ac.uk/resources/aff-wild2/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Aff-Wild2 is licensed: request it from its authors, then point --manual_dir at a folder holding
  cropped_aligned/<video>/<%05d>.jpg      (112x112 aligned faces, 1-based; .png etc.: docs/DATA.md)
  raw_videos/<video>.mp4|.avi             (may be in sub-folders; `_left`/`_right` use `<video>`)
  <N>th_ABAW_Annotations/VA_Estimation_Challenge/Train_Set/<video>.txt
  <N>th_ABAW_Annotations/VA_Estimation_Challenge/Validation_Set/<video>.txt
  <N>th_ABAW_Annotations/VA_Estimation_Challenge/Test_Set.txt   (test list, one name a line)
"""
