"""BatchNorm statistics: running (EMA) and exact population mean / inv_std.

Both estimators follow one life cycle: ``update(x) -> self`` per array of rows,
``merge(other) -> self`` where the mode allows it, ``result() -> Stats``.
They never touch files.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Union

import numpy as np

from .axes import AxesSpec, channel_meta, kept_shape, resolve_axes, stored_axes
from .boundaries import BatchBoundaries
from .errors import DataError, NonFiniteError, StatsFileError, UsageError
from .fitstate import FitState, file_options
from .kernels import EMPTY_2D, EMPTY_F, Layout, Sums, accumulate, compiled_kernels
from .row_pieces import accumulate_row
from .pooling import BatchPool, check_pool
from .accumulators import GroupedMoments, Moments
from .stats import BATCHNORM, Stats
from .workspace import KeepsScratch, Workspace
from .validate import (
    check_alpha,
    check_batch_size,
    check_ddof,
    check_eps,
    check_finite,
    check_nan_policy,
    check_groups,
    check_numeric_dtype,
    check_weights,
)

Initial = Union[float, np.ndarray, None]
REPORTED_INDICES = 100  # near-constant statistics listed by index in the metadata


class _BatchNormBase(FitState):
    """Options, input checks and bookkeeping shared by both modes."""

    kind = BATCHNORM

    def __init__(
        self,
        *,
        axes: AxesSpec,
        eps: float,
        ddof: int,
        batch_size: Optional[int],
        use_mean: bool,
        use_inv_std: bool,
        nan_policy: str,
    ) -> None:
        if not (use_mean or use_inv_std):
            raise UsageError("mean and inv_std are both disabled: there is nothing to fit")
        super().__init__(check_batch_size(batch_size), check_nan_policy(nan_policy))
        self.axes_spec = axes if isinstance(axes, str) else tuple(int(a) for a in axes)
        self.eps = check_eps(eps)
        self.ddof = check_ddof(ddof)
        self.use_mean = use_mean
        self.use_inv_std = use_inv_std
        self.axes: Optional[tuple[int, ...]] = None
        self.batches_skipped = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of each statistic (the input's kept axes)."""
        if self.axes is None:
            raise UsageError("the statistics' shape is known only after the first update")
        return kept_shape(self.row_shape, self.axes)

    def _check(self, x: np.ndarray) -> None:
        """Fix rank, row shape and axes on the first array; check them afterwards."""
        check_numeric_dtype(x.dtype, "input")
        if x.ndim < 1:
            raise DataError("input is a scalar; it needs at least one (row) axis")
        if self.axes is None:
            self.axes = resolve_axes(self.axes_spec, x.ndim)
            self.row_shape = tuple(x.shape[1:])
            self.input_dtype = str(x.dtype)
            self._start()
        elif tuple(x.shape[1:]) != self.row_shape:
            raise DataError(
                f"rows of shape {tuple(x.shape[1:])} do not match the rows seen so far "
                f"{self.row_shape}; every batch and shard must share the shape after axis 0"
            )

    def _start(self) -> None:
        """Allocate the state once the statistic's shape is known."""

    def _meta(self) -> dict:
        return dict(super()._meta(), axes=list(self.axes), eps=self.eps, ddof=self.ddof,
                    batches_skipped=self.batches_skipped, use_mean=self.use_mean,
                    use_inv_std=self.use_inv_std, **channel_meta(self.axes_spec, len(self.row_shape) + 1))

    def _require_updates(self) -> None:
        if self.axes is None:
            raise DataError("no rows were given: the statistics are undefined")

    def _restore_meta(self, stats: Stats) -> None:
        self._restore_counters(stats.meta)
        self.axes = tuple(stats.meta["axes"])
        self.batches_skipped = int(stats.meta["batches_skipped"])


