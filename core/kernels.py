"""The compiled kernels: grouped shifted moments of a block, and their fold.

Every estimator of normstats reduces a block of rows with one kernel,
:func:`accumulate`. Row ``i`` belongs to a *slot* ``p = slots[i]`` (a group,
a class, a logical batch, a (batch, class) pair; ``-1`` skips the row) and
has a weight ``w(i)``; element ``e`` of a row feeds the statistic ``k(e)``
that the reduction axes give it. Per (slot, statistic) the kernel adds up,
in float64::

    n  += w                 (per row, or per element under nan_policy='omit')
    S1 += w * (x - s)
    S2 += w * (x - s)**2

around a shift ``s`` per (slot, statistic) near the data: the caller's
(the current mean of a group already seen), or the first value the slot
meets in this block. Integer data are shifted in integer arithmetic before
the conversion, so int64 values near 2**62 keep every digit of their spread.
The block is read as it is (float16 through a lookup table of its 65 536
values, so no dtype ever needs a converted copy of the block), and only the
slots present are touched: the work is O(rows x elements), never
O(groups x statistics).

Error bound
-----------
With ``d = x - s`` exact (integers; floats within a factor 2 of the shift,
Sterbenz) and ``m`` terms summed per (slot, statistic) in one call, the
computed sums satisfy ``|dS2| <= gamma_m * S2`` and ``|dS1| <= gamma_m *
sum|w d|``, ``gamma_m = m u / (1 - m u)``, ``u = 2**-53``; the block's
``M2 = S2 - S1**2 / n`` then errs by at most ``gamma_{m+2} * (M2 + 2 n
(mean - s)**2)``: relative to the squared deviations from the shift, never
to the magnitude of the mean. A shift within a few standard deviations of
the mean (the first row; after a group's first block, its mean) keeps this
a small multiple of ``m u`` relative to M2. Calls are limited to
:data:`CALL_ELEMENTS` elements, so ``m`` stays small; blocks and shards then
combine by the Chan–Golub–LeVeque merge in :func:`fold_exact`.

All kernels (in :mod:`normstats.compiled`, imported on first use) release
the GIL (``nogil``) and are cached on disk (``cache=True``); one
specialization per input dtype and variant.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import DataError, NonFiniteError
from .moments import first_nonfinite
from .workspace import Workspace

CALL_ELEMENTS = 1 << 24  # elements per kernel call (64 MB of float32): bounds the terms per sum
FLOAT16_VALUES = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


_kernels = None


def compiled_kernels():
    """The compiled loops, imported on first use (numba's start-up is paid by the
    commands that compute only), each loaded on its first call with given
    argument types, with Ctrl-C and SIGTERM held: a signal landing inside
    numba's compiler or cache loader (llvmlite callbacks) would be printed as
    an ignored exception's traceback; held, it arrives right after, as a clean
    interrupt."""
    global _kernels
    if _kernels is None:
        from .kernel_cache import HeldFirstCalls
        from .writers.atomic import held_signals

        with held_signals():
            from . import compiled, compiled_fold
        _kernels = HeldFirstCalls((compiled, compiled_fold), held_signals)
    return _kernels


@dataclass(frozen=True)
class Layout:
    """Which statistic each element of a row feeds, for given reduction axes.

    Attributes
    ----------
    row_shape : tuple of int
    stats : int
        Statistics per row (the product of the kept axes).
    run : int
        Consecutive elements sharing one statistic (the trailing reduced axes).
    kmap : ndarray of int64
        The statistic of each run; empty when every element is its own statistic.
    kfirst : ndarray of bool
        Whether a run is the first of its statistic in the row.
    per_stat : int
        Elements of one row per statistic.
    repeats : int
        When the reduced axes all come before the kept ones (channels-last,
        e.g. (H, W, C) reduced over H and W), a row is `repeats` runs of every
        statistic in order, read as that many rows of one element per statistic
        (the fast path); else 0.
    """

    row_shape: tuple
    stats: int
    run: int
    kmap: np.ndarray
    kfirst: np.ndarray
    per_stat: int
    repeats: int = 0

    @classmethod
    def of(cls, row_shape: tuple, axes: tuple) -> "Layout":
        """The layout of rows of `row_shape` reduced over `axes` (non-negative, with 0)."""
        row_shape = tuple(int(n) for n in row_shape)
        # a kept axis of size 1 changes no statistic's elements: read as reduced, it joins the
        # runs (channels-last with one channel would otherwise be runs of one element)
        reduced = [a in axes or n == 1 for a, n in zip(range(1, len(row_shape) + 1), row_shape)]
        kept = tuple(n for n, r in zip(row_shape, reduced) if not r)
        stats = int(np.prod(kept, dtype=np.int64))
        trailing = len(row_shape)
        while trailing > 0 and reduced[trailing - 1]:
            trailing -= 1
        run = int(np.prod(row_shape[trailing:], dtype=np.int64))
        lead = row_shape[:trailing]
        elements = int(np.prod(row_shape, dtype=np.int64))
        if not any(reduced):
            kmap = np.empty(0, np.int64)
        else:
            index = np.arange(stats, dtype=np.int64).reshape(
                [n if not r else 1 for n, r in zip(lead, reduced[:trailing])])
            # a copy, never the read-only broadcast view reshape returns when nothing is broadcast:
            # read-only and writable arrays are two types to numba, each a variant to compile
            kmap = np.broadcast_to(index, lead).reshape(-1).copy()
        kfirst = np.zeros(len(kmap), np.bool_)
        kfirst[np.unique(kmap, return_index=True)[1]] = True
        lead_reduced = len(reduced) - len(kept)
        repeats = (elements // stats if stats > 1 and elements > stats and 0 < lead_reduced
                   and all(reduced[:lead_reduced]) and not any(reduced[lead_reduced:]) else 0)
        return cls(row_shape, stats, max(run, 1), kmap, kfirst, elements // max(stats, 1), repeats)


@dataclass
class Sums:
    """What :func:`accumulate` adds up per slot of one block.

    ``shift`` is in the kernel's arithmetic (int64 / uint64 for integer data);
    :meth:`centers` gives it in float64 with the part float64 cannot hold.
    """

    keys: np.ndarray
    rows: np.ndarray
    weight: np.ndarray
    count: np.ndarray  # (P, K) per element, or (0, 0) when counted per row
    s1: np.ndarray
    s2: np.ndarray
    shift: np.ndarray
    integer: bool

    def slots(self, part: slice) -> "Sums":
        """The sums of the slots `part` only."""
        def cut(a: np.ndarray) -> np.ndarray:
            return a[part].copy() if a.shape[0] else a
        return Sums(self.keys[part].copy(), self.rows[part].copy(), self.weight[part].copy(), cut(self.count),
                    self.s1[part].copy(), cut(self.s2), self.shift[part].copy(), self.integer)

    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """The shift as float64 and what float64 rounding dropped from it (for float
        data: the shift itself, not a copy, and a (1, 1) zero that broadcasts)."""
        if not self.integer:
            return self.shift, NO_RESIDUAL
        base = self.shift.astype(np.float64)
        back = np.clip(base, *_integer_range(self.shift.dtype)).astype(self.shift.dtype)
        return base, (self.shift - back).astype(np.int64).astype(np.float64)

    def counts(self, per_stat: int) -> np.ndarray:
        """Elements (or weight) per slot and statistic."""
        if self.count.shape[0] or not self.s1.shape[0]:
            return self.count if self.count.shape[0] else np.zeros(self.s1.shape)
        return np.broadcast_to((self.weight * per_stat)[:, None], self.s1.shape)

    def means(self, per_stat: int) -> np.ndarray:
        """Mean per slot and statistic (NaN where nothing was counted)."""
        n = self.counts(per_stat)
        base, residual = self.centers()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, base + (self.s1 / n + residual), np.nan)

    def m2(self, per_stat: int) -> np.ndarray:
        """Sum of squared deviations from the mean per slot and statistic."""
        n = self.counts(per_stat)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, np.maximum(self.s2 - self.s1 * (self.s1 / n), 0.0), 0.0)

    def moments(self, per_stat: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts, means and M2 per slot, each shaped ``(slots,) + shape`` (the statistics' shape)."""
        stacked = (len(self.keys),) + tuple(shape)
        return (self.counts(per_stat).reshape(stacked), self.means(per_stat).reshape(stacked),
                self.m2(per_stat).reshape(stacked))


