"""The preprocessing stage: raw Aff-Wild2-layout folders -> one example per 16-clip window.

Modules (all importable without tfds except `tfds_builder`):
  errors        DataError, raised for input that must stop a build
  windows       window schedule and per-clip frame selection (docs/DESIGN.md §2)
  mel           per-clip waveform cutting and log-mel (docs/DESIGN.md §2)
  audio         PyAV probing and audio decoding of the raw videos
  annotations   annotation files and test lists
  layout        the Aff-Wild2 folder layout (docs/DESIGN.md §6)
  corruptions   the synthetic set's sidecar of corrupted intervals
  examples      per-video example assembly, BuildStats
  tfds_builder  the tfds builder base shared by data/aff_wild2 and data/synthetic_av
"""

from iaca_jax.preprocessing.errors import DataError

__all__ = ['DataError']
