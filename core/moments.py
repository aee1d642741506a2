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

from typing import Optional

import numpy as np

from .workspace import Workspace


def moments(
    x: np.ndarray, axes: tuple[int, ...], workspace: Optional[Workspace] = None
) -> tuple[int, np.ndarray, np.ndarray]:
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

    Returns
    -------
    count : int
        Elements reduced per statistic.
    mean, m2 : ndarray of float64
        Shape of `x` without `axes`.
    """
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    mean = np.mean(x, axis=axes, dtype=np.float64, keepdims=True)
    if workspace is None:
        deviations = np.subtract(x, mean, dtype=np.float64)
    else:
        deviations = workspace.array("deviations", x.shape, np.float64)
        np.subtract(x, mean, out=deviations, dtype=np.float64, casting="unsafe")
    np.square(deviations, out=deviations)
    m2 = deviations.sum(axis=axes)
    return count, mean.reshape(m2.shape), m2


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


class Moments:
    """Exact population moments over a stream of arrays, mergeable.

    The state is plain data: ``count``, ``mean`` and ``m2`` (float64 arrays of
    the statistic's shape), so it pickles cheaply and stores as it is.

    Parameters
    ----------
    axes : tuple of int
        Non-negative axes reduced in every update (must include 0).

    Examples
    --------
    >>> import numpy as np
    >>> m = Moments((0,))
    >>> _ = m.update(np.array([[1.0], [2.0]])).update(np.array([[3.0]]))
    >>> m.mean, m.variance(ddof=0)
    (array([2.]), array([0.66666667]))
    """

    def __init__(self, axes: tuple[int, ...]) -> None:
        self.axes = tuple(axes)
        self.count: Optional[np.ndarray] = None
        self.mean: Optional[np.ndarray] = None
        self.m2: Optional[np.ndarray] = None
        self._workspace = Workspace()

    def update(self, x: np.ndarray) -> "Moments":
        """Add the elements of `x` (reduced over ``axes``)."""
        count, mean, m2 = moments(x, self.axes, self._workspace)
        self._add(np.full(mean.shape, float(count)), mean, m2)
        return self

    def merge(self, other: "Moments") -> "Moments":
        """Add the elements that `other` has seen (same axes and shape)."""
        if other.count is not None:
            self._add(other.count, other.mean, other.m2)
        return self

    def _add(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        if self.count is None:
            self.count = np.array(count, dtype=np.float64)
            self.mean = np.array(mean, dtype=np.float64)
            self.m2 = np.array(m2, dtype=np.float64)
        else:
            self.count, self.mean, self.m2 = merge_moments(
                self.count, self.mean, self.m2, count, mean, m2
            )

    def variance(self, ddof: int) -> np.ndarray:
        """``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > ddof, self.m2 / (self.count - ddof), np.nan)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_workspace"]  # scratch memory, not state
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workspace = Workspace()


def grouped_moments(
    x: np.ndarray, groups: np.ndarray, *, with_m2: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Count, mean and M2 of the rows of `x` per group label, in float64.

    Parameters
    ----------
    x : ndarray, shape (rows, features)
    groups : ndarray of int, shape (rows,)
        Non-negative group of each row.
    with_m2 : bool
        Whether to compute M2 (a second pass over the rows).

    Returns
    -------
    keys : ndarray of int64
        The groups present, ascending.
    counts : ndarray of int64
        Rows per present group.
    means : ndarray of float64, shape (len(keys), features)
    m2 : ndarray of float64 or None
    """
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    keys = sorted_groups[starts].astype(np.int64)
    counts = np.diff(np.r_[starts, len(groups)]).astype(np.int64)
    rows = x[order]
    means = np.add.reduceat(rows, starts, axis=0, dtype=np.float64) / counts[:, None]
    m2 = None
    if with_m2:
        deviations = np.subtract(rows, np.repeat(means, counts, axis=0), dtype=np.float64)
        np.square(deviations, out=deviations)
        m2 = np.add.reduceat(deviations, starts, axis=0)
    return keys, counts, means, m2
