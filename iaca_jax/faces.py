"""Faces in any video: OpenCV's Haar cascades, one face track, smoothed boxes, square aligned crops.

[decision] The detector is the frontal-face Haar cascade that ships inside the
`opencv-python-headless` 4.x wheel (`cv2.data.haarcascades`): it works offline with no model download,
is fast on a CPU, and finds the face of scikit-image's astronaut photograph (the test video). OpenCV
5.x no longer ships the cascades (its DNN face detector needs an ONNX file that is not in the wheel),
hence the pin to 4.14.0.94. The eye cascade of the same folder levels the eyes when it finds both.

The detector runs on every `detect_every`-th frame (on a copy whose longer side is `detect_size`
pixels); the frames in between take boxes interpolated linearly between the two detections around
them. Per frame the track holds the face centre, its side and the eye angle; see `FaceTrack`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import cv2
import numpy as np

FACE_CASCADE = 'haarcascade_frontalface_default.xml'
EYE_CASCADE = 'haarcascade_eye.xml'
DEFAULT_DETECT_EVERY = 5  # frames; 30 fps -> 6 detections a second
DEFAULT_DETECT_SIZE = 320  # the longer side of the image the detector sees (pixels)
# [decision] The square crop's side is this many times the Haar box side: the Haar box spans brows to
# mouth; 1.25 adds forehead and chin, close to the framing of Aff-Wild2's 112x112 aligned crops.
DEFAULT_CROP_SCALE = 1.25
MAX_EYE_ANGLE = 30.0  # degrees; a larger eye-line tilt is taken for a false eye detection
SMOOTH_DETECTIONS = 3  # centred moving average over this many consecutive detections of the track
SAME_FACE_IOU = 0.2  # a detection overlapping the track this much continues it


@dataclasses.dataclass
class Detection:
  """What the detector saw on one frame: the chosen face (x, y, w, h) or None, and its eye angle."""

  box: np.ndarray | None
  angle: float | None = None


@dataclasses.dataclass
class FaceTrack:
  """One face per frame of a video (N frames).

  Attributes:
    present: bool (N,): a face is assigned to the frame.
    centre: float (N, 2): face centre (x, y) in pixels (0 where absent).
    side: float (N,): side of the square crop in pixels (0 where absent).
    angle: float (N,): eye-line angle in degrees (image coordinates, counter-clockwise positive
      as in `cv2.getRotationMatrix2D`); the crop is rotated by it.
    detected: bool (N,): the detector ran on the frame.
  """

  present: np.ndarray
  centre: np.ndarray
  side: np.ndarray
  angle: np.ndarray
  detected: np.ndarray

  @property
  def num_frames(self) -> int:
    return len(self.present)

  def box(self, i: int) -> tuple[float, float, float, float]:
    """The crop square of frame i (0-based) as (x0, y0, x1, y1), before rotation."""
    (cx, cy), half = self.centre[i], self.side[i] / 2
    return cx - half, cy - half, cx + half, cy + half


def _cascade(name: str) -> cv2.CascadeClassifier:
  folder = getattr(getattr(cv2, 'data', None), 'haarcascades', '')
  path = os.path.join(folder, name)
  if not hasattr(cv2, 'CascadeClassifier') or not os.path.isfile(path):
    raise OSError(
      f'OpenCV {cv2.__version__} has no Haar cascade {name}: install opencv-python-headless==4.14.0.94 '
      '(OpenCV 5 no longer ships the cascades).'
    )
  cascade = cv2.CascadeClassifier(path)
  if cascade.empty():
    raise OSError(f'cannot load the Haar cascade {path}')
  return cascade


def iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two (x, y, w, h) boxes."""
  ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = a[2] * a[3] + b[2] * b[3] - inter
  return float(inter / union) if union > 0 else 0.0


def choose_face(boxes: np.ndarray, votes: np.ndarray, previous: np.ndarray | None) -> np.ndarray | None:
  """The face of the track among (K, 4) (x, y, w, h) boxes: the one overlapping the previous box of
  the track most (if by at least SAME_FACE_IOU), else the one most detector windows voted for (K,),
  the larger on a tie; None when K = 0."""
  if len(boxes) == 0:
    return None
  if previous is not None:
    overlaps = [iou(b, previous) for b in boxes]
    best = int(np.argmax(overlaps))
    if overlaps[best] >= SAME_FACE_IOU:
      return boxes[best]
  return boxes[int(np.lexsort((boxes[:, 2] * boxes[:, 3], votes))[-1])]


