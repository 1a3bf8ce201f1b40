"""The files predict.py writes per video: the per-frame CSV, the challenge layout, the plot and the
overlay video. Each is written to a temporary name and renamed when complete."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import cv2
import matplotlib

matplotlib.use('Agg')  # files only, never a screen

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iaca_jax.evaluate_lib import submission_lines  # noqa: E402
from iaca_jax.face_video import open_video, upright  # noqa: E402
from iaca_jax.fileio import atomic_savefig, atomic_write  # noqa: E402
from iaca_jax.predict_lib import PredictError, VideoPrediction  # noqa: E402

CSV_HEADER = 'frame,time_s,valence,arousal,face,audio'
# A video where at least this share of frames has no face gets a warning in the summary line.
MOSTLY = 0.5
# What predict.py can write per video, by kind: the file's suffix after the video's name.
SUFFIXES = {'csv': '.csv', 'plot': '.png', 'abaw': '.txt', 'overlay': '.mp4'}


def video_name(prediction: VideoPrediction) -> str:
  return os.path.splitext(os.path.basename(prediction.faces.path))[0]


def plan_outputs(videos: Sequence[str], output_dir: str, kinds: Sequence[str]) -> list[dict[str, str]]:
  """Every output path of one predict command, before any work: per video, {kind: path} for `kinds`
  (keys of SUFFIXES), named `<output_dir>/<video name><suffix>`.

  No output replaces another: a video whose name an earlier one of the command already took gets
  `-2`, `-3`, ... (`a/clip.mp4` and `b/clip.mov` -> `clip.csv`, `clip-2.csv`). No output replaces an
  input: that raises PredictError naming both (e.g. `--overlay` with the input .mp4's own folder as
  --output_dir).
  """
  inputs = {os.path.realpath(v): v for v in videos}
  taken, plans = set(), []
  for video in videos:
    stem = os.path.splitext(os.path.basename(video))[0]
    name, n = stem, 1
    while name in taken:
      n += 1
      name = f'{stem}-{n}'
    taken.add(name)
    plan = {kind: os.path.join(output_dir, name + SUFFIXES[kind]) for kind in kinds}
    for path in plan.values():
      if os.path.realpath(path) in inputs:
        raise PredictError(
          f'{path} would replace the input video {inputs[os.path.realpath(path)]}; choose another --output_dir'
        )
    plans.append(plan)
  return plans


def write_csv(prediction: VideoPrediction, path: str) -> str:
  """`frame,time_s,valence,arousal,face,audio`: one row per frame (1-based frame, its start time, the
  post-processed prediction; face 1 when a face was found, audio 1 when the frame has sound). A row
  with face 0 was predicted from the audio alone, with audio 0 from the face alone, with both 0 from
  neither: the model's value for an empty input."""
  fps = prediction.faces.fps
  lines = [CSV_HEADER]
  flags = zip(prediction.face, ~prediction.silent)
  for i, ((v, a), (face, audio)) in enumerate(zip(prediction.smoothed, flags)):
    lines.append(f'{i + 1},{i / fps:.4f},{v:.6f},{a:.6f},{int(face)},{int(audio)}')
  atomic_write(path, '\n'.join(lines) + '\n')
  return path


def summary(path: str, prediction: VideoPrediction, written: Sequence[str], output_dir: str) -> str:
  """The lines predict.py prints for a finished video: what it held and what was written, then a
  warning for each way its predictions rest on less than both modalities."""
  face, audio = prediction.face, ~prediction.silent
  n = len(face)
  names = ', '.join(os.path.relpath(w, output_dir) for w in written)
  lines = [
    f'{path}: {n} frames ({n / prediction.faces.fps:.1f} s), face in {face.mean():.1%}, '
    f'sound in {audio.mean():.1%}; wrote {names} to {output_dir}'
  ]
  if prediction.audio_message:  # it names the file, which the first line names already
    lines.append(f'  warning: {prediction.audio_message.replace(prediction.faces.path, "the video")}')
  if 1 - face.mean() >= MOSTLY:
    lines.append(
      f'  warning: no face in {1 - face.mean():.0%} of the frames: their values come from the audio alone '
      '(face=0 in the CSV)'
    )
  neither = (~face & ~audio).mean()
  if neither > 0:
    lines.append(
      f'  warning: {neither:.0%} of the frames have neither a face nor sound: their values are the '
      "model's output for an empty input, not a reading of the video (face=0, audio=0 in the CSV)"
    )
  return '\n'.join(lines)


