"""Per-clip audio: cutting the waveform at the clip's frame times and its log-mel.

At 44.1 kHz the parameters are exactly docs/DESIGN.md §2 (torchaudio's defaults
as the authors used them): power spectrogram (power 2), n_fft 1024, 882-sample
hann window, hop 441, centred frames with reflect padding, 64 HTK mel bands
from 0 Hz to sr/2 without filter normalisation, 10 log10(max(x, 1e-10)) floored
at (its maximum over the clip - 80 dB), then (x + 14.8) / 19.895. A clip is
45,599 samples, left-padded with zeros, which gives 104 mel frames.

[decision] At another sample rate the clip length, window and hop keep their
durations (45,599 / 44,100 s, 20 ms, 10 ms) and n_fft is the smallest power of
two >= the window, so the spectrogram stays (64, 104) at the usual rates.
"""

from __future__ import annotations

import dataclasses
import functools

import librosa
import numpy as np
import threadpoolctl  # a dependency of librosa (through scikit-learn)

from iaca_jax.preprocessing import windows

REFERENCE_SAMPLE_RATE = 44_100
REFERENCE_CLIP_SAMPLES = 45_599
NUM_MELS = 64
TOP_DB = 80.0
AMIN = 1e-10
NORM_MEAN = -14.8
NORM_STD = 19.895


@dataclasses.dataclass(frozen=True)
class MelSettings:
  """Log-mel parameters for one sample rate (see the module docstring)."""

  sample_rate: int
  n_fft: int
  win_length: int
  hop_length: int
  clip_samples: int
  num_mels: int = NUM_MELS

  @property
  def num_frames(self) -> int:
    """Mel frames of one clip (centred STFT)."""
    return 1 + self.clip_samples // self.hop_length

  @property
  def shape(self) -> tuple[int, int]:
    return (self.num_mels, self.num_frames)


def mel_settings(sample_rate: int = REFERENCE_SAMPLE_RATE) -> MelSettings:
  """The settings at `sample_rate` (exactly docs/DESIGN.md §2 at 44,100 Hz)."""
  if sample_rate <= 0:
    raise ValueError(f'sample_rate must be positive, got {sample_rate}')
  if sample_rate == REFERENCE_SAMPLE_RATE:
    return MelSettings(sample_rate, 1024, 882, 441, REFERENCE_CLIP_SAMPLES)
  win = int(round(0.02 * sample_rate))
  hop = int(round(0.01 * sample_rate))
  n_fft = 1 << (win - 1).bit_length()
  clip = int(round(REFERENCE_CLIP_SAMPLES * sample_rate / REFERENCE_SAMPLE_RATE))
  return MelSettings(sample_rate, n_fft, win, hop, clip)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> threadpoolctl.ThreadpoolController:
  return threadpoolctl.ThreadpoolController()


@functools.lru_cache(maxsize=8)
def _mel_basis(settings: MelSettings) -> np.ndarray:
  return librosa.filters.mel(
    sr=settings.sample_rate,
    n_fft=settings.n_fft,
    n_mels=settings.num_mels,
    fmin=0.0,
    fmax=settings.sample_rate / 2.0,
    htk=True,
    norm=None,
    dtype=np.float32,
  )


def log_mel(waveforms: np.ndarray, settings: MelSettings) -> np.ndarray:
  """Normalised log-mel spectrograms of clip waveforms.

  Args:
    waveforms: float array (..., clip_samples), mono.
    settings: from `mel_settings`.

  Returns:
    float32 array (..., num_mels, num_frames) = (..., 64, 104) at 44.1 kHz.
  """
  waveforms = np.asarray(waveforms, np.float32)
  if waveforms.shape[-1] != settings.clip_samples:
    raise ValueError(f'expected clips of {settings.clip_samples} samples, got shape {waveforms.shape}')
  stft = librosa.stft(
    waveforms,
    n_fft=settings.n_fft,
    hop_length=settings.hop_length,
    win_length=settings.win_length,
    window='hann',
    center=True,
    pad_mode='reflect',
  )
  power = stft.real**2 + stft.imag**2  # (..., 1 + n_fft/2, T)
  # One BLAS thread: these small products slow down ~100x when BLAS threads
  # compete for busy cores.
  with _blas_controller().limit(limits=1, user_api='blas'):
    mel = np.matmul(_mel_basis(settings), power)  # (..., num_mels, T)
  db = 10.0 * np.log10(np.maximum(mel, AMIN))
  floor = db.max(axis=(-2, -1), keepdims=True) - TOP_DB
  db = np.maximum(db, floor)
  return ((db - NORM_MEAN) / NORM_STD).astype(np.float32)


def clip_waveform(
  track: np.ndarray, sample_rate: int, fps: float, end_frame: int, clip_samples: int
) -> np.ndarray:
  """The waveform of the clip that ends at `end_frame` (1-based).

  The clip covers frames end_frame-31..end_frame, i.e. the times
  [(end_frame - 32) / fps, end_frame / fps). Its last `clip_samples` samples
  are kept, right-aligned on the clip end; what lies before the clip start,
  before the track start or after the track end is zeros (so a short clip is
  left-padded).

  Args:
    track: mono samples of the whole video, sample 0 at time 0 (anything sliced like a 1-D array).
    sample_rate: of `track`.
    fps: frame rate of the video.
    end_frame: 1-based end frame of the clip.
    clip_samples: output length.

  Returns:
    float32 array (clip_samples,).
  """
  stop = int(round(end_frame * sample_rate / fps))
  clip_start = int(round((end_frame - windows.FRAMES_PER_CLIP) * sample_rate / fps))
  out_start = stop - clip_samples  # sample index of out[0]
  lo = max(out_start, clip_start, 0)
  segment = track[lo:stop] if stop > lo else track[:0]  # shorter where the track ends (slicing only:
  # `track` may be predict's streamed window of the audio, whose length is not known yet)
  out = np.zeros(clip_samples, np.float32)
  out[lo - out_start : lo - out_start + len(segment)] = segment
  return out


def silent_log_mel(sample_rate: int = REFERENCE_SAMPLE_RATE) -> np.ndarray:
  """The normalised log-mel of a silent clip (a zero waveform), (64, frames).

  This is what a clip with missing audio looks like to the model in the missing-audio evaluation.
  """
  settings = mel_settings(sample_rate)
  return log_mel(np.zeros(settings.clip_samples, np.float32), settings)
