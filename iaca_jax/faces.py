"""Faces in any video: a face detector, one face track, smoothed and interpolated, aligned crops.

Two detectors (`make_detector`):
- **mtcnn** (the default): MTCNN (Zhang et al. 2016) from the `mtcnn` package, whose P-, R- and O-Net
  weights ship inside its wheel (no download at run time); it runs on the TensorFlow the project
  already needs for its shards. It gives a box and five landmarks (eye centres, nose tip, mouth
  corners), and the crop is the similarity transform that puts the landmarks on `TEMPLATE_112`, the
  alignment of the 112x112 crops the paper's data were made with (docs/PREDICT.md).
- **haar**: OpenCV's frontal-face Haar cascade (inside the `opencv-python-headless` 4.x wheel), with the
  eye cascade to level the eyes when it finds both; the crop is a square of `crop_scale` times the box.
  Faster and coarser: no landmarks, and it misses turned faces.

Either detector runs on every `detect_every`-th frame (on a copy whose longer side is `detect_size`
pixels). Each detection becomes a crop square (centre, side, in-plane angle: one similarity
transform); the squares are smoothed over consecutive detections of the face and interpolated linearly
for the frames in between. See `FaceTrack` and `build_track`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import cv2
import numpy as np

DETECTORS = ('mtcnn', 'haar')
DEFAULT_DETECTOR = 'mtcnn'
FACE_CASCADE = 'haarcascade_frontalface_default.xml'
EYE_CASCADE = 'haarcascade_eye.xml'
DEFAULT_DETECT_EVERY = 5  # frames; 30 fps -> 6 detections a second
DEFAULT_DETECT_SIZE = 320  # the longer side of the image the detector sees (pixels)
# [decision] The five-point template of the 112x112 aligned crops of ArcFace (Deng et al., CVPR 2019;
# insightface's `arcface_dst`): image-left eye, image-right eye, nose tip, image-left and image-right
# mouth corners, (x, y) in pixels of the 112x112 crop. The RetinaFace/MTCNN + five-landmark similarity
# alignment to 112x112 that the ABAW organisers describe for Aff-Wild2's `cropped_aligned` is this
# recipe; their exact template is not published.
TEMPLATE_112 = np.array(
  [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
TEMPLATE_SIZE = 112
# The crop side as a multiple of what the detector defines: for mtcnn the template's crop (1.0 = the
# template's framing), for haar the box side. [decision] haar: the Haar box spans brows to mouth; 1.25
# adds forehead and chin, close to the template's framing.
DEFAULT_CROP_SCALES = {'mtcnn': 1.0, 'haar': 1.25}
MAX_EYE_ANGLE = 30.0  # degrees; a larger eye-line tilt from the eye cascade is taken for a false detection
SMOOTH_DETECTIONS = 3  # centred moving average over this many consecutive detections of the track
SAME_FACE_IOU = 0.2  # a detection overlapping the track this much continues it
PREFERENCES = ('score', 'left', 'right')  # which face starts a track when there are several


@dataclasses.dataclass
class Detection:
  """What the detector saw on one frame: the chosen face's (x, y, w, h) box or None; mtcnn: its (5, 2)
  landmarks (x, y) in the order of TEMPLATE_112; haar: its eye-line angle when both eyes were found."""

  box: np.ndarray | None
  angle: float | None = None
  landmarks: np.ndarray | None = None


@dataclasses.dataclass
class FaceTrack:
  """One face per frame of a video (N frames): the crop square of each frame.

  The crop of frame i maps the square of `side[i]` pixels centred on `centre[i]`, turned by `angle[i]`,
  onto the crop image (`crop_face`): a similarity transform.

  Attributes:
    present: bool (N,): a face is assigned to the frame.
    centre: float (N, 2): the crop's centre (x, y) in frame pixels (0 where absent).
    side: float (N,): side of the crop square in frame pixels (0 where absent).
    angle: float (N,): the square's in-plane angle in degrees (image coordinates, counter-clockwise
      positive as in `cv2.getRotationMatrix2D`); the crop turns the face back by it.
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

  def matrix(self, i: int, size: int) -> np.ndarray:
    """(2, 3): frame pixels of frame i -> pixels of its (size, size) crop."""
    return crop_matrix(self.centre[i], self.side[i], self.angle[i], size)


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """(2, 3): the similarity transform (rotation, uniform scale, translation; no reflection) that maps
  the (K, 2) points `source` closest to `target` in least squares (Umeyama, PAMI 1991).

  Written here rather than taken from a library: OpenCV's `estimateAffinePartial2D` is a robust fit
  (RANSAC or LMedS) that may leave landmarks out, and scikit-image's `SimilarityTransform` (the tests'
  reference) is not a run-time dependency.
  """
  source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
  mu_s, mu_t = source.mean(0), target.mean(0)
  s, t = source - mu_s, target - mu_t
  u, d, vt = np.linalg.svd(t.T @ s / len(source))
  sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
  rotation = u @ sign @ vt
  scale = np.trace(np.diag(d) @ sign) / s.var(0).sum()
  return np.hstack([scale * rotation, (mu_t - scale * rotation @ mu_s)[:, None]])