def _integer_range(dtype: np.dtype) -> tuple[float, float]:
    info = np.iinfo(dtype)
    return float(info.min), float(info.max) - 4096.0  # the largest float below max converts safely


def kernel_dtype(dtype: np.dtype) -> np.dtype:
    """The shift's dtype in the kernel for data of `dtype`."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize == 8:
        return np.dtype(np.uint64)
    return np.dtype(np.int64) if dtype.kind in "iu" else np.dtype(np.float64)


def _as_rows(x: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """`x` as a C-contiguous (rows, elements) read-only view the kernel reads, and
    the float16 table if it needs one."""
    rows = x.shape[0]
    flat = np.ascontiguousarray(x).reshape(rows, -1) if x.ndim != 2 or not x.flags.c_contiguous else x
    if not flat.dtype.isnative:  # ('<f4' from HDF5 is native here: byteorder '<', not '=')
        flat = flat.astype(flat.dtype.newbyteorder("="))
    table = None
    if flat.dtype == np.float16:
        flat, table = flat.view(np.uint16), FLOAT16_VALUES
    return read_only(flat), table


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of `a`: numba compiles a kernel once for read-only and once
    for writable arrays, and blocks come as either (a mapped or a reused buffer),
    so the kernels are always given read-only blocks (one variant, not two)."""
    view = a.view()
    view.flags.writeable = False
    return view


