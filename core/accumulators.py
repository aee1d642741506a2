"""Mergeable accumulators of exact moments: over all rows, or per group of rows.

They hold plain data (float64 arrays), so they pickle cheaply to workers and
store as they are. A block is reduced by the one kernel of
:mod:`normstats.kernels` and folded in with the Chan–Golub–LeVeque merge;
only the groups present in a block are touched.

The mean of each (group, statistic) is held as ``shift + offset``: the shift
is a float64 near the mean (an integer for integer data), the offset the
small remainder, so the mean carries about twice float64's digits and a large
common offset (1e15 plus noise) cannot take the digits that merges need.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import UsageError
from .kernels import Layout, Sums, accumulate, fold_exact, update_groups
from .limits import elements
from .moments import merge_moments, variance


RESULT_ELEMENTS = 1 << 15  # values per slice when a result is built (see GroupedMoments._sliced)
PILOT_ROWS = 64  # rows whose mean is the first shift of a one-group fit
PILOT_ELEMENTS = 1 << 18  # but no more than this many values (wide rows)


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a + b`` rounded, and the exact remainder (Knuth's TwoSum)."""
    with np.errstate(invalid="ignore", over="ignore"):
        total = a + b
        bb = total - a
        low = (a - (total - bb)) + (b - bb)
    return total, np.where(np.isfinite(low), low, 0.0)


