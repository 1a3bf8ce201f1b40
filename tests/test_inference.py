"""Silencing the audio of chosen clips for the missing-audio evaluation."""

import numpy as np

from iaca_jax import inference


def test_silence_audio_replaces_exactly_the_chosen_clips():
  rng = np.random.default_rng(0)
  valid = rng.random((4, 16)) > 0.25
  chosen = inference.choose_silenced_clips(valid, 0.3, rng)
  assert chosen.sum() == round(0.3 * valid.sum()) and not (chosen & ~valid).any()
  batch = {'audio': rng.normal(size=(4, 16, 64, 104)), 'audio_features': rng.normal(size=(4, 16, 8))}
  silent = {'audio': np.full((64, 104), -4.0), 'audio_features': np.arange(8.0)}
  out = inference.silence_audio(batch, chosen, silent)
  np.testing.assert_array_equal(out['audio'][chosen], np.full((chosen.sum(), 64, 104), -4.0))
  np.testing.assert_array_equal(out['audio'][~chosen], batch['audio'][~chosen])
  np.testing.assert_array_equal(out['audio_features'][chosen], np.tile(np.arange(8.0), (chosen.sum(), 1)))
