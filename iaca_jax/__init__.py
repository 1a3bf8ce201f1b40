"""IACA: Inconsistency-Aware Cross-Attention for audio-visual dimensional emotion recognition, in JAX/Flax."""

__version__ = '0.1.0'
