"""Concordance-correlation (CCC) training loss (docs/DESIGN.md §4), exact under data parallelism.

The loss is ``(1 - CCC_v) + (1 - CCC_a)`` over the valid clips of the batch, with population
statistics. CCC is not a mean over samples, so the loss of a global batch split across devices is
*not* the mean of the per-device losses. It is, however, a function of six moment sums
(``n, sum_x, sum_y, sum_xx, sum_yy, sum_xy``), which add across devices: inside ``jax.shard_map``,
``psum`` the sums and the global CCC is exact (``ccc_loss(..., axis_name='data')``).

Numerics: all statistics are computed in (at least) float32, two-pass: a first pass gives the
means, a second pass the second moments of the data shifted by those means. This avoids the
cancellation of ``E[x^2] - E[x]^2`` when ``|mean| >> std`` (for instance near-constant predictions
early in training). The shift is held under ``stop_gradient``: CCC is algebraically independent of
the shift, so this leaves the gradient unchanged. The denominator carries ``EPS = 1e-8`` so that a
constant prediction equal to a constant target gives 0 instead of 0/0.

Masking uses ``jnp.where`` (never multiplication), so masked entries contribute nothing, not even a
NaN or an infinite value, to the loss or to its gradient.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import jax
import jax.numpy as jnp

EPS = 1e-8
"""Added to the CCC denominator ``var_x + var_y + (mean_x - mean_y)^2``."""

MOMENT_KEYS = ('n', 'sum_x', 'sum_y', 'sum_xx', 'sum_yy', 'sum_xy')

Moments = dict[str, jnp.ndarray]
ArrayOrDict = jnp.ndarray | Mapping[str, jnp.ndarray]


def _compute_dtype(x: jnp.ndarray) -> jnp.dtype:
  """float32, or float64 when the input already is (bf16/fp16 inputs are upcast)."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def ccc_moments(
  pred: jnp.ndarray,
  target: jnp.ndarray,
  mask: jnp.ndarray,
  center_x: jnp.ndarray | float = 0.0,
  center_y: jnp.ndarray | float = 0.0,
) -> Moments:
  """Moment sums of the masked entries of ``pred - center_x`` and ``target - center_y``.

  Args:
    pred: predictions, any shape S.
    target: targets, shape S.
    mask: bool, broadcastable to S; True marks the entries that count.
    center_x, center_y: scalar shifts subtracted before summing (0 gives the raw sums).

  Returns:
    dict with scalar entries ``n, sum_x, sum_y, sum_xx, sum_yy, sum_xy``. Sums from disjoint parts
    of the data (e.g. devices, via ``jax.lax.psum``) add up to the sums of the whole, provided the
    same centres are used everywhere.
  """
  dtype = _compute_dtype(pred)
  m = jnp.broadcast_to(mask, jnp.shape(pred))
  x = jnp.where(m, pred.astype(dtype) - center_x, 0.0)
  y = jnp.where(m, target.astype(dtype) - center_y, 0.0)
  return {
    'n': jnp.sum(m, dtype=dtype),
    'sum_x': jnp.sum(x),
    'sum_y': jnp.sum(y),
    'sum_xx': jnp.sum(x * x),
    'sum_yy': jnp.sum(y * y),
    'sum_xy': jnp.sum(x * y),
  }


def ccc_from_moments(
  moments: Moments,
  center_x: jnp.ndarray | float = 0.0,
  center_y: jnp.ndarray | float = 0.0,
  eps: float = EPS,
) -> jnp.ndarray:
  """CCC (population statistics) from moment sums made by ``ccc_moments`` with the same centres.

  ``CCC = 2 cov / (var_x + var_y + (mean_x - mean_y)^2 + eps)``; returns 0 when ``n == 0``.

  Args:
    moments: dict of scalar sums (see ``MOMENT_KEYS``).
    center_x, center_y: the shifts the sums were computed with.
    eps: added to the denominator.

  Returns:
    scalar CCC.
  """
  n = jnp.maximum(moments['n'], 1.0)
  mx, my = moments['sum_x'] / n, moments['sum_y'] / n
  var_x = jnp.maximum(moments['sum_xx'] / n - mx * mx, 0.0)
  var_y = jnp.maximum(moments['sum_yy'] / n - my * my, 0.0)
  cov = moments['sum_xy'] / n - mx * my
  mean_diff = (center_x - center_y) + (mx - my)
  return 2.0 * cov / (var_x + var_y + mean_diff * mean_diff + eps)