class GroupedMoments:
    """Exact moments per group (class, speaker, ...), mergeable.

    Each row belongs to one of `num_groups` groups; within a row, `axes`
    other than 0 are reduced too. The state is ``rows`` (rows per group),
    the weight per group, and per (group, statistic) ``m2`` and the mean as
    ``shift + offset``; under ``nan_policy='omit'`` also a count per
    (group, statistic). Groups never seen have count 0 and NaN mean.

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
        self.nan_policy = nan_policy
        self.layout: Optional[Layout] = None
        self.rows = np.zeros(self.num_groups, dtype=np.int64)
        self.weight = np.zeros(self.num_groups)
        self.shift: Optional[np.ndarray] = None  # (groups, statistics)
        self.offset: Optional[np.ndarray] = None
        self.m2_flat: Optional[np.ndarray] = None
        self.count_flat: Optional[np.ndarray] = None  # per element, under omit only
        self.spent = False  # its arrays went to a result (mean_and_variance(spend=True))

    @property
    def omit(self) -> bool:
        return self.nan_policy == "omit"

    @property
    def started(self) -> bool:
        return self.layout is not None

    def start(self, row_shape: tuple[int, ...]) -> "GroupedMoments":
        """Allocate the state for rows of `row_shape` (zeros: pages of groups never
        seen are never touched)."""
        self.layout = Layout.of(tuple(row_shape), self.axes)
        full = (self.num_groups, self.layout.stats)
        self.shift, self.offset, self.m2_flat = np.zeros(full), np.zeros(full), np.zeros(full)
        self.count_flat = np.zeros(full) if self.omit else None
        return self

    @property
    def kept(self) -> tuple[int, ...]:
        from .axes import kept_shape

        return kept_shape(self.layout.row_shape, self.axes)

    def _shaped(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape((self.num_groups,) + self.kept)

    @property
    def count_2d(self) -> np.ndarray:
        return np.broadcast_to(self._counts, self.shift.shape)

    @property
    def _counts(self) -> np.ndarray:
        """The counts as stored: per element, or (groups, 1) when counted per row, which
        broadcasts (a result's parts then cost one value per group, not per statistic)."""
        if self.count_flat is not None:
            return self.count_flat
        return (self.weight * self.layout.per_stat)[:, None]

    def count_view(self) -> np.ndarray:
        """:attr:`count` counted per row (no values left out) as a read-only view of
        the weight per group: no (groups, statistics) array."""
        return self._shaped(self.count_2d)  # a zero-stride view: reshaping it copies nothing

    @property
    def count(self) -> Optional[np.ndarray]:
        """Elements (or weight) per group and statistic."""
        return None if self.layout is None else self._shaped(np.array(self.count_2d))

    def _sliced(self, part, dtype=np.float64, *, mostly_zero: bool = False) -> np.ndarray:
        """``part(rows)`` for slices of groups of RESULT_ELEMENTS values, into one new
        (groups, statistics) array: a result of many groups costs its own array, not
        several temporaries of the state's size, and the slice's temporaries stay in
        the cache (slices of 4 096 groups of 256 took 4x the time). `mostly_zero`: only slices that
        hold a non-zero value are written into a zeroed array, whose pages the
        others then never touch (no memory for them)."""
        out = np.zeros(self.shift.shape, dtype) if mostly_zero else np.empty(self.shift.shape, dtype)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            step = max(1, RESULT_ELEMENTS // max(1, self.shift.shape[1]))
            for lo in range(0, self.num_groups, step):
                rows = slice(lo, lo + step)
                value = part(rows)
                if not mostly_zero or value.any():
                    out[rows] = value
        return out

    @property
    def mean(self) -> Optional[np.ndarray]:
        """Mean per group and statistic; NaN where nothing was counted."""
        if self.layout is None:
            return None
        n = self._counts
        return self._shaped(self._sliced(lambda r: np.where(n[r] > 0, self.shift[r] + self.offset[r], np.nan)))

    @property
    def mean_low(self) -> Optional[np.ndarray]:
        """What the float64 `mean` drops of ``shift + offset``, where it matters.

        A merge that lost it would err by ``low**2 / var`` relative in the
        variance, so it is kept where ``|low| > 2**-26 std`` (a mean far
        larger than its spread: 1e15 + N(0, 5)) and is 0 elsewhere, which
        keeps the stored array independent of how the rows were split.
        """
        if self.layout is None:
            return None
        n = self._counts

        def part(r: slice) -> np.ndarray:
            low = _two_sum(self.shift[r], self.offset[r])[1]
            # |low| > 2**-26 sqrt(m2 / n), squared (no square root, no division)
            return np.where((n[r] > 0) & (low * low * n[r] > 2.0**-52 * self.m2_flat[r]), low, 0.0)
        return self._shaped(self._sliced(part, mostly_zero=True))

    @property
    def m2(self) -> Optional[np.ndarray]:
        return None if self.layout is None else self._shaped(self.m2_flat.copy())

    def mean_and_variance(self, ddof: int, *, spend: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Mean and ``m2 / (count - ddof)`` per group and statistic, NaN where
        ``count <= ddof`` (the mean: where the count is 0), built with one array
        each (a K x D state allows no more). With `spend`, they are built in the
        state's own arrays (no new K x D array), which leaves the state unusable."""
        if self.count_flat is not None:
            return self.mean, self.variance(ddof)
        n = (self.weight * self.layout.per_stat)[:, None]
        mean = np.add(self.shift, self.offset, out=self.shift if spend else None)
        mean[self.weight <= 0] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.divide(self.m2_flat, n - ddof, out=self.m2_flat if spend else None)
        var[n[:, 0] <= ddof] = np.nan
        shaped = self._shaped(mean), self._shaped(var)
        if spend:
            self.spent = True
            self.shift = self.offset = self.m2_flat = None
        return shaped

    def variance(self, ddof: int) -> np.ndarray:
        """Per-group ``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
        n = self._counts
        return self._shaped(self._sliced(lambda r: variance(n[r], self.m2_flat[r], ddof)))

    def near_constant(self) -> np.ndarray:
        """Statistics whose M2 is within the rounding error of the shifted sums.

        The error of M2 is bounded in the deviations from the shift (see
        :mod:`normstats.kernels`), and the shift tracks the mean, so only the
        part ``n * offset**2`` of it is not relative to M2 itself; a statistic
        whose M2 is within that, or exactly 0 (every deviation 0), cannot be
        told from a constant. ``|mean|`` plays no part: 1e15 + N(0, 5) keeps
        its variance.
        """
        n = self._counts

        def part(r: slice) -> np.ndarray:
            bound = 8.0 * np.finfo(np.float64).eps * np.log2(np.maximum(n[r], 2.0)) * n[r] * self.offset[r]**2
            return (n[r] > 0) & (self.m2_flat[r] <= bound)
        return self._shaped(self._sliced(part, np.bool_))

    def restore(self, rows: np.ndarray, count: np.ndarray, mean: np.ndarray, m2: np.ndarray,
                mean_low: Optional[np.ndarray] = None, row_shape: Optional[tuple] = None) -> "GroupedMoments":
        """Set the state from stored rows, count, mean (+ its low part) and M2 per group."""
        if row_shape is not None or self.layout is None:
            self.start(row_shape)
        full = self.shift.shape
        count = np.asarray(count, np.float64).reshape(full)
        seen = count > 0
        self.rows = np.array(rows, dtype=np.int64).reshape(self.num_groups)
        self.shift[...] = np.where(seen, np.nan_to_num(np.asarray(mean, np.float64).reshape(full)), 0.0)
        low = 0.0 if mean_low is None else np.asarray(mean_low, np.float64).reshape(full)
        self.offset[...] = np.where(seen, low, 0.0)
        self.m2_flat[...] = np.where(seen, np.nan_to_num(np.asarray(m2, np.float64).reshape(full)), 0.0)
        if self.count_flat is not None:
            self.count_flat[...] = count
        self.weight = count[:, 0] / self.layout.per_stat if full[1] else np.zeros(self.num_groups)
        return self

    def update(self, x: np.ndarray, groups: Optional[np.ndarray] = None,
               weights: Optional[np.ndarray] = None) -> "GroupedMoments":
        """Add the rows of `x` to their `groups` (validated by the caller; -1 skips a row).

        Raises
        ------
        NonFiniteError
            With ``nan_policy='error'``, for the first NaN / Inf (row counted
            from the first row of `x`).
        """
        x = np.asarray(x)
        self.require_unspent()
        if self.layout is None:
            self.start(x.shape[1:])
        if x.shape[0] == 0:
            return self
        if groups is not None:  # many groups: each row folds straight into its group
            update_groups(x, self.layout, groups, self.shift, self.offset, self.m2_flat, self.rows, self.weight,
                          self.count_flat, weights=weights)
            return self
        self.fold(self.block_sums(x, weights=weights, pilot=self.weight[0] == 0 and not self.omit))
        return self

    def update_row(self, pieces, group: int = 0, weight: Optional[float] = None) -> "GroupedMoments":
        """Add one row, given as the ``(e0, piece)`` pairs of
        :func:`normstats.row_pieces.accumulate_row`, to `group`: the moments
        :meth:`update` gives that row (to rounding), one piece in memory at a time."""
        from .row_pieces import accumulate_row

        self.require_unspent()
        g = slice(group, group + 1)
        # Around the group's shift once it has one; a first row takes its shifts from its data.
        fresh = np.full(1, self.omit or self.weight[group] == 0)
        sums = accumulate_row(pieces, self.layout, 0, np.array([group], np.int64), self.shift[g].copy(), fresh,
                              weight=weight, omit=self.omit,
                              count0=None if not self.omit else self.count_flat[g].copy())
        self.fold(sums)
        return self

    def block_sums(self, x: np.ndarray, *, weights: Optional[np.ndarray] = None, pilot: bool = False,
                   around: Optional[tuple] = None) -> Sums:
        """The kernel's sums of the rows of `x` (one group) around the state's shift, or
        around `around` (a :meth:`shift_now` taken earlier: then this only reads the
        state, so reader threads may call it while :meth:`fold` takes earlier sums);
        with `pilot`, around the mean of the first rows."""
        keys = np.zeros(1, np.int64)
        shift, count0 = around if around is not None else self.shift_now()
        if pilot:
            shift = self._pilot(x)
        fresh = np.full(1, self.omit)
        return accumulate(x, self.layout, np.zeros(x.shape[0], np.int64), keys, shift, fresh, weights=weights,
                          omit=self.omit, count0=count0)

    def shift_now(self) -> tuple:
        """Copies of the shift (and, under omit, the counts) sums are taken around."""
        return self.shift[:1].copy(), None if not self.omit else self.count_flat[:1].copy()

    def fold(self, sums: Sums) -> None:
        """Merge the sums of :meth:`block_sums` into the state (in stream order)."""
        fold_exact(sums, self.layout.per_stat, self.shift, self.offset, self.m2_flat, self.weight,
                   self.count_flat)
        self.rows[sums.keys] += sums.rows

    def require_unspent(self) -> None:
        if self.spent:
            raise UsageError("these moments were spent on a result (spend=True); fit a new state")

    def pilot_rows(self) -> int:
        """How many first rows give the first shift of a one-group fit (:meth:`pilot_sums_around`)."""
        return max(1, min(PILOT_ROWS, PILOT_ELEMENTS // max(elements(self.layout.row_shape), 1)))

    def pilot_sums_around(self, first: np.ndarray) -> Optional[tuple]:
        """For a fresh one-group state, what :meth:`block_sums` takes as `around` to give
        any block the sums a first :meth:`update` with these `first` rows (at least
        :meth:`pilot_rows` of them, or all there are) would give it; None when the
        first shift does not come from a pilot (values left out, or rows seen)."""
        if self.omit or self.weight[0] != 0:
            return None
        return self._pilot(first), None

    def _pilot(self, x: np.ndarray) -> np.ndarray:
        """A first shift for one group: the mean of the first rows (closer to the
        mean than any single row, so the first block's offset, and its rounding,
        is smaller); an integer for integer data, 0 where not finite."""
        rows = self.pilot_rows()
        with np.errstate(invalid="ignore", over="ignore"):
            pilot = np.asarray(x[:rows], dtype=np.float64).mean(axis=self.axes).reshape(1, -1)
        if x.dtype.kind in "iu":
            pilot = np.rint(pilot)
        return np.where(np.isfinite(pilot), pilot, 0.0)

    def merge(self, other: "GroupedMoments") -> "GroupedMoments":
        """Add what `other` (same groups, axes and shape) has seen."""
        self.require_unspent()
        other.require_unspent()
        if other.layout is None:
            return self
        if self.layout is None:
            self.start(other.layout.row_shape)
        keys = np.flatnonzero(other.rows)
        n_a, n_b = self.count_2d[keys], other.count_2d[keys]
        mine = n_a > 0
        shift = np.where(mine, self.shift[keys], other.shift[keys])
        # Shifts of one data set are close, so their difference is exact (Sterbenz).
        off_a = np.where(mine, self.offset[keys], 0.0)
        off_b = other.offset[keys] + (other.shift[keys] - shift)
        count, offset, m2 = merge_moments(n_a, off_a, self.m2_flat[keys], n_b, off_b, other.m2_flat[keys])
        self.shift[keys], self.offset[keys] = _two_sum(shift, offset)
        self.m2_flat[keys] = m2
        if self.count_flat is not None:
            self.count_flat[keys] = count
        self.weight[keys] += other.weight[keys]
        self.rows[keys] += other.rows[keys]
        return self


class Moments(GroupedMoments):
    """Exact population moments over a stream of arrays, mergeable.

    A :class:`GroupedMoments` of one group: ``count``, ``mean``, ``m2`` have
    the statistic's shape.

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
        super().__init__(1, axes, nan_policy=nan_policy)

    def _shaped(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape(self.kept)

    def update(self, x: np.ndarray, weights: Optional[np.ndarray] = None) -> "Moments":
        """Add the elements of `x` (reduced over ``axes``), optionally one weight per row.

        Raises
        ------
        NonFiniteError
            With ``nan_policy='error'``, for the first NaN / Inf; its row
            counts from the first row of `x`.
        """
        return super().update(x, None, weights)

    def restore(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray,
                mean_low: Optional[np.ndarray] = None, row_shape: Optional[tuple] = None) -> "Moments":
        """Set the state from stored count, mean (+ its low part) and M2."""
        count = np.asarray(count, np.float64)
        rows = np.array([1 if np.any(count > 0) else 0])
        return super().restore(rows, count[None], np.asarray(mean)[None], np.asarray(m2)[None],
                               None if mean_low is None else np.asarray(mean_low)[None], row_shape)