EMPTY_F = np.empty(0)
EMPTY_2D = np.empty((0, 0))
EMPTY_BOOL = np.empty(0, np.bool_)
NO_KMAP = np.empty(0, np.int64)  # (what Layout.kmap is when every element is its own statistic)
NO_RESIDUAL = np.zeros((1, 1))
NO_RESIDUAL.flags.writeable = False


def accumulate(
    x: np.ndarray,
    layout: Layout,
    slots: np.ndarray,
    keys: np.ndarray,
    shift: np.ndarray,
    fresh: np.ndarray,
    *,
    weights: Optional[np.ndarray] = None,
    omit: bool = False,
    squares: bool = True,
    count0: Optional[np.ndarray] = None,
    start: Optional["Sums"] = None,
    first_element: int = 0,
    scratch: Optional[Workspace] = None,
) -> Sums:
    """Grouped shifted moments of the rows of `x` (see the module docstring).

    Parameters
    ----------
    x : ndarray, shape (rows, ...)
        Any numeric dtype, read in place (C-contiguous input is not copied).
        With `first_element`, the rows hold elements ``first_element:`` of
        longer rows (a row read in pieces).
    layout : Layout
        The statistic of each element.
    slots : ndarray of int64, shape (rows,)
        Each row's slot in ``[0, len(keys))``, or -1 to skip the row.
    keys : ndarray of int64
        What each slot stands for (the caller's; returned in the sums).
    shift : ndarray of float64, shape (len(keys), layout.stats)
        The shift of each slot not `fresh`.
    fresh : ndarray of bool, shape (len(keys),)
        Slots that take their shift from the data.
    weights : ndarray of float64, optional
        One weight per row.
    omit : bool
        Leave NaN / Inf values out; the counts are then per element.
    squares : bool
        Whether to accumulate S2 (class means need only S1).
    count0 : ndarray, optional
        Under `omit`, the counts the slots already hold (a statistic with
        none takes its shift from its first finite value).
    start : Sums, optional
        Sums to continue (same slots): a batch that spans blocks.
    scratch : Workspace, optional
        Reused memory for the sums (valid until the next call with it): a
        block's (slots, statistics) arrays then cost no fresh pages. With it,
        `shift` may be None when every slot is `fresh`.

    Raises
    ------
    NonFiniteError
        Without `omit`, for the first NaN / Inf of `x` in C order (row
        counted from the first row of `x`).
    DataError
        The squares of finite values overflow float64.
    """
    flat, table = _as_rows(x)
    P, K = len(keys), layout.stats
    kdtype = kernel_dtype(x.dtype)
    integer = kdtype.kind != "f"
    if start is not None:
        sums = start
    else:
        def zeros(name: str, shape: tuple, dtype=np.float64, *, fill: bool = True) -> np.ndarray:
            if scratch is None:
                return np.zeros(shape, dtype)
            # Room for the next power of two of slots: the slots present vary from block to block, and
            # a buffer grown by a few slots each time would be fresh pages each time (~0.4 GB/s here).
            room = 1 << max(shape[0] - 1, 0).bit_length()
            array = scratch.array(name, (room,) + shape[1:], dtype)[:shape[0]]
            if fill:
                array.fill(0)
            return array

        if shift is None:  # every slot is fresh: the kernel sets the shift of every statistic met
            kshift = zeros("shift", (P, K), kdtype, fill=omit)  # (unless left out: NaN / Inf)
        elif integer:
            kshift = np.clip(np.nan_to_num(shift), *_integer_range(kdtype)).astype(kdtype)
        else:
            kshift = np.array(shift, dtype=np.float64)
        sums = Sums(keys, np.zeros(P, np.int64), np.zeros(P), zeros("count", (P, K)) if omit else EMPTY_2D,
                    zeros("s1", (P, K)), zeros("s2", (P, K)) if squares else EMPTY_2D, kshift, integer)
    if not omit:
        count0 = None
    elif count0 is None:
        count0 = np.zeros((P, K))
    weights = None if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    fresh = np.array(fresh, dtype=np.bool_)
    if layout.repeats and first_element % K == 0 and flat.shape[1] % K == 0:
        if first_element:  # every statistic's first element came in an earlier piece of the row
            fresh[:] = False
        _channels_last(flat, table, slots, weights, sums, fresh, count0, omit, squares, scratch)
    else:
        _kernel(flat, table, first_element, layout, slots, weights, sums, fresh, count0, omit, squares)
    if start is None and shift is None and not omit:
        sums.shift[sums.rows == 0] = 0  # slots without rows: their shift was never set
    if not omit and not (np.isfinite(sums.s1).all() and (not squares or np.isfinite(sums.s2).all())):
        raise _not_finite(x, slots, look=True)
    return sums


