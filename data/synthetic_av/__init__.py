"""The synthetic audio-visual emotion set: generator (`generate`) and tfds builder."""
