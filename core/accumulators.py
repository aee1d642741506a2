"""Mergeable accumulators of exact moments: over all rows, or per group of rows.

They hold plain data (float64 arrays), so they pickle cheaply to workers and
store as they are; the arithmetic they use lives in :mod:`normstats.moments`
(formulas) and :mod:`normstats.kernels` (blockwise, multi-threaded).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import DataError, NonFiniteError
from .kernels import chunk_moments, chunk_rows_for, combine_chunks
from .moments import checked_moments, first_nonfinite, grouped_moments, merge_moments, moments, variance
from .workspace import KeepsScratch, Workspace


def _row_weights(weights: Optional[np.ndarray], ndim: int) -> Optional[np.ndarray]:
    """One weight per row, shaped to broadcast against an array of rank `ndim`."""
    if weights is None:
        return None
    return np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))


def _first_row_shift(x: np.ndarray, axes: tuple[int, ...], *, rows: bool = False) -> np.ndarray:
    """A shift near the data: the first row, reduced over the other `axes`
    (0 where it is not finite). With `rows`, one shift per row of `x`, reduced
    over `axes` (which then exclude 0)."""
    with np.errstate(invalid="ignore", over="ignore"):
        start = np.asarray(x if rows else x[:1], dtype=np.float64)
        start = start.mean(axis=axes) if axes else start
    return np.where(np.isfinite(start), start, 0.0)


class Moments(KeepsScratch):
    """Exact population moments over a stream of arrays, mergeable.

    The state is plain data (float64 arrays of the statistic's shape), so it
    pickles cheaply and stores as it is: ``count``, ``m2``, and the mean as
    ``shift + offset``. The shift is the first block's mean; later blocks are
    reduced relative to it, so a large common offset (1e9 plus noise) cannot
    take the digits that block means and merges need.

    Parameters
    ----------
    axes : tuple of int
        Non-negative axes reduced in every update (must include 0).
    nan_policy : {'error', 'omit'}
        What a NaN or Inf element does: raise, or stay out of the counts.

    Examples
    --------
    >>> import numpy as np
    >>> m = Moments((0,))
    >>> _ = m.update(np.array([[1.0], [2.0]])).update(np.array([[3.0]]))
    >>> m.mean, m.variance(ddof=0)
    (array([2.]), array([0.66666667]))
    """

    def __init__(self, axes: tuple[int, ...], *, nan_policy: str = "error") -> None:
        self.axes = tuple(axes)
        self.nan_policy = nan_policy
        self.count: Optional[np.ndarray] = None
        self.shift: Optional[np.ndarray] = None
        self.offset: Optional[np.ndarray] = None
        self.m2: Optional[np.ndarray] = None
        self._workspace = Workspace()

    @property
    def mean(self) -> Optional[np.ndarray]:
        return None if self.shift is None else self.shift + self.offset

    def restore(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> "Moments":
        """Set the state from stored count, mean and M2."""
        self.count = np.array(count, dtype=np.float64)
        self.shift = np.nan_to_num(np.array(mean, dtype=np.float64))
        self.offset = np.zeros_like(self.shift)
        self.m2 = np.array(m2, dtype=np.float64)
        return self

    def update(self, x: np.ndarray, weights: Optional[np.ndarray] = None) -> "Moments":
        """Add the elements of `x` (reduced over ``axes``), optionally one weight per row.

        Raises
        ------
        NonFiniteError
            With ``nan_policy='error'``, for the first NaN / Inf; its row
            counts from the first row of `x`.
        """
        if self.shift is None:
            self.shift = _first_row_shift(x, self.axes)
        if weights is None:
            chunk = chunk_rows_for(int(np.prod(x.shape[1:], dtype=np.int64)))
            count, mean, m2 = combine_chunks(*chunk_moments(
                x, self.axes, chunk, shift=self.shift, nan_policy=self.nan_policy,
                workspace=self._workspace,
            ))
        else:
            count, mean, m2 = checked_moments(
                x, self.axes, shift=np.expand_dims(self.shift, self.axes),
                weights=_row_weights(weights, x.ndim), nan_policy=self.nan_policy,
            )
        self._add(np.broadcast_to(np.asarray(count, np.float64), mean.shape), mean, m2)
        return self

    def merge(self, other: "Moments") -> "Moments":
        """Add the elements that `other` has seen (same axes and shape)."""
        if other.count is None:
            return self
        if self.shift is None:
            self.shift = other.shift.copy()
        # Shifts of one data set are close, so their difference is exact (Sterbenz).
        self._add(other.count, other.offset + (other.shift - self.shift), other.m2)
        return self

    def _add(self, count: np.ndarray, offset: np.ndarray, m2: np.ndarray) -> None:
        if self.count is None:
            self.count = np.array(count, dtype=np.float64)
            self.offset = np.array(offset, dtype=np.float64)
            self.m2 = np.array(m2, dtype=np.float64)
        else:
            self.count, self.offset, self.m2 = merge_moments(
                self.count, self.offset, self.m2, count, offset, m2
            )

    def variance(self, ddof: int) -> np.ndarray:
        """``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
        return variance(self.count, self.m2, ddof)


FEW_GROUPS = 32  # up to this many groups in a block, each is reduced on its own


class GroupedMoments(KeepsScratch):
    """Exact moments per group (class, speaker, ...), mergeable.

    Each row belongs to one of `num_groups` groups; within a row, `axes`
    other than 0 are reduced too. The state is ``rows`` (rows per group) and
    ``count``, ``m2`` and the mean as ``shift + offset``, each of shape
    ``(num_groups,) + kept``; a group's shift is taken from its first row, as
    in :class:`Moments`. Groups never seen have count 0 and NaN mean.

    Parameters
    ----------
    num_groups : int
    axes : tuple of int
        Non-negative axes of each update's input to reduce (including 0).
    nan_policy : {'error', 'omit'}
    """

    def __init__(self, num_groups: int, axes: tuple[int, ...], *, nan_policy: str = "error") -> None:
        self.num_groups = int(num_groups)
        self.axes = tuple(axes)
        self.inner = tuple(a for a in self.axes if a != 0)
        self.nan_policy = nan_policy
        self.rows = np.zeros(self.num_groups, dtype=np.int64)
        self._workspace = Workspace()
        self.count: Optional[np.ndarray] = None
        self.shift: Optional[np.ndarray] = None
        self.offset: Optional[np.ndarray] = None
        self.m2: Optional[np.ndarray] = None

    def _allocate(self, shape: tuple[int, ...]) -> None:
        full = (self.num_groups,) + tuple(shape)
        self.count, self.offset, self.m2 = np.zeros(full), np.zeros(full), np.zeros(full)
        self.shift = np.full(full, np.nan)

    @property
    def mean(self) -> Optional[np.ndarray]:
        if self.count is None:
            return None
        return np.where(self.count > 0, np.nan_to_num(self.shift) + self.offset, np.nan)

    def restore(self, rows: np.ndarray, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> "GroupedMoments":
        """Set the state from stored rows, count, mean and M2 per group."""
        self._allocate(np.shape(mean)[1:])
        self.rows = np.array(rows, dtype=np.int64)
        self.count[...] = count
        self.shift[...] = np.where(self.count > 0, mean, np.nan)
        self.m2[...] = np.nan_to_num(m2)
        return self

    def update(
        self, x: np.ndarray, groups: np.ndarray, weights: Optional[np.ndarray] = None
    ) -> "GroupedMoments":
        """Add the rows of `x` to their `groups` (validated by the caller).

        Raises
        ------
        NonFiniteError
            With ``nan_policy='error'``, for the first NaN / Inf (row counted
            from the first row of `x`).
        """
        if self.count is None:
            self._allocate([x.shape[a] for a in range(1, x.ndim) if a not in self.axes])
        present = np.unique(groups)
        if weights is None and len(present) <= FEW_GROUPS:
            return self._update_each(x, groups, present)
        # Sort the rows by group once: the segment sums below then need no gather of their own.
        order = np.argsort(groups, kind="stable")
        groups = groups[order]
        weights = None if weights is None else np.asarray(weights)[order]
        shifted = self._shifted(x[order], groups)
        result = self._grouped(shifted, groups, weights, omit=False)
        if not (np.isfinite(result[3]).all() and np.isfinite(result[4]).all()):
            bad = first_nonfinite(x)
            if bad is None:
                raise DataError("the sum of squares overflows float64; scale the data down")
            if self.nan_policy != "omit":
                raise NonFiniteError(bad[0], bad[1:], x[bad])
            result = self._grouped(shifted, groups, weights, omit=True)
        self._add(*result)
        return self

    def _update_each(self, x: np.ndarray, groups: np.ndarray, present: np.ndarray) -> "GroupedMoments":
        """Few groups: gather each group's rows and reduce them with the blockwise
        kernel, several times faster than sorting and segment sums."""
        for group in present:
            rows = np.flatnonzero(groups == group)
            part = x[rows]
            if np.isnan(self.shift[group]).all():
                self.shift[group] = _first_row_shift(part, self.axes)
            try:
                count, offset, m2 = checked_moments(
                    part, self.axes, self._workspace, nan_policy=self.nan_policy,
                    shift=np.expand_dims(self.shift[group], self.axes),
                )
            except NonFiniteError:
                bad = first_nonfinite(x)  # report the stream's first, not this group's
                raise NonFiniteError(bad[0], bad[1:], x[bad]) from None
            count = np.broadcast_to(np.asarray(count, np.float64), offset.shape)
            self._add(np.array([group]), np.array([len(rows)]), count[None], offset[None], m2[None])
        return self

    def _shifted(self, x: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """`x` minus its group's shift, in float64; groups seen for the first time
        take their first row (reduced over the inner axes) as shift."""
        present, first = np.unique(groups, return_index=True)
        new = np.isnan(self.shift[present].reshape(len(present), -1)).all(axis=1)
        if new.any():  # each new group's first row, reduced over the inner axes: one call for all
            self.shift[present[new]] = _first_row_shift(x[first[new]], self.inner, rows=True)
        values = self._workspace.array("shifted", x.shape, np.float64)
        np.copyto(values, x, casting="unsafe")  # a plain cast, then a float64 subtract: both fast
        with np.errstate(invalid="ignore", over="ignore"):
            values -= np.expand_dims(self.shift[groups], self.inner)  # every present group has one now
        return values

    def _grouped(self, x: np.ndarray, groups: np.ndarray, weights: Optional[np.ndarray], omit: bool):
        row_weights = _row_weights(weights, x.ndim)
        if self.inner:
            count, means, m2 = moments(x, self.inner, weights=row_weights, omit_nonfinite=omit)
            counts = np.broadcast_to(np.asarray(count, np.float64), means.shape)
            if omit:  # a row with no finite element in a statistic has no mean there
                means = np.where(counts > 0, means, 0.0)
            return grouped_moments(groups, means, counts, m2, presorted=True)
        if omit:
            finite = np.isfinite(x)
            counts = finite if row_weights is None else row_weights * finite
            return grouped_moments(groups, np.where(finite, x, 0.0), counts, presorted=True)
        return grouped_moments(groups, x, row_weights, presorted=True)

    def _add(self, keys, rows, count, offset, m2) -> None:
        self.count[keys], self.offset[keys], self.m2[keys] = merge_moments(
            self.count[keys], self.offset[keys], self.m2[keys], count, offset, m2
        )
        self.rows[keys] += rows

    def merge(self, other: "GroupedMoments") -> "GroupedMoments":
        """Add what `other` (same groups, axes and shape) has seen."""
        if other.count is None:
            return self
        if self.count is None:
            self._allocate(other.count.shape[1:])
        keys = np.flatnonzero(other.rows)
        unset = np.isnan(self.shift[keys])
        self.shift[keys] = np.where(unset, other.shift[keys], self.shift[keys])
        offset = other.offset[keys] + (np.nan_to_num(other.shift[keys]) - self.shift[keys])
        self._add(keys, other.rows[keys], other.count[keys], offset, other.m2[keys])
        return self

    def variance(self, ddof: int) -> np.ndarray:
        """Per-group ``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
        return variance(self.count, self.m2, ddof)