def _not_finite(x: np.ndarray, slots: np.ndarray, *, look: bool) -> Exception:
    """The error for sums of the rows of `x` (slot >= 0) that are not finite: the first
    NaN / Inf (when `look`, i.e. none was left out), else float64's overflow."""
    where = first_nonfinite_row(x, slots) if look else None
    if where is None:
        return DataError("the sum of squares overflows float64; the data are too large in magnitude to have a "
                         "variance, scale them down")
    return NonFiniteError(where[0], where[1:], x[where])


def _kernel(flat: np.ndarray, table: Optional[np.ndarray], first_element: int, layout: Layout, slots: np.ndarray,
            weights: Optional[np.ndarray], sums: Sums, fresh: np.ndarray, count0: Optional[np.ndarray], omit: bool,
            squares: bool, *, s1: Optional[np.ndarray] = None, s2: Optional[np.ndarray] = None,
            shift: Optional[np.ndarray] = None, counted: Optional[tuple] = None) -> None:
    """The compiled loop over `flat` in calls of at most CALL_ELEMENTS elements, into
    `sums` (or the `s1`, `s2`, `shift` and row / weight counts given instead)."""
    kmap = layout.kmap if layout.kmap.size else None
    rows_out, weight_out = counted or (sums.rows, sums.weight)
    step = max(1, CALL_ELEMENTS // max(flat.shape[1], 1))
    for begin in range(0, flat.shape[0], step):
        end = min(flat.shape[0], begin + step)
        # (no weights, no squares: empty arrays, not None; see the kernel)
        compiled_kernels()._accumulate(flat[begin:end], table, first_element, layout.run, kmap, layout.kfirst,
                                slots[begin:end], EMPTY_F if weights is None else weights[begin:end],
                                sums.shift if shift is None else shift, fresh, count0, rows_out, weight_out,
                                sums.count if omit else None, sums.s1 if s1 is None else s1,
                                (sums.s2 if s2 is None else s2) if squares else EMPTY_2D)


CHANNELS_LAST_RUN = 16  # fewer statistics than this per pixel: sums per element, then per channel
CHANNELS_LAST_SCRATCH = 8 << 20  # bytes of per-element sums that path may take


def _channels_last(flat: np.ndarray, table: Optional[np.ndarray], slots: np.ndarray, weights: Optional[np.ndarray],
                   sums: Sums, fresh: np.ndarray, count0: Optional[np.ndarray], omit: bool, squares: bool,
                   scratch: Optional[Workspace]) -> None:
    """The sums of rows whose elements cycle through the statistics (channels-last,
    a row (H, W, C) reduced over H and W), read with the kernel's vectorized path
    and no copy of the block; runs of one element per statistic are 5-20x slower.

    Few channels (RGB): sums per element of the row around its channel's shift,
    then added up per channel (float32 rows (32, 32, 3): 1.1 GB/s through
    fit-bn exact, against 0.5 for rows of 3 elements and 1.1 channels-first).
    Otherwise each row is read as H*W rows of one element per statistic, the
    row's slot and weight repeated for them (rows (32, 32, 64): 9.9 GB/s in the
    kernel, against 0.46 as runs of one element and 4.3 channels-first).
    """
    P, K = sums.s1.shape
    width = flat.shape[1]
    layout = Layout.of((width,), (0,))
    if K < CHANNELS_LAST_RUN and not omit and 3 * 8 * P * width <= CHANNELS_LAST_SCRATCH:
        _set_fresh_shifts(flat, table, slots, sums.shift, fresh)

        def scratch_array(name: str, dtype: np.dtype) -> np.ndarray:
            return np.empty((P, width), dtype) if scratch is None else scratch.array(name, (P, width), dtype)

        shift = scratch_array("pixel_shift", sums.shift.dtype)
        shift.reshape(P, -1, K)[...] = sums.shift[:, None, :]  # every element around its channel's shift
        s1 = scratch_array("pixel_s1", np.dtype(np.float64))
        s1.fill(0)
        s2 = scratch_array("pixel_s2", np.dtype(np.float64)) if squares else None
        if squares:
            s2.fill(0)
        _kernel(flat, table, 0, layout, slots, weights, sums, np.zeros(P, np.bool_), None, False, squares,
                s1=s1, s2=s2, shift=shift)
        sums.s1 += s1.reshape(P, -1, K).sum(axis=1)
        if squares:
            sums.s2 += s2.reshape(P, -1, K).sum(axis=1)
        return
    repeats = width // K
    shape = (len(slots), repeats)
    sub_slots = np.empty(shape, np.int64) if scratch is None else scratch.array("sub_slots", shape, np.int64)
    sub_slots[:] = slots[:, None]
    sub_weights = None
    if weights is not None:
        sub_weights = np.empty(shape) if scratch is None else scratch.array("sub_weights", shape, np.float64)
        sub_weights[:] = weights[:, None]
        sub_weights = sub_weights.reshape(-1)
    # the kernel counts sub-rows: it counts into throw-away arrays, and the rows are counted here
    _kernel(flat.reshape(-1, K), table, 0, Layout.of((K,), (0,)), sub_slots.reshape(-1), sub_weights, sums, fresh,
            count0, omit, squares, counted=(np.zeros(P, np.int64), np.zeros(P)))
    present = slots >= 0
    sums.rows += np.bincount(slots[present], minlength=P)
    sums.weight += np.bincount(slots[present], None if weights is None else weights[present], minlength=P)


def _set_fresh_shifts(flat: np.ndarray, table: Optional[np.ndarray], slots: np.ndarray, shift: np.ndarray,
                      fresh: np.ndarray) -> None:
    """Give each fresh slot the shift the kernel would: its first row's values of
    the statistics (there, the first pixel), in place."""
    K = shift.shape[1]
    rows = np.flatnonzero(slots >= 0)
    present, first = np.unique(slots[rows], return_index=True)
    wanted = fresh[present]
    if not wanted.any():
        return
    values = flat[rows[first[wanted]], :K]
    shift[present[wanted]] = values if table is None else table[values]


def first_nonfinite_row(x: np.ndarray, slots: np.ndarray) -> Optional[tuple[int, ...]]:
    """Index of the first NaN / Inf of `x` (C order) in a row the kernel read (slot >= 0)."""
    used = slots >= 0
    if used.all():
        return first_nonfinite(x)
    rows = np.flatnonzero(used)
    where = first_nonfinite(x[rows])
    return None if where is None else (int(rows[where[0]]),) + where[1:]


def fold_exact(sums: Sums, per_stat: int, shift: np.ndarray, offset: np.ndarray, m2: np.ndarray,
               weight: np.ndarray, count: Optional[np.ndarray]) -> None:
    """Merge block sums into the state rows ``sums.keys`` (in place).

    `count` is the per-element count array of the state, or None when counts
    are per row (``weight * per_stat``).
    """
    base, residual = sums.centers()
    s2 = sums.s2 if sums.s2.shape[0] else np.zeros_like(sums.s1)
    compiled_kernels()._fold_exact(sums.keys, base, residual if sums.integer else EMPTY_2D, sums.weight, sums.count,
                            sums.s1, s2, float(per_stat), sums.integer, shift, offset, m2, weight,
                            EMPTY_2D if count is None else count)


def update_groups(x: np.ndarray, layout: Layout, groups: np.ndarray, shift: np.ndarray, offset: np.ndarray,
                  m2: np.ndarray, rows: np.ndarray, weight: np.ndarray, count: Optional[np.ndarray], *,
                  weights: Optional[np.ndarray] = None) -> None:
    """Fold the rows of `x` into the moments of their `groups` (-1 skips a row), in place.

    The state arrays are ``(groups, statistics)`` (`rows`, `weight` per group);
    `count` per element, or None when counts are ``weight * per_stat`` (no
    values left out). Only the rows' groups are touched.

    Raises
    ------
    NonFiniteError, DataError
        As :func:`accumulate` (checked on the groups the rows touched).
    """
    flat, table = _as_rows(x)
    groups = np.ascontiguousarray(groups, dtype=np.int64)
    # no weights, every element its own statistic, no counting pass: empty arrays (see the kernel)
    weights = EMPTY_F if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    if not layout.kmap.size and count is None:
        check = _fold_in_runs(flat, table, groups, weights, shift, offset, m2, rows, weight)
    else:
        scratch = np.empty((3, layout.stats))
        check = compiled_kernels()._update_groups(flat, table, layout.run, layout.kmap, groups, weights, shift,
                                                  offset, m2, rows, weight, count, *scratch)
    if not np.isfinite(check):
        raise _not_finite(x, groups, look=count is None)


PARALLEL_ELEMENTS = 1 << 18  # a block at least this large is folded in two column halves, in threads,
PARALLEL_STATE_BYTES = 32 << 20  # when the state is too large for the caches (it waits on memory)
_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _threads() -> Optional[concurrent.futures.ThreadPoolExecutor]:
    """Two worker threads (the kernels release the GIL), or None on one core."""
    global _pool
    if _pool is None and (os.cpu_count() or 1) >= 2:
        _pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="normstats-kernel")
    return _pool


