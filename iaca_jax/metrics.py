"""Evaluation metrics on the host (SPEC 5): exact CCC, streaming CCC, per-video post-processing.

Everything here is NumPy in float64. The split-level protocol is:

1. ``frames_from_clips``: each frame takes the prediction of the clip that ends on it;
2. ``postprocess_video`` per video and dimension: clip to [-1, 1], then a zero-padded moving
   average of 20 frames (valence) / 50 frames (arousal);
3. ``evaluate_split``: CCC over the concatenation of all valid frames (label != -5) of all videos.

``CCCAccumulator`` gives the exact CCC over many batches (and hosts) without keeping the frames,
e.g. for a validation CCC on clips during training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

INVALID_LABEL = -5.0
"""Label value of an invalid (unannotated) frame, in either dimension."""

DIMENSIONS = ("valence", "arousal")
DEFAULT_WINDOWS = (20, 50)
"""Moving-average lengths in frames for (valence, arousal) [code]."""

FramePredictions = tuple[np.ndarray, np.ndarray]  # (frame_numbers (n,), predictions (n, D))


def concordance_cc(x: np.ndarray, y: np.ndarray) -> float:
    """Concordance correlation coefficient with population statistics, two-pass in float64.

    ``CCC = 2 cov(x, y) / (var x + var y + (mean x - mean y)^2)``. Symmetric in x and y.

    Args:
      x, y: arrays of the same size (flattened).

    Returns:
      the CCC; NaN when there is no sample or the denominator is 0.
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"concordance_cc: sizes differ ({x.size} vs {y.size})")
    if x.size == 0:
        return float("nan")
    mx, my = x.mean(), y.mean()
    dx, dy = x - mx, y - my
    den = np.mean(dx * dx) + np.mean(dy * dy) + (mx - my) ** 2
    return float(2.0 * np.mean(dx * dy) / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- streaming CCC


def _as_dims(values: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
    """(..., D) float64 array from an array or a dict of per-dimension arrays (``DIMENSIONS``)."""
    if isinstance(values, Mapping):
        parts = [np.asarray(values[name], np.float64) for name in DIMENSIONS]
        parts = [p[..., 0] if p.ndim > 1 and p.shape[-1] == 1 else p for p in parts]  # (..., 1) -> (...)
        return np.stack(parts, -1)
    return np.asarray(values, np.float64)


def _mask_rows(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """(M, D) bool from None, a shared (...) mask of M entries or a per-dimension (..., D) mask."""
    if mask is None:
        return np.ones(shape, bool)
    m = np.asarray(mask, bool)
    if m.size == shape[0]:
        return np.broadcast_to(m.reshape(shape[0], 1), shape)
    if m.size == shape[0] * shape[1]:
        return m.reshape(shape)
    raise ValueError(f"mask of shape {m.shape} fits neither {shape[0]} rows nor {shape} entries")


@dataclasses.dataclass(frozen=True, eq=False)
class CCCAccumulator:
    """Exact streaming CCC per dimension, mergeable across batches, devices and hosts.

    State per dimension: the count ``n``, the means and the *centred* sums
    ``m2_x = sum (x - mean_x)^2``, ``m2_y``, ``c_xy = sum (x - mean_x)(y - mean_y)``. Batches are
    combined with the pairwise update of Chan, Golub and LeVeque (parallel Welford). Why not plain
    float64 sums of x, x^2, xy: the variance would then come from ``sum x^2 / n - mean^2``, which
    loses about ``log10(mean^2 / var)`` digits (catastrophic for near-constant predictions far from
    0, and growing with the number of frames), whereas the centred form keeps full relative precision
    and its merge is exact in exact arithmetic, so merging accumulators from devices or hosts in
    any order gives the one-shot result up to rounding (~1e-15).

    Use it functionally: ``acc = acc.update(pred, target, mask)``; ``acc = a.merge(b)``.
    All fields are (D,) float64 arrays; ``names`` labels the dimensions.
    """

    n: np.ndarray
    mean_x: np.ndarray
    mean_y: np.ndarray
    m2_x: np.ndarray
    m2_y: np.ndarray
    c_xy: np.ndarray
    names: tuple[str, ...] = DIMENSIONS

    @classmethod
    def empty(cls, names: Sequence[str] = DIMENSIONS) -> CCCAccumulator:
        """An accumulator that has seen nothing."""
        zeros = np.zeros(len(names), np.float64)
        return cls(*(zeros.copy() for _ in range(6)), names=tuple(names))

    @classmethod
    def from_batch(
        cls,
        pred: np.ndarray | Mapping[str, np.ndarray],
        target: np.ndarray | Mapping[str, np.ndarray],
        mask: np.ndarray | None = None,
        names: Sequence[str] = DIMENSIONS,
    ) -> CCCAccumulator:
        """Statistics of one batch (two-pass).

        Args:
          pred, target: (..., D) arrays, or dicts of (...) arrays keyed by ``DIMENSIONS``.
          mask: None (all count), (...) bool shared by the dimensions, or (..., D) bool.
          names: the D dimension names.
        """
        x, y = _as_dims(pred), _as_dims(target)
        d = x.shape[-1]
        x, y = x.reshape(-1, d), y.reshape(-1, d)
        m = _mask_rows(mask, x.shape)
        n = m.sum(0).astype(np.float64)
        safe_n = np.maximum(n, 1.0)
        mean_x = np.where(m, x, 0.0).sum(0) / safe_n
        mean_y = np.where(m, y, 0.0).sum(0) / safe_n
        dx, dy = np.where(m, x - mean_x, 0.0), np.where(m, y - mean_y, 0.0)
        sums = ((dx * dx).sum(0), (dy * dy).sum(0), (dx * dy).sum(0))
        return cls(n, mean_x, mean_y, *sums, names=tuple(names))

    def merge(self, other: CCCAccumulator) -> CCCAccumulator:
        """The accumulator of the union of both data sets (Chan et al. pairwise update)."""
        if self.names != other.names:
            raise ValueError(f"merge: dimensions differ ({self.names} vs {other.names})")
        n = self.n + other.n
        w = other.n / np.maximum(n, 1.0)  # weight of `other` in the merged mean
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        cross = self.n * w  # = n_self * n_other / n
        return CCCAccumulator(
            n=n,
            mean_x=self.mean_x + dx * w,
            mean_y=self.mean_y + dy * w,
            m2_x=self.m2_x + other.m2_x + dx * dx * cross,
            m2_y=self.m2_y + other.m2_y + dy * dy * cross,
            c_xy=self.c_xy + other.c_xy + dx * dy * cross,
            names=self.names,
        )

    def update(
        self,
        pred: np.ndarray | Mapping[str, np.ndarray],
        target: np.ndarray | Mapping[str, np.ndarray],
        mask: np.ndarray | None = None,
    ) -> CCCAccumulator:
        """``self.merge(CCCAccumulator.from_batch(pred, target, mask))``."""
        return self.merge(CCCAccumulator.from_batch(pred, target, mask, self.names))

    def ccc(self) -> np.ndarray:
        """(D,) CCC per dimension; NaN where no sample was seen or the denominator is 0."""
        n = np.maximum(self.n, 1.0)
        den = (self.m2_x + self.m2_y) / n + (self.mean_x - self.mean_y) ** 2
        ok = (self.n > 0) & (den > 0)
        return np.where(ok, 2.0 * self.c_xy / n / np.where(ok, den, 1.0), np.nan)

    def result(self) -> dict[str, float]:
        """``{'ccc_<name>': ..., 'ccc_mean': ...}`` (the mean over the dimensions)."""
        values = self.ccc()
        out = {f"ccc_{name}": float(v) for name, v in zip(self.names, values)}
        out["ccc_mean"] = float(np.mean(values))
        return out


# ----------------------------------------------------------------------------- post-processing


def moving_average(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-padded moving average, equal to ``uniform_filter1d(x, size, mode='constant', cval=0)``.

    Output ``i`` is the sum of ``x[i - size//2 : i + (size-1)//2 + 1]`` (entries outside the
    sequence count as 0) divided by ``size`` (scipy's centring with ``origin=0``; for even sizes the
    window reaches one frame further back than forward). Computed with a float64 cumulative sum:
    the rounding error grows with the length (measured vs scipy: ~1e-13 at 1e4 frames of values in
    [0, 1], ~1e-12 at 5e4), far below what matters for a CCC.

    Args:
      x: (N,) values.
      size: window length >= 1.

    Returns:
      (N,) float64.
    """
    if size < 1:
        raise ValueError(f"moving_average: size must be >= 1, got {size}")
    x = np.asarray(x, np.float64)
    before, after = size // 2, (size - 1) // 2
    padded = np.concatenate([np.zeros(before), x, np.zeros(after)])
    csum = np.concatenate([[0.0], np.cumsum(padded)])
    return (csum[size:] - csum[:-size]) / size


def postprocess_video(pred_frames: np.ndarray, window: int) -> np.ndarray:
    """Per-video post-processing of one dimension (SPEC 5): clip to [-1, 1], then moving average.

    Args:
      pred_frames: (N,) per-frame predictions of one video, in frame order.
      window: moving-average length in frames (1 = no smoothing).

    Returns:
      (N,) float64.
    """
    return moving_average(np.clip(np.asarray(pred_frames, np.float64), -1.0, 1.0), window)


def postprocess_predictions(
    valence: np.ndarray,
    arousal: np.ndarray,
    window_valence: int = DEFAULT_WINDOWS[0],
    window_arousal: int = DEFAULT_WINDOWS[1],
) -> tuple[np.ndarray, np.ndarray]:
    """``postprocess_video`` of one video's (N,) valence and (N,) arousal with their windows."""
    return postprocess_video(valence, window_valence), postprocess_video(arousal, window_arousal)


# ----------------------------------------------------------------------------- clips -> frames


def _decode(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def _dedupe_sorted(video: str, frames: np.ndarray, preds: np.ndarray, atol: float) -> FramePredictions:
    """Drops repeated frames of sorted (frames, preds), after checking their predictions agree."""
    dup = np.flatnonzero(frames[1:] == frames[:-1]) + 1
    if dup.size:
        bad = ~np.all(np.isclose(preds[dup], preds[dup - 1], rtol=0.0, atol=atol), axis=-1)
        if bad.any():
            raise ValueError(
                f"frames_from_clips: video {video!r} has several clips ending on frame(s) "
                f"{sorted(set(frames[dup[bad]].tolist()))[:10]} with different predictions; "
                "each window should be evaluated exactly once"
            )
    keep = np.ones(frames.shape, bool)
    keep[dup] = False
    return frames[keep], preds[keep]


def frames_from_clips(
    video_names: Sequence | np.ndarray,
    end_frames: np.ndarray,
    predictions: np.ndarray | Mapping[str, np.ndarray],
    mask: np.ndarray | None = None,
    *,
    atol: float = 1e-6,
) -> dict[str, FramePredictions]:
    """Puts clip predictions back on per-video frames: each frame takes the clip ending on it.

    Args:
      video_names: (B,) per sequence or (B, L) per clip; str or bytes.
      end_frames: (B, L) int, the frame number each clip ends on.
      predictions: (B, L, D) array, or a dict of (B, L) arrays keyed by ``DIMENSIONS``.
      mask: (B, L) bool, True for real clips (False for padding); None keeps all. Do not pass the
        label-validity mask here: invalid frames are dropped later, after smoothing.
      atol: two clips of one video ending on the same frame are an error unless their predictions
        agree to within ``atol`` (then one is kept).

    Returns:
      ``{video: (frame_numbers (n,) int64 ascending, predictions (n, D) float64)}``.
    """
    ends = np.asarray(end_frames, np.int64)
    names = np.asarray(video_names, dtype=object)
    if names.shape != ends.shape:
        names = np.broadcast_to(names.reshape(names.shape + (1,) * (ends.ndim - names.ndim)), ends.shape)
    preds = _as_dims(predictions).reshape(ends.size, -1)
    keep = np.ones(ends.size, bool) if mask is None else np.asarray(mask, bool).ravel()
    names = np.array([_decode(n) for n in names.ravel()[keep]], dtype=str)
    ends, preds = ends.ravel()[keep], preds[keep]
    videos, group = np.unique(names, return_inverse=True)
    order = np.lexsort((ends, group))  # by video, then by end frame
    starts = np.searchsorted(group[order], np.arange(len(videos) + 1))
    return {
        str(video): _dedupe_sorted(str(video), ends[order[a:b]], preds[order[a:b]], atol)
        for video, a, b in zip(videos, starts[:-1], starts[1:])
    }


# ----------------------------------------------------------------------------- split evaluation


def _dense(video: str, entry, n_frames: int, first_frame: int, fill_missing: float | None) -> np.ndarray:
    """(N, D) per-frame predictions aligned with the label rows, from an array or (frames, preds)."""
    if not isinstance(entry, tuple):
        dense = _as_dims(entry)
        if dense.shape[0] != n_frames:
            raise ValueError(f"evaluate_split: video {video!r}: {dense.shape[0]} predictions, {n_frames} labels")
        return dense
    frames, preds = np.asarray(entry[0], np.int64), _as_dims(entry[1])
    dense = np.full((n_frames, preds.shape[-1]), np.nan)
    rows = frames - first_frame
    inside = (rows >= 0) & (rows < n_frames)
    dense[rows[inside]] = preds[inside]
    missing = np.isnan(dense).any(-1)
    if missing.any():
        if fill_missing is None:
            first = int(np.flatnonzero(missing)[0]) + first_frame
            raise ValueError(
                f"evaluate_split: video {video!r}: no prediction for {int(missing.sum())} labelled "
                f"frame(s), first {first}; pass fill_missing to fill them"
            )
        dense[missing] = fill_missing
    return dense


def postprocess_video_predictions(dense: np.ndarray, windows: Sequence[int] = DEFAULT_WINDOWS) -> np.ndarray:
    """``postprocess_video`` on each column of one video's (N, D) predictions; returns (N, D)."""
    return np.stack([postprocess_video(dense[:, d], w) for d, w in enumerate(windows)], -1)


def _ccc_dict(pred: np.ndarray, label: np.ndarray, prefix: str = "") -> dict[str, float]:
    """CCC per dimension over (n, D) frames, their mean and the frame count."""
    out = {f"{prefix}ccc_{name}": concordance_cc(pred[:, d], label[:, d]) for d, name in enumerate(DIMENSIONS)}
    out[f"{prefix}ccc_mean"] = float(np.mean([out[f"{prefix}ccc_{name}"] for name in DIMENSIONS]))
    out[f"{prefix}n_frames"] = int(pred.shape[0])
    return out


def evaluate_split(
    predictions: Mapping[str, np.ndarray | FramePredictions],
    labels: Mapping[str, np.ndarray],
    *,
    subsets: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    first_frame: int = 1,
    fill_missing: float | None = None,
) -> dict[str, float]:
    """Split-level CCC (SPEC 5): post-process each video, then CCC over all valid frames.

    Args:
      predictions: ``{video: (N, 2) array}`` aligned with the label rows, or
        ``{video: (frame_numbers, (n, 2) predictions)}`` as ``frames_from_clips`` returns (frames
        outside the label rows are ignored). Raw, i.e. before clipping and smoothing.
      labels: ``{video: (N, 2) [valence, arousal]}``; row j is frame ``first_frame + j``; a frame
        with -5 (or NaN) in either dimension is invalid. Only these videos are evaluated.
      subsets: optional ``{name: {video: (N,) bool}}`` frame subsets (e.g. corrupted frames); a video
        absent from a subset contributes no frame to it.
      windows: moving-average lengths for (valence, arousal).
      first_frame: frame number of the first label row (1 for Aff-Wild2).
      fill_missing: value for labelled frames without a prediction; None raises instead.

    Returns:
      ``ccc_valence``, ``ccc_arousal``, ``ccc_mean``, ``n_frames``, and per subset the same keys
      prefixed by ``<name>/``. CCC values are NaN when there is no valid frame.
    """
    subsets = subsets or {}
    preds, labs, subs = [], [], {name: [] for name in subsets}
    for video, label in labels.items():
        if video not in predictions:
            raise KeyError(f"evaluate_split: no predictions for video {video!r}")
        label = np.asarray(label, np.float64)
        dense = _dense(video, predictions[video], label.shape[0], first_frame, fill_missing)
        valid = np.all((label != INVALID_LABEL) & np.isfinite(label), axis=-1)
        preds.append(postprocess_video_predictions(dense, windows)[valid])
        labs.append(label[valid])
        for name, subset in subsets.items():
            chosen = np.asarray(subset.get(video, np.zeros(label.shape[0], bool)), bool)
            subs[name].append(chosen[valid])
    if not preds:
        raise ValueError("evaluate_split: no video to evaluate")
    pred, lab = np.concatenate(preds), np.concatenate(labs)
    out = _ccc_dict(pred, lab)
    for name, chosen in subs.items():
        chosen = np.concatenate(chosen)
        out.update(_ccc_dict(pred[chosen], lab[chosen], prefix=f"{name}/"))
    return out