def _initial(value: Initial, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        return np.array(np.broadcast_to(np.asarray(value, dtype=np.float64), shape))
    except ValueError:
        raise DataError(
            f"initial {name} of shape {np.shape(value)} does not fit statistics of shape {shape}"
        ) from None


class BatchNormEMA(KeepsScratch, _BatchNormBase):
    """BatchNorm running statistics: exponential moving averages per batch.

    For every batch ``x`` of `batch_size` rows (the last one may be shorter)::

        batch_mean    = mean(x over axes)
        batch_inv_std = 1 / sqrt(var(x over axes, ddof) + eps)
        mean    <- (1 - alpha) * mean    + alpha * batch_mean
        inv_std <- (1 - alpha) * inv_std + alpha * batch_inv_std

    A batch whose element count per statistic is ``<= ddof`` changes nothing
    and is counted in ``batches_skipped``.

    Parameters
    ----------
    axes : 'auto', 'auto:A' or tuple of int
        Axes reduced per batch; ``'auto'`` is every axis but the second,
        ``'auto:A'`` every axis but ``A`` (``'auto:-1'``: channels-last).
    alpha : float
        Weight of the newest batch, in (0, 1].
    eps : float
        Added to the variance before the inverse square root.
    ddof : int
        Delta degrees of freedom of the batch variance.
    mean, inv_std : float, ndarray or None
        Initial values (broadcast to the statistic's shape); ``None``
        disables the statistic (not estimated, not stored).
    batch_size : int, optional
        Rows per batch. Each :meth:`update` call splits its rows into
        consecutive batches of this size; without it, each call is one batch.
    nan_policy : {'error', 'omit'}
        A NaN / Inf element raises :class:`NonFiniteError`, or is left out of
        its batch statistic (a statistic with ``<= ddof`` finite elements in a
        batch is not updated by it; ``count`` then records the elements used).
    pool_batches : int, optional
        K: each batch's mean and variance are those of the last K batches
        pooled, the current one included, weighted by element count (see
        :mod:`normstats.pooling`: the reference layer's intent, not its code,
        which adds the current batch's inv_std where it meant the buffered
        ones). Every batch enters the buffer.
    pool_below : int, optional
        L: the pool replaces a batch's own values only where it has fewer
        than L elements per statistic.
    boundaries : BatchBoundaries, optional
        Batches start at these stream rows instead of every `batch_size`
        rows; a batch may be one row or span any number of updates. The last
        batch of the data stays open until :meth:`close` or :meth:`result`
        (``more`` does not matter). The result then holds
        ``batch_elements``, the elements per statistic of every batch.

    Notes
    -----
    The batch mean and variance are computed in float64 (two-pass), so the
    result does not depend on how rows are grouped into update calls as long
    as the batches are the same. All batches of one call are folded in at
    once: after ``k`` batches ``m_k = (1-a)^k m_0 + sum_i a (1-a)^(k-i) b_i``.

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNormEMA(alpha=0.5, batch_size=2)
    >>> bn.update(np.array([[0.0], [2.0], [4.0], [6.0]])).result().arrays["mean"]
    array([2.75])
    """

    mode = "ema"

    def __init__(
        self,
        *,
        axes: AxesSpec = "auto",
        alpha: float = 0.01,
        eps: float = 1e-5,
        ddof: int = 1,
        mean: Initial = 0.0,
        inv_std: Initial = 1.0,
        batch_size: Optional[int] = None,
        nan_policy: str = "error",
        pool_batches: Optional[int] = None,
        pool_below: Optional[int] = None,
        boundaries: Optional[BatchBoundaries] = None,
    ) -> None:
        if boundaries is not None and batch_size is not None:
            raise UsageError("batch boundaries replace the batch size: give one of them")
        super().__init__(
            axes=axes,
            eps=eps,
            ddof=ddof,
            batch_size=batch_size,
            use_mean=mean is not None,
            use_inv_std=inv_std is not None,
            nan_policy=nan_policy,
        )
        self.alpha = check_alpha(alpha)
        self.pool_batches, self.pool_below = check_pool(pool_batches, pool_below)
        self.boundaries = boundaries
        self._pool: Optional[BatchPool] = None
        self.batch_elements: list[int] = []  # per batch, with boundaries (the grid is then the data's)
        self.grid_origin = 0  # the state's row at which the boundaries' row 0 is (see from_stats)
        self._priming = False  # batches fill the pool buffer only (see priming)
        self._initial_mean = None if mean is None else check_finite(mean, "initial mean")
        self._initial_inv_std = None if inv_std is None else check_finite(inv_std, "initial inv_std", positive=True)
        self.mean: Optional[np.ndarray] = None
        self.inv_std: Optional[np.ndarray] = None
        self.count: Optional[np.ndarray] = None  # elements used per statistic
        self.layout: Optional[Layout] = None
        self._open: Optional[Sums] = None  # the sums of a batch still being read (never scratch)
        self._workspace = Workspace()

    @classmethod
    def from_stats(cls, stats: Stats, **options) -> "BatchNormEMA":
        """Continue from fitted statistics: their mean / inv_std are the
        starting values and their counters go on (options as in the constructor;
        axes come from the file)."""
        stats.require(BATCHNORM)
        if "groups" in stats.meta:
            raise StatsFileError("per-group statistics cannot start a moving average")
        file_options(stats.meta, options, "eps", "ddof", "nan_policy")
        if options.get("boundaries") is None:
            file_options(stats.meta, options, "batch_size")
            if options.get("batch_size") is None and stats.meta.get("batch_boundaries"):
                raise UsageError(f"{stats.source or 'the stats file'} was fitted with --batch-boundaries "
                                 f"{stats.meta['batch_boundaries']}; give --batch-boundaries (or --batch-size) again")
        if stats.mode == "ema":
            file_options(stats.meta, options, "alpha", "pool_batches", "pool_below")
        options.setdefault("mean", stats.arrays.get("mean"))
        options.setdefault("inv_std", stats.arrays.get("inv_std"))
        for name in ("mean", "inv_std"):
            if options[name] is not None and stats.arrays.get(name) is None:
                raise StatsFileError(f"the initial stats file has no {name} to continue from")
        state = cls(axes=stored_axes(stats.meta), **options)
        state._restore_meta(stats)
        state._start()
        if stats.mode == "ema" and "count" in stats.arrays:
            state.count = np.array(stats.arrays["count"], dtype=np.float64)
        if state._pool is not None and "pool_count" in stats.arrays:  # a checkpoint's buffer
            state._pool.restore(*(stats.arrays[name] for name in ("pool_count", "pool_mean", "pool_m2")))
        if state.boundaries is not None and "batch_elements" in stats.arrays:
            elements = np.asarray(stats.arrays["batch_elements"])
            if elements.ndim != 1 or elements.dtype.kind not in "iu" or (elements < 0).any():
                raise StatsFileError("batch_elements must be one non-negative integer per batch; the file is damaged")
            state.batch_elements = [int(n) for n in elements]
        # Continued over new rows, the boundaries count those rows (a resume over the same
        # input sets the origin back: see pipeline.run_fit).
        state.grid_origin = state.rows_seen
        return state

    def _start(self) -> None:
        shape = self.shape
        if self.use_mean:
            self.mean = _initial(self._initial_mean, shape, "mean")
        if self.use_inv_std:
            self.inv_std = _initial(self._initial_inv_std, shape, "inv_std")
        self.count = np.zeros(shape)
        self.decay = np.ones(shape)  # (1 - alpha) ** (batches folded in), per statistic
        self.layout = Layout.of(self.row_shape, self.axes)
        if self.pool_batches is not None:
            self._pool = BatchPool(self.pool_batches, self.pool_below, shape)

    def update(self, x: np.ndarray, *, more: bool = False) -> "BatchNormEMA":
        """Fold in the consecutive batches of `x` (shape ``(rows, ...)``).

        With `more`, a short last batch stays open and the next update
        continues it (a batch larger than a read block is accumulated across
        blocks, never held); :meth:`close` folds an open batch in.
        """
        x = np.asarray(x)
        self._check(x)
        rows = x.shape[0]
        if rows == 0:
            return self
        starts, complete = self._grid(rows, more)
        if self._open is not None and starts.size and starts[0] == 0:  # the open batch ended with the last rows
            self._fold_sums(self._open)
            self._open = None
        done = rows if not starts.size else int(starts[0])
        if self._open is not None:  # finish (or go on with) the batch the last update left open
            self._add(x[:done], 1, start=self._open)
            if starts.size or complete:
                self._fold_sums(self._open)
                self._open = None
        if done < rows:
            slots = np.searchsorted(starts, np.arange(done, rows), side="right") - 1
            sums = self._add(x[done:], starts.size, slots=slots, first=done)
            if complete:
                self._fold_sums(sums)
            else:  # the last batch goes on in the next update: keep it open
                self._fold_sums(sums.slots(slice(0, starts.size - 1)))
                self._open = sums.slots(slice(starts.size - 1, starts.size))
        self.rows_seen += rows
        return self

    def update_row(self, pieces: Iterator[tuple[int, np.ndarray]], template: np.ndarray) -> "BatchNormEMA":
        """Add one row given as ``(e0, piece)`` pairs (a row larger than a read block:
        see :meth:`normstats.stream.Stream.wide_rows`) to its batch, as
        ``update(row, more=True)`` would; `template` is a one-row array of the row's
        shape and dtype (:func:`normstats.row_pieces.row_template`)."""
        self._check(template)
        starts, complete = self._grid(1, True)
        if self._open is not None and starts.size:  # this row starts a batch: the open one ended
            self._fold_sums(self._open)
            self._open = None
        omit = self.nan_policy == "omit"
        try:
            if self._open is not None:
                self._open = accumulate_row(pieces, self.layout, 0, self._open.keys, self._open.shift,
                                            np.zeros(1, bool), omit=omit, start=self._open)
            else:
                self._open = accumulate_row(pieces, self.layout, 0, np.zeros(1, np.int64), None, np.ones(1, bool),
                                            omit=omit)
        except NonFiniteError as error:
            raise error.shifted(self.position) from None
        if complete:
            self.close()
        self.rows_seen += 1
        return self

    def last_start(self, rows: int) -> int:
        """The offset ``0 < k < rows`` of the last batch starting among the next `rows`
        rows, else 0: after an update with the rows before it, no batch is open (a
        driver takes a checkpoint there)."""
        starts = self._grid(rows, True)[0] if self.layout is not None else np.zeros(0, np.int64)
        starts = starts[starts > 0]
        return int(starts[-1]) if starts.size else 0

    def _grid(self, rows: int, more: bool) -> tuple[np.ndarray, bool]:
        """Where batches start among the next `rows` rows (offsets from the first; 0
        only if one starts there), and whether the last batch ends with them (with
        no start among them: whether the open batch does)."""
        if self.boundaries is not None:
            position = self.position - self.grid_origin
            starts = self.boundaries.starts_in(position, position + rows)
            if self._open is None and not (starts.size and starts[0] == 0):
                starts = np.r_[0, starts]  # rows that no open batch awaits start one
            return starts, self.boundaries.starts_in(position + rows, position + rows + 1).size > 0
        batch = self.batch_size or rows
        if self._open is not None and self.open_rows + rows <= batch:
            return np.zeros(0, np.int64), self.open_rows + rows == batch
        first = 0 if self._open is None else batch - self.open_rows
        starts = np.arange(first, rows, batch, dtype=np.int64)
        return starts, not more or rows - int(starts[-1]) == batch

    def _add(self, x: np.ndarray, batches: int, *, slots: Optional[np.ndarray] = None, first: int = 0,
             start: Optional[Sums] = None, at: Optional[int] = None, scratch: Optional[Workspace] = None) -> Sums:
        """The kernel's sums of the consecutive batches of `x` (each row's batch in
        `slots`, each batch shifted by its first row), or of rows continuing the
        open batch `start`; `at` and `scratch` replace the state's position and
        workspace."""
        layout = self.layout
        try:
            if start is not None:
                return accumulate(x, layout, np.zeros(len(x), np.int64), start.keys, start.shift,
                                  np.zeros(1, bool), omit=self.nan_policy == "omit", start=start)
            return accumulate(x, layout, slots, np.arange(batches, dtype=np.int64), None, np.ones(batches, bool),
                              omit=self.nan_policy == "omit", scratch=scratch or self._workspace)
        except NonFiniteError as error:
            raise error.shifted((self.position if at is None else at) + first) from None

    def _fold_sums(self, sums: Sums) -> None:
        stacked = (len(sums.keys),) + self.shape
        if not stacked[0]:
            return
        per_stat = self.layout.per_stat
        if self.boundaries is not None:
            self.batch_elements.extend(int(rows) * per_stat for rows in sums.rows)
        if self._pool is None and not self._priming:
            self._fold_compiled(sums, per_stat)
        else:
            self._fold(*sums.moments(per_stat, self.shape))

    def _fold_compiled(self, sums: Sums, per_stat: int) -> None:
        """:meth:`_fold` of the moments of `sums` in one compiled loop, the same bits
        (see :mod:`normstats.compiled_fold`): the fold of every block of a fit."""
        batches = len(sums.keys)
        base, residual = sums.centers() if sums.integer else (sums.shift, EMPTY_2D)
        for name in ("mean", "inv_std", "count", "decay"):  # folded in place, as flat views
            value = getattr(self, name)
            if value is not None and not (value.flags.c_contiguous and value.dtype == np.float64):
                setattr(self, name, np.ascontiguousarray(value, dtype=np.float64))
        # (empty arrays, not None, for what is not fitted: see the kernel)
        flat = [EMPTY_F if a is None else a.reshape(-1) for a in (self.mean, self.inv_std, self.count, self.decay)]
        counts = sums.count
        scratch = np.empty(sums.s1.shape, np.int64), np.empty((4, sums.s1.shape[1]))
        used = compiled_kernels()._ema_fold(sums.s1, sums.s2, base, residual, counts, sums.weight, per_stat,
                                            self.ddof, self.eps, self.alpha,
                                            (1.0 - self.alpha) ** np.arange(batches + 1), *flat, *scratch)
        self.batches_seen += batches
        self.batches_skipped += batches - used

    @property
    def open_rows(self) -> int:
        """Rows of a batch left open by ``update(..., more=True)``."""
        return 0 if self._open is None else int(self._open.rows[0])

    def close(self) -> "BatchNormEMA":
        """Fold in a batch left open by ``update(..., more=True)`` (a short last batch)."""
        if self._open is not None:
            self._fold_sums(self._open)
            self._open = None
        return self

    def _fold(self, n: np.ndarray, batch_mean: np.ndarray, batch_m2: np.ndarray) -> None:
        """Fold in consecutive batches' counts, means and M2 (stacked on axis 0)."""
        count = batch_mean.shape[0]
        if self._priming:
            self._pool.take(n, batch_mean, batch_m2)
            return
        self.batches_seen += count
        own = n
        if self._pool is not None:
            n, batch_mean, batch_m2 = self._pool.take(n, batch_mean, batch_m2)
        # Per batch and statistic: is there enough data for a variance?
        valid = n > self.ddof
        used = valid.reshape(count, -1).any(axis=1)
        self.batches_skipped += int(count - used.sum())
        if not used.any():
            return
        self.count += np.where(valid, own, 0).sum(axis=0)
        later = np.flip(np.cumsum(np.flip(valid, 0), axis=0), 0) - valid  # valid batches after each
        weights = np.where(valid, self.alpha * (1.0 - self.alpha) ** later, 0.0)
        decay = (1.0 - self.alpha) ** valid.sum(axis=0)
        self.decay = self.decay * decay
        if self.use_mean:
            self.mean = decay * self.mean + (weights * np.where(valid, batch_mean, 0.0)).sum(axis=0)
        if self.use_inv_std:
            with np.errstate(invalid="ignore", divide="ignore"):
                batch_inv_std = 1.0 / np.sqrt(batch_m2 / (n - self.ddof) + self.eps)
            self.inv_std = decay * self.inv_std + (weights * np.where(valid, batch_inv_std, 0.0)).sum(axis=0)

    @contextlib.contextmanager
    def priming(self, first_row: int) -> Iterator["BatchNormEMA"]:
        """Updates inside fill the pool buffer only (the batches before a row range of a
        split fit, from stream row `first_row`): nothing is averaged or counted.

        On exit the open batch is closed into the buffer and the counters are
        back where they were, so the range's own rows follow.
        """
        if self.pool_batches is None:
            raise UsageError("only a pooled fit (pool_batches) is primed")
        saved = (self.first_row, self.rows_seen)
        self.first_row, self.rows_seen, self._priming = first_row, 0, True
        try:
            yield self
            self.close()
        finally:
            self._priming = False
            self.first_row, self.rows_seen = saved

    def merge(self, other: "_BatchNormBase") -> "BatchNormEMA":
        """Moving averages depend on batch order and cannot be merged."""
        raise UsageError(
            "ema statistics cannot be merged: a moving average depends on the order of all "
            "batches; fit shards with --mode exact to merge them"
        )

    def follow(self, later: "BatchNormEMA") -> "BatchNormEMA":
        """Append the batches of `later`, fitted on the rows right after these.

        The moving average is linear in its batches: a state that started from
        zero over the later rows holds ``sum a (1-a)^(k-i) b_i`` and its
        ``decay`` ``(1-a)^k``, so ``decay * m + later.mean`` is what one state
        fed every row in order would hold (to float64 rounding). `later` must
        have started from ``mean=0`` and ``inv_std=0`` (:meth:`zero_start`).
        """
        if later.axes is None:
            return self
        if self._open is not None or later._open is not None:
            raise UsageError("close() both states before appending: a batch is still open")
        if self.boundaries is not None:
            raise UsageError("variable batches cannot be appended: a range needs the batches "
                             "before it; fit in one process")
        for name in ("axes", "row_shape", "alpha", "eps", "ddof", "batch_size", "use_mean", "use_inv_std",
                     "pool_batches", "pool_below"):
            if getattr(self, name) != getattr(later, name):
                raise DataError(f"cannot append an ema fit with different {name}")
        if self.use_mean:
            self.mean = later.decay * self.mean + later.mean
        if self.use_inv_std:
            self.inv_std = later.decay * self.inv_std + later.inv_std
        if self._pool is not None:  # the later range was primed with the batches before it
            self._pool = copy.deepcopy(later._pool)
        self.decay = self.decay * later.decay
        self.count = self.count + later.count
        self._add_counters(later)
        self.batches_skipped += later.batches_skipped
        return self

    combine = follow

    def block_work(self):
        """What :meth:`update` computes for a block of whole batches, as a function
        ``work(x, at, scratch) -> sums`` that only reads the state (reader threads run
        it side by side; `at` is the state position of the block's first row), and
        :meth:`take` folds its sums in, in stream order; None when a batch is open."""
        if self._open is not None or self.layout is None or self.boundaries is not None:
            return None  # (batches of a boundaries file fall anywhere in a block)
        batch = self.batch_size

        def work(x: np.ndarray, at: int, scratch: Workspace) -> Sums:
            rows = x.shape[0]
            size = batch or rows
            return self._add(x, -(-rows // size), slots=np.arange(rows, dtype=np.int64) // size, at=at,
                             scratch=scratch)
        return work

    def take(self, sums: Sums, rows: int) -> None:
        """Fold in the sums of ``block_work()`` for the next `rows` rows."""
        self._fold_sums(sums)
        self.rows_seen += rows

    def zero_start(self) -> "BatchNormEMA":
        """Start from mean 0 and inv_std 0 (for a range of rows to :meth:`follow` others)."""
        self._initial_mean = None if self._initial_mean is None else 0.0
        self._initial_inv_std = None if self._initial_inv_std is None else 0.0
        return self

    def result(self) -> Stats:
        """The running mean / inv_std (float64) and metadata (an open batch folded
        in, as the last, short one)."""
        self._require_updates()
        if self._open is not None:
            return copy.deepcopy(self).close().result()
        arrays = {}
        if self.use_mean:
            arrays["mean"] = self.mean.copy()
        if self.use_inv_std:
            arrays["inv_std"] = self.inv_std.copy()
        meta = self._meta()
        meta["alpha"] = self.alpha
        if self._pool is not None:
            meta.update(pool_batches=self.pool_batches, pool_below=self.pool_below)
            if self._pool.n.shape[0]:  # (K = 1 holds none; files take no empty arrays)
                arrays.update(self._pool.state())  # a checkpoint resumes with the buffer
        if self.boundaries is not None:
            meta["batch_boundaries"] = self.boundaries.name
            arrays["batch_elements"] = np.array(self.batch_elements, dtype=np.int64)
        if self.nan_policy == "omit":
            arrays["count"] = self.count.copy()
            meta["values_omitted"] = int(self.rows_seen * _elements_per_row(self) - self.count.sum())
        return Stats(BATCHNORM, arrays, meta)


def _elements_per_row(state: _BatchNormBase) -> int:
    """Values in one row (rows_seen * this = the sum of all counts without omissions)."""
    return int(np.prod(state.row_shape, dtype=np.int64))


class BatchNormExact(_BatchNormBase):
    """Exact population mean and inv_std over every element seen.

    ``mean`` and ``var`` (with `ddof`) over all rows, accumulated in float64
    with Chan–Golub–LeVeque merges (see :mod:`normstats.moments`);
    ``inv_std = 1 / sqrt(var + eps)``. The result does not depend on batch
    size, block size, order, or how the data was split into merged shards.

    Parameters
    ----------
    axes, eps, ddof, batch_size, nan_policy
        As for :class:`BatchNormEMA` (`batch_size` is only recorded).
    use_mean, use_inv_std : bool
        Whether the statistic is stored (and later applied).
    num_groups : int, optional
        Per-group statistics (e.g. per speaker): every update then takes one
        group index in ``[0, num_groups)`` per row, and each statistic gets a
        leading axis of length `num_groups`.

    Notes
    -----
    A statistic whose variance is within the rounding error of the shifted
    sums (a constant channel; see :meth:`GroupedMoments.near_constant`) is
    reported in the metadata (``near_constant``) and gets variance 0, so its
    inv_std is ``1/sqrt(eps)``, never infinite or NaN. The mean is stored
    with its low part ``mean_low`` (``mean + mean_low`` is the mean to about
    twice float64's digits), so merging or continuing files loses nothing
    against a single run.

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNormExact(ddof=0).update(np.array([[1.0], [3.0]]))
    >>> bn.result().arrays["var"]
    array([1.])
    """

    mode = "exact"

    def __init__(
        self,
        *,
        axes: AxesSpec = "auto",
        eps: float = 1e-5,
        ddof: int = 1,
        use_mean: bool = True,
        use_inv_std: bool = True,
        batch_size: Optional[int] = None,
        nan_policy: str = "error",
        num_groups: Optional[int] = None,
    ) -> None:
        super().__init__(
            axes=axes,
            eps=eps,
            ddof=ddof,
            batch_size=batch_size,
            use_mean=use_mean,
            use_inv_std=use_inv_std,
            nan_policy=nan_policy,
        )
        if num_groups is not None and (int(num_groups) != num_groups or num_groups < 1):
            raise UsageError(f"the number of groups must be a positive integer, got {num_groups}")
        self.num_groups = None if num_groups is None else int(num_groups)
        self.weighted = False
        self.moments: Union[Moments, GroupedMoments, None] = None

    @classmethod
    def from_stats(cls, stats: Stats, **options) -> "BatchNormExact":
        """Continue an exact fit stored in `stats` (further updates and merges
        add to it)."""
        stats.require(BATCHNORM)
        if stats.mode != "exact":
            raise StatsFileError(
                f"the stats file was fitted with --mode {stats.mode}; only exact statistics "
                "can be continued or merged exactly"
            )
        meta = stats.meta
        file_options(meta, options, "eps", "ddof", "use_mean", "use_inv_std", "nan_policy", "batch_size")
        options.setdefault("num_groups", meta.get("groups"))
        if options["num_groups"] != meta.get("groups"):
            raise StatsFileError(
                f"{stats.source or 'the stats file'} holds statistics for "
                f"{meta.get('groups') or 'no'} groups, not {options['num_groups']}"
            )
        state = cls(axes=stored_axes(meta), **options)
        state._restore_meta(stats)
        state._start()
        state.weighted = bool(meta.get("weighted", False))
        count = np.asarray(stats.arrays["count"], dtype=np.float64)
        mean = stats.arrays["mean" if "mean" in stats.arrays else "moment_mean"]
        m2 = np.nan_to_num(np.asarray(stats.arrays["var"], dtype=np.float64) * (count - int(meta["ddof"])))
        low = stats.arrays.get("mean_low")  # absent in files of normstats <= 0.1
        if state.num_groups is None:
            state.moments.restore(count, mean, m2, low, row_shape=state.row_shape)
        else:
            state.moments.restore(stats.arrays["group_rows"], count, mean, m2, low, row_shape=state.row_shape)
        return state

    def _start(self) -> None:
        if self.num_groups is None:
            self.moments = Moments(self.axes, nan_policy=self.nan_policy)
        else:
            self.moments = GroupedMoments(self.num_groups, self.axes, nan_policy=self.nan_policy)
        self.moments.start(self.row_shape)

    def update(
        self, x: np.ndarray, groups: Optional[np.ndarray] = None, weights: Optional[np.ndarray] = None
    ) -> "BatchNormExact":
        """Add the rows of `x` (shape ``(rows, ...)``) to the population.

        Parameters
        ----------
        x : ndarray
        groups : ndarray of int, optional
            One group per row; required exactly when `num_groups` was given.
        weights : ndarray, optional
            One non-negative weight per row (frequency or reliability
            weights); the count becomes the weight sum.
        """
        x = np.asarray(x)
        groups, weights = self._side(x, groups, weights)
        if x.shape[0] == 0:
            return self
        try:
            if self.num_groups is None:
                self.moments.update(x, weights)
            else:
                self.moments.update(x, groups, weights)
        except NonFiniteError as error:
            raise error.shifted(self.position) from None
        self._count(x.shape[0])
        return self

    def update_row(self, pieces: Iterator[tuple[int, np.ndarray]], template: np.ndarray,
                   groups: Optional[np.ndarray] = None, weights: Optional[np.ndarray] = None) -> "BatchNormExact":
        """Add one row given as ``(e0, piece)`` pairs (a row larger than a read block:
        see :meth:`normstats.stream.Stream.wide_rows`), as :meth:`update` adds it;
        `template` is a one-row array of its shape and dtype
        (:func:`normstats.row_pieces.row_template`), `groups` and `weights` hold one value."""
        groups, weights = self._side(template, groups, weights)
        try:
            self.moments.update_row(pieces, 0 if groups is None else int(groups[0]),
                                    None if weights is None else float(weights[0]))
        except NonFiniteError as error:
            raise error.shifted(self.position) from None
        self._count(1)
        return self

    def _side(self, x: np.ndarray, groups: Optional[np.ndarray],
              weights: Optional[np.ndarray]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Check the rows `x` and their groups and weights (validated as int64 / float64)."""
        self._check(x)
        if weights is not None:
            weights = check_weights(weights, x.shape[0], self.position)
            self.weighted = True
        if not x.shape[0]:
            return groups, weights
        if self.num_groups is None:
            if groups is not None:
                raise UsageError("groups were given but the state has no num_groups")
        else:
            groups = check_groups(groups, x.shape[0], self.num_groups, self.position, "group")
        return groups, weights

    def _count(self, rows: int) -> None:
        self.batches_seen += self.batches_in(rows)
        self.rows_seen += rows

    def _too_small(self, count: np.ndarray, meta: dict) -> np.ndarray:
        """Statistics with ``count <= ddof`` (no variance): reported in `meta` like
        unseen groups (their var and inv_std are NaN), or an error when nothing
        is left to fit."""
        omitted = "; NaN / Inf values were left out (--nan-policy omit)" if self.nan_policy == "omit" else ""
        if self.weighted and not np.any(count > 0):
            raise DataError("every weight is 0: there is nothing to fit; give some rows a positive weight")
        too_small = count <= self.ddof
        if self.num_groups is None:
            if too_small.all():
                raise DataError(
                    f"exact statistics need more than ddof={self.ddof} elements per statistic, got "
                    f"{int(np.max(count)) if count.size else 0}{omitted}"
                )
            meta["too_small_count"], meta["too_small"] = _listed(too_small)
            return too_small
        small = too_small.reshape(self.num_groups, -1).any(axis=1) & (self.moments.rows > 0)
        if too_small.all():
            raise DataError(
                f"no group has more than ddof={self.ddof} elements per statistic{omitted}; "
                "nothing to fit"
            )
        meta["groups_too_small"], meta["groups_too_small_list"] = _listed(small)
        return too_small

    def merge(self, other: "_BatchNormBase") -> "BatchNormExact":
        """Add what `other` (an exact fit of the same shape and options) has seen."""
        if not isinstance(other, BatchNormExact):
            raise UsageError("only exact statistics can be merged")
        if other.axes is None:
            return self
        if self.axes is None:
            self.axes, self.row_shape, self.input_dtype = other.axes, other.row_shape, other.input_dtype
            self._start()
        for name in ("axes", "row_shape", "eps", "ddof", "num_groups", "use_mean", "use_inv_std"):
            if getattr(self, name) != getattr(other, name):
                raise DataError(
                    f"cannot merge statistics with different {name}: "
                    f"{getattr(self, name)} and {getattr(other, name)}"
                )
        self.moments.merge(other.moments)
        self._add_counters(other)
        self.weighted = self.weighted or other.weighted
        return self

    combine = merge

    def block_work(self, first: Optional[np.ndarray] = None):
        """As :meth:`BatchNormEMA.block_work`: unweighted blocks of one group, their
        sums taken around the shift of the state now (the fold re-centres them). A
        state that has seen no rows needs its `first` rows (``pilot_rows()`` of them,
        or all there are): the shift a first :meth:`update` would take from them."""
        if self.num_groups is not None or self.weighted or self.moments is None:
            return None
        if self.rows_seen:
            around = self.moments.shift_now()
        elif first is not None and len(first):
            around = self.moments.pilot_sums_around(first)
            if around is None:
                return None
        else:
            return None

        def work(x: np.ndarray, at: int, scratch: Workspace) -> Sums:
            try:
                return self.moments.block_sums(x, around=around)
            except NonFiniteError as error:
                raise error.shifted(at) from None
        return work

    def pilot_rows(self) -> int:
        """How many first rows :meth:`block_work` needs of a state that has seen none."""
        return self.moments.pilot_rows()

    def take(self, sums: Sums, rows: int) -> None:
        """Fold in the sums of ``block_work()`` for the next `rows` rows."""
        self.moments.fold(sums)
        self._count(rows)

    def result(self, *, spend: bool = False) -> Stats:
        """Population mean, var, inv_std and count (float64) and metadata.

        With `spend`, per-group statistics (counted per row: no ``nan_policy='omit'``)
        are built in the state's own arrays, and the count is a read-only view of
        the rows per group: 100 000 groups of 256 statistics take four arrays of
        theirs at the peak, not eight; the state is unusable after.
        """
        self._require_updates()
        moments = self.moments
        meta = self._meta()
        lean = spend and self.num_groups is not None and moments.count_flat is None and moments.started
        count = moments.count_view() if lean else moments.count
        if count is None:
            raise DataError("no rows were given: the statistics are undefined")
        too_small = self._too_small(count, meta)
        near_constant = moments.near_constant() & ~too_small
        mean_low = moments.mean_low  # mean + mean_low: the digits merges and --init need
        spare = None
        if lean:
            spare = moments.offset  # free once the mean is built: the inv_std goes there (no fresh pages)
            mean, var = moments.mean_and_variance(self.ddof, spend=True)
        else:
            mean, var = moments.mean, moments.variance(self.ddof)
        var[near_constant] = 0.0  # in place: var is the result's own array (K x D with groups)
        meta["near_constant_count"], meta["near_constant"] = _listed(near_constant)
        meta["weighted"] = self.weighted
        arrays = {"count": count, "var": var}
        arrays["mean" if self.use_mean else "moment_mean"] = mean
        arrays["mean_low"] = mean_low
        if self.use_inv_std:
            # one array, filled in place (K x D with groups)
            inv_std = np.empty_like(var) if spare is None else spare.reshape(var.shape)
            np.add(var, self.eps, out=inv_std)
            with np.errstate(invalid="ignore"):
                np.sqrt(inv_std, out=inv_std)
            arrays["inv_std"] = np.divide(1.0, inv_std, out=inv_std)
        if self.num_groups is not None:
            meta["groups"] = self.num_groups
            meta["groups_unseen"] = int(np.sum(moments.rows == 0))
            arrays["group_rows"] = moments.rows.copy()
        if self.nan_policy == "omit" and not self.weighted:
            meta["values_omitted"] = int(self.rows_seen * _elements_per_row(self) - count.sum())
        return Stats(BATCHNORM, arrays, meta)


def _listed(mask: np.ndarray) -> tuple[int, list[int]]:
    """How many entries `mask` flags, and the first REPORTED_INDICES of them."""
    flat = np.flatnonzero(mask)
    return int(flat.size), [int(i) for i in flat[:REPORTED_INDICES]]


def batchnorm_state(
    mode: str = "ema", *, init: Optional[Stats] = None, **options
) -> Union[BatchNormEMA, BatchNormExact]:
    """Make the BatchNorm state object for `mode` ('ema' or 'exact').

    With `init`, continue from those statistics (see the classes' ``from_stats``).
    """
    if mode not in ("ema", "exact"):
        raise UsageError(f"mode must be 'ema' or 'exact', got {mode!r}")
    cls = BatchNormEMA if mode == "ema" else BatchNormExact
    return cls(**options) if init is None else cls.from_stats(init, **options)