def _columns_in_threads(flat: np.ndarray, shift: np.ndarray) -> bool:
    """A large block over a state too large for the caches (many classes): worth two threads."""
    return (flat.size >= PARALLEL_ELEMENTS and flat.shape[1] >= 64 and shift.nbytes >= PARALLEL_STATE_BYTES
            and _threads() is not None)


def _fold_in_runs(flat, table, groups, weights, shift, offset, m2, rows, weight) -> float:
    """The group updates of a block, its rows sorted by group (stable: in stream
    order within a group), so that a group met several times is read and written
    once (:func:`compiled._fold_runs`); over a state too large for the caches, the
    columns split in two halves folded in two threads (the state rows a block
    touches are scattered, so two cores wait on memory in parallel; no state is
    duplicated)."""
    compiled = compiled_kernels()
    if len(shift) <= 8 * len(groups):
        order = np.empty(len(groups), np.int64)
        compiled._order_by_group(groups, np.zeros(len(shift) + 1, np.int64), order)
    else:  # (a counting sort would pass over every group for a few rows)
        order = np.argsort(groups, kind="stable")
    runs = np.empty(len(groups) + 1, np.int64)
    before, total = np.empty(len(groups)), np.empty(len(groups))
    nruns = compiled._group_runs(order, groups, weights, rows, weight, runs, before, total)
    width = flat.shape[1]
    scratch = np.empty((3, width))

    def fold(lo: int, hi: int) -> float:
        return compiled._fold_runs(flat, table, lo, hi, order, groups, weights, nruns, runs, before, total,
                                   shift, offset, m2, scratch[0, lo:hi], scratch[1, lo:hi], scratch[2, lo:hi])

    if not _columns_in_threads(flat, shift):
        return fold(0, width)
    half = (width // 2) & ~7  # whole cache lines of float64 per half
    parts = [_threads().submit(fold, lo, hi) for lo, hi in ((0, half), (half, width))]
    return sum(part.result() for part in parts)


def fold_centers_ema(sums: Sums, num_classes: int, alpha: float, centers: np.ndarray, initialized: np.ndarray,
                     decay: np.ndarray, first_mean: Optional[np.ndarray], first_seen: np.ndarray, *,
                     per_row: bool = False) -> None:
    """Fold the (batch, class) means of `sums` (keys ``batch * K + class``) into
    moving-average centers, in batch order, touching only the classes present.

    Each (batch, class) mean enters with weight `alpha`, or with `per_row`
    ``alpha * n`` for its n rows: every row then adds ``alpha * (x - C_old)``
    from the batch's starting center (the per-sample rule), still affine in
    ``C_old`` with the factor ``1 - alpha * n`` kept in `decay`."""
    base, residual = sums.centers()
    compiled = compiled_kernels()
    plan = np.empty(len(sums.keys), np.int8)
    keep_first = first_mean is not None
    compiled._ema_plan(sums.keys, num_classes, sums.weight, float(alpha), bool(per_row), initialized, decay,
                       first_seen, keep_first, plan)
    args = (sums.keys, num_classes, base, residual if sums.integer else EMPTY_2D, sums.s1, sums.weight,
            float(alpha), bool(per_row), plan)
    compiled._fold_centers_ema(*args, 0, centers.shape[1], centers, first_mean if keep_first else EMPTY_2D)


def fold_ema_batches(x: np.ndarray, slots: np.ndarray, keys: np.ndarray, batch: int, num_classes: int,
                     alpha: float, centers: np.ndarray, initialized: np.ndarray, decay: np.ndarray,
                     first_mean: Optional[np.ndarray], first_seen: np.ndarray, *, per_row: bool, omit: bool,
                     scratch: Workspace) -> int:
    """:func:`accumulate` and :func:`fold_centers_ema` of the consecutive batches of
    `x` in one pass, batch by batch: each batch's (batch, class) sums stay in the
    cache (scratch of one batch, not of the block), so a block costs its rows,
    however many pairs it holds. Float data only (integers: accumulate, then fold).

    `slots` and `keys` are :func:`slot_rows`' (with `batch`). Returns -1 when
    every batch was folded; under `omit`, the first row of the first batch whose
    sums are not finite (it and the later batches not folded; the caller leaves
    rows out and goes on from there).

    Raises
    ------
    NonFiniteError, DataError
        Without `omit`, as :func:`accumulate` (the batches before are folded).
    """
    flat, table = _as_rows(x)
    width = flat.shape[1]
    rows = min(batch, len(flat))

    stop = compiled_kernels()._fold_ema_batches(
        flat, table, int(batch), slots, keys, num_classes, float(alpha), bool(per_row), EMPTY_BOOL, EMPTY_2D,
        centers, initialized, decay, EMPTY_2D if first_mean is None else first_mean, first_seen,
        scratch.array("shift", (rows, width), np.float64), scratch.array("s1", (rows, width), np.float64),
        scratch.array("fresh", (rows,), np.bool_), scratch.array("local", (rows,), np.int64), scratch.array("rows", (rows,), np.int64),
        scratch.array("weight", (rows,), np.float64), scratch.array("plan", (rows,), np.int8),
        scratch.array("lead", (rows,), np.int64), scratch.array("check", (width,), np.float64))
    if stop >= 0 and not omit:
        raise _not_finite(x, slots, look=True)
    return int(stop)


def slot_rows(groups: np.ndarray, num_groups: int, lookup: np.ndarray, *, batch: Optional[int] = None,
              first_batch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Slots of the rows of `groups` (int64, -1 = skip) and the keys present
    (``batch * num_groups + group``, batch-major, in order of first appearance);
    with `batch`, rows ``i`` are in batch ``first_batch + i // batch``."""
    rows = len(groups)
    slots = np.empty(rows, np.int64)
    keys = np.empty(rows, np.int64)
    present = compiled_kernels()._slot_rows(np.ascontiguousarray(groups, dtype=np.int64), batch or max(rows, 1),
                                     first_batch, num_groups, lookup, slots, keys)
    return slots, keys[:present]


def load_kernels(dtype: np.dtype) -> None:
    """Load every kernel the fits use for data of `dtype` (:func:`warm_up`), each
    with Ctrl-C and SIGTERM held (see :func:`compiled_kernels`): what a process about
    to fork workers does, so that they share the loaded code."""
    # float16 blocks reach the kernels through a lookup table, not as float16 arrays
    warm_up(np.dtype(np.float32) if np.dtype(dtype) == np.float16 else dtype)


def warm_up(dtype: np.dtype = np.dtype(np.float32)) -> None:
    """Load (from numba's cache, else compile) the kernels the fits use for data of
    `dtype`, on a tiny input: what a long-running process or a benchmark does
    before its clock starts."""
    x = np.zeros((4, 2), dtype)
    layout = Layout.of((2,), (0,))
    slots, keys = np.zeros(4, np.int64), np.zeros(1, np.int64)
    sums = accumulate(x, layout, slots, keys, np.zeros((1, 2)), np.ones(1, bool))
    state = [np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), np.zeros(1)]
    fold_exact(sums, 1, *state, None)
    update_groups(x, layout, slots, *state[:3], np.zeros(1, np.int64), state[3], None)
    lookup = np.full(1, -1, np.int64)
    pairs, pair_keys = slot_rows(slots, 1, lookup, batch=2)
    fold_ema_batches(x, pairs, pair_keys, 2, 1, 0.5, np.zeros((1, 2)), np.zeros(1, bool), np.ones(1), None,
                     np.zeros(1, bool), per_row=False, omit=False, scratch=Workspace())
    ema = accumulate(x, layout, slots, keys, None, np.ones(1, bool), squares=False)
    fold_centers_ema(ema, 1, 0.5, np.zeros((1, 2)), np.zeros(1, bool), np.ones(1), None, np.zeros(1, bool))
    rows = read_only(x)
    two = np.zeros((3, 2))
    compiled_kernels()._update_groups(rows, None, 1, NO_KMAP, slots, EMPTY_F, *state[:3], np.zeros(1, np.int64),
                                      state[3], None, *two)
    runs, before, total = np.zeros(5, np.int64), np.zeros(4), np.zeros(4)
    compiled_kernels()._order_by_group(slots, np.zeros(2, np.int64), np.zeros(4, np.int64))
    compiled_kernels()._group_runs(slots, slots, EMPTY_F, np.zeros(1, np.int64), state[3], runs, before, total)
    compiled_kernels()._fold_runs(rows, None, 0, 2, slots, slots, EMPTY_F, 1, runs, before, total, *state[:3],
                                  *two)
    from . import compiled_fold

    compiled_fold.warm_up()
    if x.dtype == np.float32:  # what apply and gzip reads use on the same data
        row = np.zeros(2, np.float32)
        compiled_kernels()._normalize_rows(rows, row, row, row, np.zeros_like(x), row.copy())
        # (read-only planes, as a chunk decoded from bytes is)
        compiled_kernels()._unshuffle(read_only(np.zeros((4, 4), np.uint8)), 0, np.zeros(4, np.uint32))

