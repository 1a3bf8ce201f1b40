"""Per-clip waveform cutting and log-mel (docs/DESIGN.md §2) against direct computations."""

import numpy as np
import pytest
from conftest import librosa_log_mel

from iaca_jax.preprocessing import mel


def _clips(rng):
  sr, n = 44_100, 45_599
  t = np.arange(n) / sr
  tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
  noise = 0.05 * rng.standard_normal(n)
  short = np.zeros(n)
  short[-12_000:] = 0.2 * rng.standard_normal(12_000)  # a clip left-padded with zeros
  loud = np.clip(3.0 * rng.standard_normal(n), -1, 1)
  return np.stack([tone, noise, short, loud, np.zeros(n)]).astype(np.float32)


def test_settings_at_44k_are_the_paper():
  s = mel.mel_settings(44_100)
  assert (s.n_fft, s.win_length, s.hop_length, s.clip_samples, s.num_mels) == (1024, 882, 441, 45_599, 64)
  assert s.shape == (64, 104)


@pytest.mark.parametrize('sr', [8_000, 16_000, 22_050, 48_000])
def test_settings_keep_durations_at_other_rates(sr):
  s = mel.mel_settings(sr)
  assert s.shape == (64, 104)
  assert abs(s.hop_length / sr - 0.01) < 1e-3 and abs(s.win_length / sr - 0.02) < 1e-3
  assert s.n_fft >= s.win_length and s.n_fft & (s.n_fft - 1) == 0


def test_log_mel_equals_librosa():
  clips = _clips(np.random.default_rng(0))
  got = mel.log_mel(clips, mel.mel_settings(44_100))
  assert got.shape == (5, 64, 104) and got.dtype == np.float32
  for y, g in zip(clips, got):
    np.testing.assert_allclose(g, librosa_log_mel(y, 44_100), atol=2e-4, rtol=0)
  # Silence: 10 log10(1e-10) = -100 dB everywhere.
  np.testing.assert_allclose(got[-1], (-100 + 14.8) / 19.895, atol=1e-6)
  # The 80 dB floor is relative to each clip's own maximum.
  for g in got[:-1]:
    assert g.max() - g.min() <= 80 / 19.895 + 1e-4


def test_log_mel_single_clip_and_bad_length():
  s = mel.mel_settings(44_100)
  y = _clips(np.random.default_rng(1))[1]
  np.testing.assert_allclose(mel.log_mel(y, s), mel.log_mel(y[None], s)[0], atol=1e-6)
  with pytest.raises(ValueError):
    mel.log_mel(y[:-1], s)


def test_clip_waveform_hand_worked():
  sr, fps = 100, 10  # 10 samples per frame: a clip (32 frames) is 320 samples
  track = np.arange(1, 1001, dtype=np.float32)  # 100 frames; sample i holds i + 1
  # Clip ending at frame 40 covers samples [80, 400); the last 300 are kept.
  np.testing.assert_array_equal(mel.clip_waveform(track, sr, fps, 40, 300), track[100:400])
  # A longer output is left-padded with zeros before the clip start.
  out = mel.clip_waveform(track, sr, fps, 40, 400)
  np.testing.assert_array_equal(out[:80], 0)
  np.testing.assert_array_equal(out[80:], track[80:400])
  # Clip ending at frame 5: only samples [0, 50) exist, right-aligned.
  out = mel.clip_waveform(track, sr, fps, 5, 300)
  np.testing.assert_array_equal(out[:250], 0)
  np.testing.assert_array_equal(out[250:], track[:50])
  # A track that ends early (truncated audio) leaves zeros at the end of the clip.
  out = mel.clip_waveform(track[:950], sr, fps, 100, 300)
  np.testing.assert_array_equal(out[:250], track[700:950])
  np.testing.assert_array_equal(out[250:], 0)


def test_clip_waveform_at_the_paper_rate():
  """At 30 fps a clip lasts 47,040 samples: the last 45,599, ending at frame k's end."""
  track = np.random.default_rng(2).standard_normal(44_100 * 4).astype(np.float32)
  k = 90
  stop = 90 * 44_100 // 30
  np.testing.assert_array_equal(
    mel.clip_waveform(track, 44_100, 30.0, k, 45_599), track[stop - 45_599 : stop]
  )
  # At 24 fps frame 60 ends at 2.5 s.
  stop = int(2.5 * 44_100)
  np.testing.assert_array_equal(
    mel.clip_waveform(track, 44_100, 24.0, 60, 45_599), track[stop - 45_599 : stop]
  )


def test_silent_log_mel_is_the_floor_of_the_normalised_scale():
  # A zero waveform: 10 log10(1e-10) = -100 dB everywhere, then (x + 14.8) / 19.895.
  np.testing.assert_allclose(mel.silent_log_mel(), (-100 + 14.8) / 19.895, rtol=1e-6)
