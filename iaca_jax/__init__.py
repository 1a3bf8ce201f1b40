"""IACA: Inconsistency-Aware Cross-Attention for audio-visual dimensional emotion recognition, in JAX/Flax.

Importing the package changes nothing in the process; entry points call
`iaca_jax.runtime.configure_process()` first (iaca_jax/runtime.py).
"""

__version__ = '0.1.0'
