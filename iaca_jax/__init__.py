"""IACA: Inconsistency-Aware Cross-Attention for audio-visual dimensional emotion recognition, in JAX/Flax."""

from iaca_jax import xla_flags

xla_flags.keep_nan_through_fusions()  # before any JAX backend starts (see xla_flags.py)

__version__ = '0.1.0'
