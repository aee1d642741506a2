"""Exact first and second moments in float64, and their pairwise merge.

Everything here works on (count, mean, M2) triples, where M2 is the sum of
squared deviations from the mean. Within one in-memory block the moments are
computed in two passes (mean, then squared deviations from it), which is exact
up to float64 rounding; across blocks, shards and workers they are combined
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

from .errors import DataError, NonFiniteError
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


def checked_moments(
    x: np.ndarray,
    axes: tuple[int, ...],
    workspace: Optional[Workspace] = None,
    *,
    shift: Optional[np.ndarray] = None,
    weights: Optional[np.ndarray] = None,
    nan_policy: str = "error",
    row_axes: int = 1,
) -> tuple[Union[int, np.ndarray], np.ndarray, np.ndarray]:
    """:func:`moments` under a NaN policy.

    The fast path runs first; only when its result is not finite is `x`
    searched for NaN / Inf, so clean data pays nothing for the check.

    Parameters
    ----------
    nan_policy : {'error', 'omit'}
        'error' raises :class:`NonFiniteError` for the first NaN / Inf
        element; 'omit' leaves such elements out of each statistic.
    row_axes : int
        How many leading axes of `x` enumerate rows (2 for stacked batches),
        to report the row of a bad element.
    """
    result = moments(x, axes, workspace, shift=shift, weights=weights)
    if np.isfinite(result[1]).all() and np.isfinite(result[2]).all():
        return result
    bad = first_nonfinite(x)
    if bad is None:
        raise DataError(
            "the sum of squares overflows float64; the data are too large in magnitude to have a "
            "variance, scale them down"
        )
    if nan_policy == "omit":
        return moments(x, axes, shift=shift, weights=weights, omit_nonfinite=True)
    row = int(np.ravel_multi_index(bad[:row_axes], x.shape[:row_axes]))
    raise NonFiniteError(row, bad[row_axes:], x[bad])


def variance(count: np.ndarray, m2: np.ndarray, ddof: int) -> np.ndarray:
    """``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > ddof, m2 / (count - ddof), np.nan)


def grouped_moments(
    groups: np.ndarray,
    means: np.ndarray,
    counts: Optional[np.ndarray] = None,
    m2: Optional[np.ndarray] = None,
    *,
    with_m2: bool = True,
    presorted: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Combine per-row moments into per-group moments, in float64.

    Row ``r`` stands for `counts[r]` elements (default 1) with mean
    `means[r]` and squared deviations `m2[r]` (default 0); a plain row of
    features is its own mean. Per group ``g``::

        count_g = sum counts[r]
        mean_g  = sum counts[r] * means[r] / count_g
        M2_g    = sum m2[r] + sum counts[r] * (means[r] - mean_g)**2

    Parameters
    ----------
    groups : ndarray of int, shape (rows,)
        Non-negative group of each row.
    means : ndarray, shape (rows, ...)
    counts, m2 : ndarray broadcastable to `means`, optional
    with_m2 : bool
        Whether to compute M2 (a second pass over the rows).
    presorted : bool
        The rows are already ordered by group (saves a gather of every row).

    Returns
    -------
    keys : ndarray of int64
        The groups present, ascending.
    rows : ndarray of int64
        Rows per present group.
    count, mean : ndarray of float64, shape (len(keys),) + means.shape[1:]
    m2 : ndarray of float64 or None
    """
    order = slice(None) if presorted else np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    keys = sorted_groups[starts].astype(np.int64)
    rows = np.diff(np.r_[starts, len(groups)]).astype(np.int64)
    values = means[order]
    tail = (1,) * (means.ndim - 1)
    if counts is None:
        weight = None
        count = np.broadcast_to(rows.reshape((-1,) + tail).astype(np.float64), (len(keys),) + means.shape[1:])
        sums = np.add.reduceat(values, starts, axis=0, dtype=np.float64)
    else:
        weight = np.broadcast_to(counts, means.shape)[order]
        count = np.add.reduceat(weight, starts, axis=0, dtype=np.float64)
        sums = np.add.reduceat(weight * values, starts, axis=0, dtype=np.float64)
    # NaN / Inf propagate into the result, where the caller's policy finds them.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = sums / count
        group_m2 = None
        if with_m2:
            deviations = np.subtract(values, np.repeat(np.nan_to_num(mean), rows, axis=0), dtype=np.float64)
            np.square(deviations, out=deviations)
            if weight is not None:
                deviations *= weight
            group_m2 = np.add.reduceat(deviations, starts, axis=0)
            if m2 is not None:
                group_m2 += np.add.reduceat(np.broadcast_to(m2, means.shape)[order], starts, axis=0)
    return keys, rows, np.array(count), mean, group_m2
