"""Exact first and second moments in float64, and their pairwise merge.

Everything here works on (count, mean, M2) triples, where M2 is the sum of
squared deviations from the mean. The estimators reduce their blocks with the
compiled kernel of :mod:`normstats.kernels` (one pass of shifted sums);
:func:`moments` is the plain two-pass NumPy form of the same quantity, for
arrays in memory. Across blocks, shards and workers the triples are combined
with the update of Chan, Golub & LeVeque (1979)::

    delta = mean_b - mean_a
    n     = n_a + n_b
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta**2 * n_a * n_b / n

Never ``sum(x**2) - sum(x)**2 / n``: that loses all digits of the variance when
the mean is large against the spread (float32 features with offset 1e6).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from .workspace import Workspace


def moments(
    x: np.ndarray,
    axes: tuple[int, ...],
    workspace: Optional[Workspace] = None,
    *,
    shift: Optional[np.ndarray] = None,
    weights: Optional[np.ndarray] = None,
    omit_nonfinite: bool = False,
) -> tuple[Union[int, np.ndarray], np.ndarray, np.ndarray]:
    """Count, mean and M2 of `x` over `axes`, two-pass, in float64.

    Parameters
    ----------
    x : ndarray
        Numeric array of any dtype; it is never modified.
    axes : tuple of int
        Non-negative axes to reduce.
    workspace : Workspace, optional
        Reused scratch memory for the float64 deviations (one array of
        ``x.shape``); without it a temporary is allocated.
    shift : ndarray, optional
        Subtracted from `x` first (broadcastable to it); the mean returned is
        then relative to it. A shift near the data keeps the digits that a
        large common offset would otherwise take from the mean.
    weights : ndarray, optional
        Non-negative weights broadcastable to `x` (e.g. one per row, shaped
        ``(rows, 1, ...)``); the count becomes the weight sum.
    omit_nonfinite : bool
        Leave NaN and ±Inf elements out; counts then differ per statistic.

    Returns
    -------
    count : int or ndarray of float64
        Elements (or weight) reduced per statistic: an int when it is the
        same for all, else an array of the statistic's shape.
    mean, m2 : ndarray of float64
        Shape of `x` without `axes`; NaN mean where the count is 0.
    """
    if weights is None and not omit_nonfinite:
        return _plain_moments(x, axes, workspace, shift)
    values = np.asarray(x, dtype=np.float64)
    if shift is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            values = values - shift
    return _weighted_moments(values, axes, weights, omit_nonfinite)


def _plain_moments(
    x: np.ndarray, axes: tuple[int, ...], workspace: Optional[Workspace], shift: Optional[np.ndarray]
) -> tuple[int, np.ndarray, np.ndarray]:
    """The unweighted path of :func:`moments`.

    The data are copied to float64 once; a first pass takes their mean `c`,
    then the deviations from it are summed, with their squares::

        d = x - c,   mean = c + sum(d)/n,   M2 = sum(d**2) - sum(d)**2/n

    `c` is within a few float64 roundings of the mean, so the last term is
    tiny and cancels nothing that matters: the corrected two-pass algorithm,
    not the raw sum/sum-of-squares formula. (A float32 first pass is faster
    but drifts: 2048 float32 values near 1e6 sum to a mean 30 off, which at
    a spread of 1e-2 costs six digits.)
    """
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    values = np.empty(x.shape) if workspace is None else workspace.array("deviations", x.shape, np.float64)
    # NaN / Inf propagate into the result, where the caller's policy finds them.
    with np.errstate(invalid="ignore", over="ignore"):
        np.copyto(values, x, casting="unsafe")  # a plain cast: far faster than a mixed-type subtract
        center = _axis_sum(values, axes) / count  # float64: float32 sums drift by far more than a spread
        np.subtract(values, np.expand_dims(center, axes), out=values)
        sums = _axis_sum(values, axes)
        np.square(values, out=values)
        m2 = _axis_sum(values, axes) - sums * sums / count
        if shift is not None:  # (center - shift) first: close numbers subtract exactly
            kept = np.expand_dims(center, axes).shape
            center -= np.broadcast_to(shift, kept).reshape(center.shape)
        mean = center + sums / count
    return count, mean, np.maximum(m2, 0.0)


def _axis_sum(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Sum over `axes`; over a single axis of a C-contiguous array as a product
    with a vector of ones, which BLAS does at memory speed (twice numpy's
    strided reduction)."""
    if len(axes) != 1 or not values.flags.c_contiguous:
        return values.sum(axis=axes)
    axis = axes[0]
    lead, size, rest = values.shape[:axis], values.shape[axis], values.shape[axis + 1 :]
    flat = values.reshape(lead + (size, int(np.prod(rest, dtype=np.int64))))
    return np.matmul(np.ones(size), flat).reshape(lead + rest)


def _weighted_moments(
    values: np.ndarray, axes: tuple[int, ...], weights: Optional[np.ndarray], omit_nonfinite: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The general path of :func:`moments`: per-element weights, in float64."""
    w = np.ones(values.shape) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), values.shape)
    if omit_nonfinite:
        finite = np.isfinite(values)
        w = np.where(finite, w, 0.0)
        values = np.where(finite, values, 0.0)
    count = w.sum(axis=axes, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = (w * values).sum(axis=axes, keepdims=True) / count
        deviations = values - np.where(count > 0, mean, 0.0)
        m2 = (w * deviations * deviations).sum(axis=axes)
    return count.reshape(m2.shape), mean.reshape(m2.shape), m2


def first_nonfinite(x: np.ndarray) -> Optional[tuple[int, ...]]:
    """Index of the first NaN or ±Inf element of `x` (C order), or None."""
    if x.dtype.kind not in "fc":
        return None
    bad = np.flatnonzero(~np.isfinite(x))
    return None if bad.size == 0 else tuple(int(i) for i in np.unravel_index(bad[0], x.shape))


def merge_moments(
    count_a: np.ndarray | float,
    mean_a: np.ndarray,
    m2_a: np.ndarray,
    count_b: np.ndarray | float,
    mean_b: np.ndarray,
    m2_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan–Golub–LeVeque merge of two (count, mean, M2) triples.

    Counts may be scalars or arrays (per statistic); a side with count 0
    contributes nothing, whatever its mean holds (even NaN).

    Returns
    -------
    count, mean, m2 : ndarray of float64
    """
    count_a = np.asarray(count_a, dtype=np.float64)
    count_b = np.asarray(count_b, dtype=np.float64)
    count = count_a + count_b
    with np.errstate(invalid="ignore", divide="ignore"):
        share_b = np.where(count > 0, count_b / count, 0.0)
        delta = np.where(count_b > 0, mean_b, 0.0) - np.where(count_a > 0, mean_a, 0.0)
        mean = np.where(count_a > 0, mean_a, 0.0) + delta * share_b
        m2 = (
            np.where(count_a > 0, m2_a, 0.0)
            + np.where(count_b > 0, m2_b, 0.0)
            + delta**2 * count_a * share_b
        )
    return count, mean, m2


def variance(count: np.ndarray, m2: np.ndarray, ddof: int) -> np.ndarray:
    """``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > ddof, m2 / (count - ddof), np.nan)