def crop_matrix(centre: np.ndarray, side: float, angle: float, size: int) -> np.ndarray:
  """(2, 3): frame pixels -> pixels of the (size, size) crop of the square of `side` around `centre`,
  turned by `angle` degrees."""
  matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(angle), size / side)
  matrix[:, 2] += (size / 2 - centre[0], size / 2 - centre[1])
  return matrix


def square_of(matrix: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
  """The (centre, side, angle) whose `crop_matrix` is the similarity `matrix` (2, 3) of a (size, size)
  crop."""
  a, b = matrix[0, 0], matrix[0, 1]  # scale * (cos, sin) of the angle, as getRotationMatrix2D writes it
  scale = math.hypot(a, b)
  linear = matrix[:, :2]
  centre = np.linalg.solve(linear, np.array([size / 2, size / 2]) - matrix[:, 2])
  return centre, size / scale, math.degrees(math.atan2(b, a))


def aligned_square(landmarks: np.ndarray, crop_scale: float = 1.0) -> tuple[np.ndarray, float, float]:
  """The crop square that puts the (5, 2) landmarks on TEMPLATE_112 in a 112x112 crop; `crop_scale`
  widens it around its centre (1.0 = the template's framing)."""
  centre, side, angle = square_of(similarity(landmarks, TEMPLATE_112), TEMPLATE_SIZE)
  return centre, side * crop_scale, angle


def iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two (x, y, w, h) boxes."""
  ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = a[2] * a[3] + b[2] * b[3] - inter
  return float(inter / union) if union > 0 else 0.0


def choose_face(
  boxes: np.ndarray, scores: np.ndarray, previous: np.ndarray | None, prefer: str = 'score'
) -> int | None:
  """The index of the track's face among (K, 4) (x, y, w, h) boxes: the one overlapping the previous
  box of the track most (if by at least SAME_FACE_IOU); else by `prefer`: 'score' the highest (K,)
  score (the larger box on a tie), 'left' / 'right' the one whose centre is furthest that way (a
  video with two annotated people, Aff-Wild2's `_left` / `_right`). None when K = 0."""
  if len(boxes) == 0:
    return None
  if previous is not None:
    overlaps = [iou(b, previous) for b in boxes]
    best = int(np.argmax(overlaps))
    if overlaps[best] >= SAME_FACE_IOU:
      return best
  if prefer == 'left':
    return int(np.argmin(boxes[:, 0] + boxes[:, 2] / 2))
  if prefer == 'right':
    return int(np.argmax(boxes[:, 0] + boxes[:, 2] / 2))
  return int(np.lexsort((boxes[:, 2] * boxes[:, 3], scores))[-1])


def _downscaled(rgb: np.ndarray, longest: int) -> tuple[np.ndarray, float]:
  """The frame with its longer side at most `longest` pixels (area averaging), and the scale used."""
  h, w = rgb.shape[:2]
  scale = min(1.0, longest / max(h, w))
  if scale < 1.0:
    rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
  return rgb, scale


class _Detector:
  """One face track's detector: `__call__` finds every face of a frame (`detect_all`, in subclasses)
  and keeps the one continuing the track. `reset` before each video."""

  name = ''

  def __init__(self, detect_size: int = DEFAULT_DETECT_SIZE, prefer: str = 'score'):
    if prefer not in PREFERENCES:
      raise ValueError(f'prefer must be one of {PREFERENCES}, got {prefer!r}')
    self.detect_size = detect_size
    self.prefer = prefer
    self.previous: np.ndarray | None = None

  def reset(self, prefer: str | None = None) -> None:
    """Forgets the track (a new video), optionally with another preference."""
    self.previous = None
    if prefer is not None:
      self.prefer = prefer

  def detect_all(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(K, 4) boxes (x, y, w, h), (K,) scores and (K, 5, 2) landmarks or None, in frame pixels."""
    raise NotImplementedError

  def describe(self, rgb: np.ndarray, box: np.ndarray, landmarks: np.ndarray | None) -> Detection:
    return Detection(box, landmarks=landmarks)

  def __call__(self, rgb: np.ndarray) -> Detection:
    """The track's face on an (H, W, 3) uint8 RGB frame (see `choose_face`), or Detection(None)."""
    boxes, scores, landmarks = self.detect_all(rgb)
    k = choose_face(boxes, scores, self.previous, self.prefer)
    if k is None:
      return Detection(None)
    self.previous = boxes[k]
    return self.describe(rgb, boxes[k], None if landmarks is None else landmarks[k])


class MtcnnDetector(_Detector):
  """MTCNN's face boxes and five landmarks (the `mtcnn` package; its first use imports TensorFlow)."""

  name = 'mtcnn'

  def __init__(self, detect_size: int = DEFAULT_DETECT_SIZE, prefer: str = 'score'):
    super().__init__(detect_size, prefer)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    from mtcnn import MTCNN  # noqa: PLC0415 - TensorFlow loads here, only for this detector

    self.model = MTCNN(stages='face_and_landmarks_detection', device='CPU:0')

  def detect_all(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    small, scale = _downscaled(rgb, self.detect_size)
    # Rows: image index, x0, y0, x1, y1, score, the five x, the five y (mtcnn/utils/bboxes.py).
    rows = np.asarray(self.model.detect_faces(small, box_format='xyxy', output_type='numpy'), np.float64)
    rows = rows.reshape(-1, 16)
    boxes = np.stack([rows[:, 1], rows[:, 2], rows[:, 3] - rows[:, 1], rows[:, 4] - rows[:, 2]], 1)
    landmarks = np.stack([rows[:, 6:11], rows[:, 11:16]], -1)
    return boxes / scale, rows[:, 5], landmarks / scale


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


class HaarDetector(_Detector):
  """The Haar face cascade (and the eye cascade) on a downscaled grey copy of each frame."""

  name = 'haar'

  def __init__(self, detect_size: int = DEFAULT_DETECT_SIZE, prefer: str = 'score'):
    super().__init__(detect_size, prefer)
    self.faces = _cascade(FACE_CASCADE)
    self.eyes = _cascade(EYE_CASCADE)

  def detect_all(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """Scores: the number of detector windows merged into each box."""
    small, scale = _downscaled(rgb, self.detect_size)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    boxes, votes = self.faces.detectMultiScale2(grey, scaleFactor=1.1, minNeighbors=5, minSize=(20, 20))
    return (
      np.asarray(boxes, np.float64).reshape(-1, 4) / scale,
      np.asarray(votes, np.float64).reshape(-1),
      None,
    )

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

  def describe(self, rgb: np.ndarray, box: np.ndarray, landmarks: None) -> Detection:
    return Detection(box, angle=self.eye_angle(rgb, box))


def make_detector(
  name: str = DEFAULT_DETECTOR, detect_size: int = DEFAULT_DETECT_SIZE, prefer: str = 'score'
):
  """A detector by name ('mtcnn' or 'haar')."""
  classes = {'mtcnn': MtcnnDetector, 'haar': HaarDetector}
  if name not in classes:
    raise ValueError(f'unknown face detector {name!r}; expected one of {DETECTORS}')
  return classes[name](detect_size, prefer)


def _smooth_runs(values: np.ndarray, found: np.ndarray, width: int) -> np.ndarray:
  """Centred moving average of (K, D) values over each run of consecutive found entries; near a run's
  ends the window shrinks to stay centred (an entry at the end keeps its value), so that a face moving
  steadily is not pulled back toward where it was."""
  out = values.copy()
  k = len(values)
  for i in np.flatnonzero(found):
    lo, hi = i, i
    while lo > 0 and found[lo - 1]:
      lo -= 1
    while hi < k - 1 and found[hi + 1]:
      hi += 1
    half = min(width // 2, i - lo, hi - i)
    out[i] = values[i - half : i + half + 1].mean(axis=0)
  return out


def detection_square(detection: Detection, crop_scale: float) -> tuple[np.ndarray, float, float | None]:
  """The crop square (centre, side, angle or None when unknown) of a detection that found a face:
  the template alignment of its landmarks, else `crop_scale` times its box, turned by its eye angle."""
  if detection.landmarks is not None:
    return aligned_square(detection.landmarks, crop_scale)
  x, y, w, h = detection.box
  return np.array([x + w / 2, y + h / 2]), max(w, h) * crop_scale, detection.angle


def _extrapolated(frames: np.ndarray, found: np.ndarray, i: int, k: int) -> list[tuple[int, float]]:
  """Weights over detections for frame i, whose nearer detection is k: k's square carried on linearly
  with the motion from k's neighbour inside the face's run (away from i), else k's square as it is."""
  step = 1 if frames[k] > i else -1  # the neighbour on the far side of k from i
  n = k + step
  if not found[k] or not 0 <= n < len(frames) or not found[n]:
    return [(k, 1.0)]
  u = (i - frames[k]) / (frames[k] - frames[n])
  return [(k, 1.0 + u), (n, -u)]


def build_track(detections: dict[int, Detection], num_frames: int, crop_scale: float) -> FaceTrack:
  """The per-frame face track from the detections on some frames (0-based frame -> Detection).

  Each detection's crop square (`detection_square`) is smoothed over consecutive detections of the
  face; a frame between two detections that both found the face gets their linear interpolation; a
  frame next to a detection that did not (or at either end of the video) follows the nearer
  detection: no face when it found none, else its square carried on with the face's motion between it
  and its neighbour in the run (linear extrapolation over at most half the detection interval). Angles unknown on a detection (haar without both
  eyes) are interpolated from the detections that have one (0 when none has).
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
  angles = np.zeros(len(frames))
  has_angle = np.zeros(len(frames), bool)
  for j, f in enumerate(frames):
    if found[j]:
      c, s, a = detection_square(detections[f], crop_scale)
      values[j] = (c[0], c[1], s)
      if a is not None:
        angles[j], has_angle[j] = a, True
  values = _smooth_runs(values, found, SMOOTH_DETECTIONS)
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
      if found[j] and found[j + 1]:
        nearest = [(j, 1 - t), (j + 1, t)]
      else:  # next to a detection without the face: the nearer detection's answer
        nearest = _extrapolated(frames, found, i, j if t <= 0.5 else j + 1)
    if not all(found[k] for k, _ in nearest):
      continue
    present[i] = True
    v = sum(w * values[k] for k, w in nearest)
    centre[i], side[i] = v[:2], v[2]
    angle[i] = sum(w * angles[k] for k, w in nearest)
  return FaceTrack(present, centre, side, angle, detected)


def crop_face(rgb: np.ndarray, centre: np.ndarray, side: float, angle: float, size: int) -> np.ndarray:
  """The square of `side` pixels around `centre`, turned by `angle` degrees (levelling the eyes),
  resized to (size, size, 3) uint8; what lies outside the frame is black."""
  matrix = crop_matrix(centre, side, angle, size)
  scale = size / side
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