def write_abaw(prediction: VideoPrediction, path: str) -> str:
  """The challenge layout (as `evaluate.py --submission` writes it): `image_location,valence,arousal`
  with `<video>/<frame, 5 digits>.jpg` rows."""
  lines = ['image_location,valence,arousal'] + submission_lines(video_name(prediction), prediction.smoothed)
  atomic_write(path, '\n'.join(lines) + '\n')
  return path


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
  """[start, stop) index pairs of the runs of True in a (N,) bool array."""
  edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def figure(prediction: VideoPrediction) -> plt.Figure:
  """Valence and arousal over time, with the no-face and silent stretches shaded; the legend below the
  axes, where no curve can be."""
  fps = prediction.faces.fps
  n = len(prediction.smoothed)
  t = np.arange(n) / fps
  fig, axes = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True)
  shades = ((~prediction.face, '0.75', 'no face'), (prediction.silent, '#9ecae1', 'silent'))
  for d, (ax, name) in enumerate(zip(axes, ('valence', 'arousal'))):
    for flags, colour, label in shades:
      for k, (start, stop) in enumerate(_runs(flags)):
        ax.axvspan(start / fps, stop / fps, color=colour, alpha=0.5, lw=0, label=label if k == 0 else None)
    ax.plot(t, prediction.raw[:, d], color='0.5', lw=0.6, label='per clip')
    ax.plot(t, prediction.smoothed[:, d], color='C3' if d == 0 else 'C0', lw=1.5, label=f'{name}, smoothed')
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel(name)
    ax.axhline(0, color='k', lw=0.4)
  axes[-1].set_xlabel('time (s)')
  axes[0].set_title(f'{video_name(prediction)}: {prediction.face.mean():.0%} of frames with a face')
  handles = {}
  for ax in axes:  # one entry per label, in drawing order
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.legend(handles.values(), handles.keys(), loc='lower center', ncol=5, fontsize=7, frameon=False)
  return fig


def plot(prediction: VideoPrediction, path: str) -> str:
  """`figure` written as a PNG."""
  fig = figure(prediction)
  atomic_savefig(fig, path, dpi=110)
  plt.close(fig)
  return path


def _blend_disc(out: np.ndarray, centre: tuple[int, int], radius: int, colour, alpha: float) -> None:
  """Darkens (or tints) a disc of `out` in place: `alpha` of `colour` over the frame."""
  layer = out.copy()
  cv2.circle(layer, centre, radius, colour, -1, cv2.LINE_AA)
  cv2.addWeighted(layer, alpha, out, 1 - alpha, 0, dst=out)


