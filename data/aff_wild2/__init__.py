"""Aff-Wild2 (licensed, read from a manual directory): tfds builder."""