def _psum(moments: Moments, axis_name: Hashable | None) -> Moments:
  """Sums the moments over a mapped axis (identity when ``axis_name`` is None)."""
  return moments if axis_name is None else jax.lax.psum(moments, axis_name)


def masked_ccc(
  pred: jnp.ndarray,
  target: jnp.ndarray,
  mask: jnp.ndarray,
  *,
  axis_name: Hashable | None = None,
  eps: float = EPS,
) -> jnp.ndarray:
  """CCC over the masked entries of arrays of any shape (flattened), two-pass, jit-safe.

  Args:
    pred: predictions, any shape S.
    target: targets, shape S (entries outside the mask may hold anything, even NaN).
    mask: bool, broadcastable to S.
    axis_name: if given (inside ``shard_map``), the CCC of the union of all shards' entries.
    eps: added to the denominator.

  Returns:
    scalar CCC; 0 when no entry is masked in (its gradient is then 0).
  """
  first = _psum(ccc_moments(pred, target, mask), axis_name)
  n = jnp.maximum(first['n'], 1.0)
  cx = jax.lax.stop_gradient(first['sum_x'] / n)
  cy = jax.lax.stop_gradient(first['sum_y'] / n)
  second = _psum(ccc_moments(pred, target, mask, cx, cy), axis_name)
  return ccc_from_moments(second, cx, cy, eps)


def _split_va(values: ArrayOrDict, batch_ndim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(valence, arousal), each of shape (B, L), from a dict or a (B, L, 2) array."""
  if isinstance(values, Mapping):
    pair = (jnp.asarray(values['valence']), jnp.asarray(values['arousal']))
    return tuple(v[..., 0] if v.ndim == batch_ndim + 1 else v for v in pair)
  values = jnp.asarray(values)
  return values[..., 0], values[..., 1]


def ccc_loss(
  predictions: ArrayOrDict,
  labels: ArrayOrDict,
  mask: jnp.ndarray,
  *,
  axis_name: Hashable | None = None,
  eps: float = EPS,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """``(1 - CCC_v) + (1 - CCC_a)`` over the valid clips of the batch (docs/DESIGN.md §4).

  Args:
    predictions: (B, L, 2) array [valence, arousal], or a dict with ``valence`` and ``arousal``
      entries of shape (B, L) or (B, L, 1).
    labels: the same forms as ``predictions``; entries outside the mask may be -5 or NaN.
    mask: (B, L) bool, True for the valid clips.
    axis_name: inside ``jax.shard_map`` over the batch, the mapped axis name: the moment sums are
      psum'ed, so the loss (replicated on every shard) is the exact loss of the global batch.
    eps: added to the CCC denominators.

  Returns:
    (loss, aux). loss: scalar; 0 (with zero gradient) when no clip is valid. aux: ``ccc_valence``,
    ``ccc_arousal`` (0 when no clip is valid) and ``n_valid`` (the number of valid clips, global
    when ``axis_name`` is given).
  """
  mask = jnp.asarray(mask, bool)
  pv, pa = _split_va(predictions, mask.ndim)
  lv, la = _split_va(labels, mask.ndim)
  ccc_v = masked_ccc(pv, lv, mask, axis_name=axis_name, eps=eps)
  ccc_a = masked_ccc(pa, la, mask, axis_name=axis_name, eps=eps)
  n_valid = jnp.sum(mask, dtype=jnp.int32)
  if axis_name is not None:
    n_valid = jax.lax.psum(n_valid, axis_name)
  loss = jnp.where(n_valid > 0, 2.0 - ccc_v - ccc_a, 0.0)
  return loss, {'ccc_valence': ccc_v, 'ccc_arousal': ccc_a, 'n_valid': n_valid}