def _draw(rgb: np.ndarray, prediction: VideoPrediction, i: int) -> np.ndarray:
  """Frame i with the face square (rotated as the crop) and a valence-arousal disc in the top-left:
  a dark translucent backing with a white rim and axes, and a red dot ringed in white, legible on
  bright and dark frames alike."""
  out = np.ascontiguousarray(rgb)
  track = prediction.faces.track
  if track.present[i]:
    corners = cv2.boxPoints(((*track.centre[i],), (track.side[i], track.side[i]), -track.angle[i]))
    cv2.polylines(out, [np.round(corners).astype(np.int32)], True, (0, 255, 0), 2)
  radius = max(20, min(out.shape[:2]) // 8)
  centre = (radius + 8, radius + 8)
  _blend_disc(out, centre, radius + 2, (0, 0, 0), 0.55)
  white = (255, 255, 255)
  cv2.circle(out, centre, radius, white, 2, cv2.LINE_AA)
  cv2.line(out, (centre[0] - radius, centre[1]), (centre[0] + radius, centre[1]), white, 1, cv2.LINE_AA)
  cv2.line(out, (centre[0], centre[1] - radius), (centre[0], centre[1] + radius), white, 1, cv2.LINE_AA)
  v, a = np.clip(prediction.smoothed[i], -1, 1)
  dot = (int(round(centre[0] + v * radius)), int(round(centre[1] - a * radius)))
  size = max(4, radius // 7)
  cv2.circle(out, dot, size + 2, white, -1, cv2.LINE_AA)
  cv2.circle(out, dot, size, (230, 30, 30), -1, cv2.LINE_AA)
  return out


class _AudioOnVideoClock:
  """Resampled audio frames stamped on the video's clock: audio that starts after the first video frame
  starts as late in the overlay, the part of audio that starts earlier is cut."""

  def __init__(self, video_start: float, layout: str, rate: int):
    self.video_start, self.layout, self.rate = video_start, layout, rate
    self.drop = None  # samples still to cut; None until the first audio frame's time is known
    self.next_pts = 0  # in samples of the video's clock

  def __call__(self, chunks: list[av.AudioFrame], time: float | None) -> Iterator[av.AudioFrame]:
    if self.drop is None:
      offset = int(round(((self.video_start if time is None else time) - self.video_start) * self.rate))
      self.drop, self.next_pts = max(-offset, 0), max(offset, 0)
    for chunk in chunks:
      if self.drop:
        samples = chunk.to_ndarray()
        cut = min(self.drop, samples.shape[1])
        self.drop -= cut
        if cut == samples.shape[1]:
          continue
        chunk = _audio_frame(samples[:, cut:], self.layout, self.rate)
      chunk.pts, chunk.time_base = self.next_pts, Fraction(1, self.rate)
      self.next_pts += chunk.samples
      yield chunk


def _audio_frame(samples: np.ndarray, layout: str, rate: int) -> av.AudioFrame:
  frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32), format='fltp', layout=layout)
  frame.sample_rate = rate
  return frame


def write_overlay(prediction: VideoPrediction, path: str) -> str:
  """The video, upright, with the face square and the valence-arousal marker drawn on it (H.264), its
  audio kept on the video's clock (re-encoded as AAC), written with PyAV one frame at a time."""
  source = prediction.faces.path
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp-{os.getpid()}{ext}'
  w, h = prediction.faces.width // 2 * 2, prediction.faces.height // 2 * 2  # yuv420p: even sides
  rate = Fraction(prediction.faces.fps).limit_denominator(1001)
  try:
    with open_video(source) as src, av.open(tmp, 'w') as dst:
      video_out = dst.add_stream('libx264', rate=rate)
      video_out.width, video_out.height, video_out.pix_fmt = w, h, 'yuv420p'
      streams = [src.streams.video[0]]
      audio_out = resampler = None
      if src.streams.audio:
        audio_in = src.streams.audio[0]
        streams.append(audio_in)
        audio_out = dst.add_stream('aac', rate=audio_in.rate)
        audio_out.layout = 'stereo' if audio_in.channels > 1 else 'mono'
        layout = audio_out.layout.name
        resampler = av.AudioResampler(format='fltp', layout=layout, rate=audio_in.rate)
        clock = _AudioOnVideoClock(prediction.faces.video_start, layout, audio_in.rate)
      i = 0
      for packet in src.demux(streams):
        for frame in packet.decode():
          if isinstance(frame, av.VideoFrame):
            if i < len(prediction.smoothed):
              rgb = upright(frame.to_ndarray(format='rgb24'), frame.rotation)
              out = av.VideoFrame.from_ndarray(_draw(rgb[:h, :w], prediction, i), format='rgb24')
              out.pts = i
              dst.mux(video_out.encode(out))
            i += 1
          elif audio_out is not None:
            for chunk in clock(resampler.resample(frame), frame.time):
              dst.mux(audio_out.encode(chunk))
      dst.mux(video_out.encode(None))
      if audio_out is not None:
        for chunk in clock(resampler.resample(None), None):
          dst.mux(audio_out.encode(chunk))
        dst.mux(audio_out.encode(None))
    os.replace(tmp, path)
  except (av.error.FFmpegError, ValueError) as e:
    raise PredictError(f'{source}: writing the overlay video {path} failed ({e})') from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