class FaceDetector:
  """The Haar face cascade (and the eye cascade) on a downscaled grey copy of each frame."""

  def __init__(self, detect_size: int = DEFAULT_DETECT_SIZE):
    self.detect_size = detect_size
    self.faces = _cascade(FACE_CASCADE)
    self.eyes = _cascade(EYE_CASCADE)
    self.previous: np.ndarray | None = None

  def detect_all(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every face of an (H, W, 3) uint8 RGB frame: (K, 4) float (x, y, w, h) in frame pixels and the
    (K,) number of detector windows merged into each."""
    h, w = rgb.shape[:2]
    scale = min(1.0, self.detect_size / max(h, w))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
      grey = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    boxes, votes = self.faces.detectMultiScale2(grey, scaleFactor=1.1, minNeighbors=5, minSize=(20, 20))
    return np.asarray(boxes, np.float64).reshape(-1, 4) / scale, np.asarray(votes).reshape(-1)

  def eye_angle(self, rgb: np.ndarray, box: np.ndarray) -> float | None:
    """The eye-line angle (degrees) inside a face box when two eyes are found in its upper half."""
    x, y, w, h = (int(round(v)) for v in box)
    top = rgb[max(y, 0) : max(y + h // 2, 0), max(x, 0) : max(x + w, 0)]
    if top.size == 0:
      return None
    grey = cv2.cvtColor(top, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, 96.0 / max(grey.shape))
    if scale < 1.0:
      grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    eyes = self.eyes.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=3, minSize=(6, 6))
    if len(eyes) < 2:
      return None
    eyes = sorted(eyes, key=lambda e: -e[2] * e[3])[:2]
    (x0, y0), (x1, y1) = sorted((e[0] + e[2] / 2, e[1] + e[3] / 2) for e in eyes)
    if x1 - x0 < grey.shape[1] * 0.2:
      return None
    angle = math.degrees(math.atan2(y1 - y0, x1 - x0))
    return angle if abs(angle) <= MAX_EYE_ANGLE else None

  def __call__(self, rgb: np.ndarray) -> Detection:
    """The track's face on this frame (see `choose_face`) and its eye angle."""
    box = choose_face(*self.detect_all(rgb), self.previous)
    if box is not None:
      self.previous = box
      return Detection(box, self.eye_angle(rgb, box))
    return Detection(None)


def _smooth_runs(values: np.ndarray, found: np.ndarray, width: int) -> np.ndarray:
  """Centred moving average of (K, D) values over each run of consecutive found entries."""
  out = values.copy()
  half = width // 2
  k = len(values)
  for i in np.flatnonzero(found):
    lo, hi = i, i
    while lo > max(i - half, 0) and found[lo - 1]:
      lo -= 1
    while hi < min(i + half, k - 1) and found[hi + 1]:
      hi += 1
    out[i] = values[lo : hi + 1].mean(axis=0)
  return out


def build_track(
  detections: dict[int, Detection], num_frames: int, crop_scale: float = DEFAULT_CROP_SCALE
) -> FaceTrack:
  """The per-frame face track from the detections on some frames (0-based frame -> Detection).

  Detected boxes (centre, side) and eye angles are smoothed over consecutive detections of the face;
  a frame between two detections that both found the face gets their linear interpolation; a frame
  next to a detection that did not (or at either end of the video) takes the nearer detection's box,
  or no face when that detection found none. Eye angles missing on a detection are interpolated from
  the detections that have one (0 when none has).
  """
  frames = np.asarray(sorted(detections), np.int64)
  present = np.zeros(num_frames, bool)
  centre = np.zeros((num_frames, 2))
  side = np.zeros(num_frames)
  angle = np.zeros(num_frames)
  detected = np.zeros(num_frames, bool)
  detected[frames] = True
  if frames.size == 0:
    return FaceTrack(present, centre, side, angle, detected)
  found = np.array([detections[f].box is not None for f in frames])
  values = np.zeros((len(frames), 3))  # cx, cy, side
  for j, f in enumerate(frames):
    box = detections[f].box
    if box is not None:
      values[j] = (box[0] + box[2] / 2, box[1] + box[3] / 2, max(box[2], box[3]) * crop_scale)
  values = _smooth_runs(values, found, SMOOTH_DETECTIONS)
  has_angle = np.array([detections[f].angle is not None for f in frames]) & found
  angles = np.array([detections[f].angle or 0.0 for f in frames])
  if has_angle.any():
    angles = np.interp(frames, frames[has_angle], angles[has_angle])
    angles = _smooth_runs(angles[:, None], found, SMOOTH_DETECTIONS)[:, 0]
  else:
    angles = np.zeros(len(frames))
  for i in range(num_frames):
    j = int(np.searchsorted(frames, i, side='right')) - 1  # last detection at or before i
    if j >= 0 and frames[j] == i:
      nearest = [(j, 1.0)]
    elif j < 0:
      nearest = [(0, 1.0)]
    elif j == len(frames) - 1:
      nearest = [(j, 1.0)]
    else:
      t = (i - frames[j]) / (frames[j + 1] - frames[j])
      nearest = [(j, 1 - t), (j + 1, t)] if found[j] and found[j + 1] else [(j if t <= 0.5 else j + 1, 1.0)]
    if not all(found[k] for k, _ in nearest):
      continue
    present[i] = True
    v = sum(w * values[k] for k, w in nearest)
    centre[i], side[i] = v[:2], v[2]
    angle[i] = sum(w * angles[k] for k, w in nearest)
  return FaceTrack(present, centre, side, angle, detected)


def crop_face(rgb: np.ndarray, centre: np.ndarray, side: float, angle: float, size: int) -> np.ndarray:
  """The square of `side` pixels around `centre`, rotated by `angle` degrees (levelling the eyes),
  resized to (size, size, 3) uint8; what lies outside the frame is black."""
  scale = size / side
  matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(angle), scale)
  matrix[:, 2] += (size / 2 - centre[0], size / 2 - centre[1])
  source = rgb
  if scale < 0.5:  # shrink first with area averaging: warpAffine's bilinear sampling would alias
    factor = 0.5 / scale
    source = cv2.resize(
      rgb,
      (max(1, round(rgb.shape[1] / factor)), max(1, round(rgb.shape[0] / factor))),
      interpolation=cv2.INTER_AREA,
    )
    sx, sy = rgb.shape[1] / source.shape[1], rgb.shape[0] / source.shape[0]
    matrix = matrix @ np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])
  return cv2.warpAffine(
    source, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
  )
