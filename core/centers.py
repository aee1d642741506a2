"""Per-class feature centers: moving average (EMA) and exact class means.

Life cycle as for BatchNorm: ``update(x, labels) -> self``, ``merge`` (exact
only), ``result() -> Stats``. Features of any rank are centered per row; the
centers have shape ``(num_classes,) + row_shape``.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional, Union

import numpy as np

from .errors import DataError, NonFiniteError, StatsFileError, UsageError
from .fitstate import FitState, file_options
from .accumulators import GroupedMoments
from .kernels import Layout, Sums, accumulate, fold_centers_ema, fold_ema_batches, kernel_dtype, slot_rows
from .row_pieces import accumulate_row
from .stats import CENTER_RULES, CENTERS, Stats
from .workspace import KeepsScratch, Workspace
from .validate import (
    check_alpha,
    check_batch_size,
    check_groups,
    check_nan_policy,
    check_numeric_dtype,
    check_seed,
    check_weights,
)

Init = Union[str, np.ndarray]


@functools.lru_cache(maxsize=8)
def _flat_layout(features: int) -> Layout:
    """Every feature of a (flattened) row is its own statistic."""
    return Layout.of((features,), (0,))
INITS = ("random", "zeros", "first")


class _CentersBase(FitState):
    """Options, feature/label checks and bookkeeping shared by both modes."""

    kind = CENTERS

    def __init__(
        self,
        num_classes: int,
        *,
        batch_size: Optional[int],
        ignore_label: Optional[int],
        nan_policy: str,
    ) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise UsageError(f"the number of classes must be a positive integer, got {num_classes}")
        super().__init__(check_batch_size(batch_size), check_nan_policy(nan_policy))
        self.num_classes = int(num_classes)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.counts = np.zeros(self.num_classes, dtype=np.int64)
        self.rows_ignored = 0

    @property
    def feature_dim(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64))

    def _check(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate one array of rows and its labels.

        Returns the rows flattened to (rows, F), the labels as int64, and the
        mask of rows to use (those not labelled `ignore_label`).
        """
        check_numeric_dtype(x.dtype, "features")
        if x.ndim < 1:
            raise DataError("features are a scalar; they need at least one (row) axis")
        labels = check_groups(labels, x.shape[0], self.num_classes, self.position, "label",
                              ignore=self.ignore_label)
        keep = labels != self.ignore_label if self.ignore_label is not None else np.ones(len(labels), bool)
        if self.row_shape is None:
            self.row_shape = tuple(x.shape[1:])
            self.input_dtype = str(x.dtype)
            self._start()
        elif tuple(x.shape[1:]) != self.row_shape:
            raise DataError(
                f"feature rows of shape {tuple(x.shape[1:])} do not match the rows seen so far "
                f"{self.row_shape}"
            )
        return x.reshape(x.shape[0], self.feature_dim), labels, keep

    def _count(self, labels: np.ndarray, keep: np.ndarray, batches: Optional[int] = None) -> None:
        np.add.at(self.counts, labels[keep], 1)  # only the classes present are touched
        # ema: the batches the update folded or opened (given); exact: on the stream's grid
        self.batches_seen += self.batches_in(len(labels)) if batches is None else batches
        self.rows_seen += len(labels)
        self.rows_ignored += int(len(labels) - keep.sum())

    def _start(self) -> None:
        """Allocate the state once the feature shape is known."""

    def _meta(self) -> dict:
        return dict(super()._meta(), num_classes=self.num_classes, rows_ignored=self.rows_ignored,
                    ignore_label=self.ignore_label, classes_unseen=int(np.sum(self.counts == 0)))

    def _require_updates(self) -> None:
        if self.row_shape is None:
            raise DataError("no rows were given: the centers are undefined")

    def _restore(self, stats: Stats) -> None:
        stats.require(CENTERS)
        meta = stats.meta
        if int(meta["num_classes"]) != self.num_classes:
            raise StatsFileError(
                f"the centers file has {meta['num_classes']} classes, not {self.num_classes}"
            )
        self._restore_counters(meta)
        self.rows_ignored = int(meta.get("rows_ignored", 0))
        self.counts = np.array(stats.arrays["counts"], dtype=np.int64)

    def _shaped(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape((self.num_classes,) + self.row_shape)

    def _located(self, error: NonFiniteError, first: int = 0, *, element: int = 0) -> NonFiniteError:
        """`error` of rows `first` rows into the current update, located in the stream
        (its element: ``error.index[element]``, flat in the row)."""
        return NonFiniteError(self.position + first + error.row,
                              np.unravel_index(error.index[element], self.row_shape), error.value)


CONTINUED = ("ignore_label", "nan_policy", "batch_size")  # options a continued fit takes from its file


FUSED_PAIRS_BYTES = 1 << 20  # (batch, class) sums of a block beyond this: folded batch by batch, in cache


class CentersEMA(KeepsScratch, _CentersBase):
    """Per-class moving average of batch class means (the center-loss update).

    For every batch of `batch_size` rows and every class ``j`` present in it,
    with ``C_batch[j]`` the mean of the batch's ``n_j`` rows labelled ``j``,
    rule ``'batch-mean'`` (the documented center-loss rule)::

        C[j] <- alpha * C_batch[j] + (1 - alpha) * C[j]

    and rule ``'per-sample'`` (what the Center layers' code does: each row
    ``f`` of the class adds ``alpha * (f - C[j])``, all from the center the
    batch started with)::

        C[j] <- C[j] + alpha * n_j * (C_batch[j] - C[j])

    `alpha` is the weight of the new data under both rules; with
    ``alpha * n_j > 1`` the per-sample rule overshoots, as the layers do.
    Classes absent from a batch keep their center; ``counts[j]`` is the
    number of rows of class ``j`` seen.

    Parameters
    ----------
    num_classes : int
        Number of classes K; labels must lie in ``[0, K)``.
    alpha : float
        Weight of the batch mean (per sample, with ``rule='per-sample'``),
        in (0, 1].
    rule : {'batch-mean', 'per-sample'}
        Whether a batch moves a class's center once, towards its mean, or
        once per row (see above).
    init : {'random', 'zeros', 'first'} or ndarray
        Initial centers: uniform in ``±1/sqrt(feature_dim)`` (seeded by
        `seed`), zeros, each class's first batch mean, or an array of shape
        ``(K, feature_dim)`` or ``(K,) + row_shape``. With ``'first'``, a
        class never seen holds NaN.
    seed : int
        Seed of the random initial centers.
    batch_size : int, optional
        Rows per batch; without it each :meth:`update` call is one batch.
    ignore_label : int, optional
        Rows with this label (e.g. -1 for unlabelled) are skipped; they
        still count towards the batches they fall in.
    nan_policy : {'error', 'omit'}
        A row holding NaN / Inf raises :class:`NonFiniteError`, or is
        skipped like an ignored row.

    Examples
    --------
    >>> import numpy as np
    >>> c = CentersEMA(2, alpha=0.5, init="zeros")
    >>> c.update(np.array([[2.0], [4.0], [8.0]]), np.array([0, 0, 1])).result().arrays["centers"]
    array([[1.5],
           [4. ]])

    Per sample, both rows of class 0 step from its starting center 0:

    >>> c = CentersEMA(2, alpha=0.5, rule="per-sample", init="zeros")
    >>> c.update(np.array([[2.0], [4.0], [8.0]]), np.array([0, 0, 1])).result().arrays["centers"]
    array([[3.],
           [4.]])
    """

    mode = "ema"

    def __init__(
        self,
        num_classes: int,
        *,
        alpha: float = 0.9,
        rule: str = "batch-mean",
        init: Init = "random",
        seed: int = 0,
        batch_size: Optional[int] = None,
        ignore_label: Optional[int] = None,
        nan_policy: str = "error",
    ) -> None:
        super().__init__(num_classes, batch_size=batch_size, ignore_label=ignore_label,
                         nan_policy=nan_policy)
        self.alpha = check_alpha(alpha)
        if rule not in CENTER_RULES:
            raise UsageError(f"the center rule must be one of {', '.join(CENTER_RULES)}, got {rule!r}")
        self.rule = rule
        if isinstance(init, str) and init not in INITS:
            raise UsageError(f"init must be one of {', '.join(INITS)} or an array, got {init!r}")
        self.init = init
        self.seed = check_seed(seed)
        self.centers: Optional[np.ndarray] = None  # (K, feature_dim) float64
        self.initialized = np.zeros(self.num_classes, dtype=bool)
        self.decay = np.ones(self.num_classes)  # (1 - alpha) ** (batches folded in), per class
        # Only in a state that will follow earlier rows (zero_start): each class's
        # first batch mean here, which seeds it if the earlier rows never saw it.
        self.first_mean: Optional[np.ndarray] = None
        self.first_seen = np.zeros(self.num_classes, dtype=bool)
        self._follows = False
        self._lookup: Optional[np.ndarray] = None  # scratch of the kernel's slot numbering
        self._workspace = Workspace()
        # A batch larger than a read block, accumulated across blocks (update(more=True)):
        # per class, rows (weight), a float64 shift (the class's first row) and the sum around it.
        self.open_rows = 0
        self._open: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    @classmethod
    def from_stats(cls, stats: Stats, **options) -> "CentersEMA":
        """Continue from fitted centers: they are the starting values, counts go on."""
        stats.require(CENTERS)
        centers = np.asarray(stats.arrays["centers"], dtype=np.float64)
        options.pop("init", None)
        options = file_options(stats.meta, options, *CONTINUED, "alpha", "rule", "seed")
        state = cls(int(stats.meta["num_classes"]), init=centers, **options)
        state._restore(stats)
        state._start()
        state.initialized = ~np.isnan(state.centers).any(axis=1)
        return state

    def _start(self) -> None:
        shape = (self.num_classes, self.feature_dim)
        if self._follows:
            self.first_mean = np.zeros(shape)
        if isinstance(self.init, str):
            if self.init == "random":
                bound = 1.0 / np.sqrt(self.feature_dim)
                rng = np.random.default_rng(self.seed)
                self.centers = rng.uniform(-bound, bound, size=shape)
            elif self.init == "zeros":
                self.centers = np.zeros(shape)
            else:
                self.centers = np.full(shape, np.nan)
            self.initialized[:] = self.init != "first"
            return
        init = np.asarray(self.init, dtype=np.float64)
        if init.size != self.num_classes * self.feature_dim or init.shape[0] != self.num_classes:
            raise DataError(
                f"initial centers of shape {init.shape} do not fit {self.num_classes} classes "
                f"with features of shape {self.row_shape}"
            )
        self.centers = init.reshape(shape).copy()
        self.initialized[:] = True

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_lookup"] = None
        return state

    def update(self, x: np.ndarray, labels: np.ndarray, *, more: bool = False) -> "CentersEMA":
        """Fold in the consecutive batches of `x` with their `labels`.

        With `more`, a short last batch stays open and the next update
        continues it (a batch larger than a read block is accumulated across
        blocks, never held whole); :meth:`close` folds an open batch in.
        """
        x = np.asarray(x)
        flat, labels, keep = self._check(x, labels)
        rows = flat.shape[0]
        if rows == 0:
            return self
        if self._lookup is None:
            self._lookup = np.full(self.num_classes, -1, dtype=np.int64)
        batch = self.batch_size or rows
        batches = self.batches_in(rows) if (more or self.open_rows) else -(-rows // batch)
        done = 0
        if self.open_rows:  # finish the batch the last update left open
            done = min(batch - self.open_rows, rows)
            self._add_open(flat[:done], labels[:done], keep[:done], 0)
            if self.open_rows == batch:
                self.close()
        whole = rows - done if not more else (rows - done) - (rows - done) % batch
        if whole:
            # Per class, in batch order: C <- (1 - a) C + a C_batch (a class not yet
            # initialized, init='first', takes its first batch mean as it is).
            self._fold_batches(flat[done:done + whole], labels[done:done + whole], keep[done:done + whole],
                               batch, done)
        if done + whole < rows:
            self._add_open(flat[done + whole:], labels[done + whole:], keep[done + whole:], done + whole)
        self._count(labels, keep, batches)
        return self

    def _fold(self, sums: Sums) -> None:
        fold_centers_ema(sums, self.num_classes, self.alpha, self.centers, self.initialized, self.decay,
                         self.first_mean, self.first_seen, per_row=self.rule == "per-sample")

    def _fold_batches(self, flat: np.ndarray, labels: np.ndarray, keep: np.ndarray, batch: int, first: int) -> None:
        """Fold whole batches of rows in (`first` rows into the update, for an error's row)."""
        omit = self.nan_policy == "omit"
        masked = -1  # the row from which NaN / Inf rows were left out
        while len(flat):
            slots, keys = slot_rows(np.where(keep, labels, -1), self.num_classes, self._lookup, batch=batch)
            if kernel_dtype(flat.dtype).kind != "f" or len(keys) * flat.shape[1] * 8 <= FUSED_PAIRS_BYTES:
                # integers (shifted in integer arithmetic), or few pairs: sums of the block, then the fold
                self._fold(self._sums(flat, labels, keep, batch, first, (slots, keys)))
                return
            try:
                stop = fold_ema_batches(flat, slots, keys, batch, self.num_classes, self.alpha, self.centers,
                                        self.initialized, self.decay, self.first_mean, self.first_seen,
                                        per_row=self.rule == "per-sample", omit=omit and masked != 0,
                                        scratch=self._workspace)
            except NonFiniteError as error:
                raise self._located(error, first) from None
            if stop < 0:
                return
            # Under omit a row holding NaN / Inf is skipped whole: looked for only from the batch that
            # has one. `keep` is a view of the update's mask, so the rows skipped are counted so.
            keep[stop:] &= np.isfinite(flat[stop:]).all(axis=1)
            flat, labels, keep, first, masked = flat[stop:], labels[stop:], keep[stop:], first + stop, 0

    def _sums(self, flat: np.ndarray, labels: np.ndarray, keep: np.ndarray, batch: int, first: int,
              slotted: Optional[tuple[np.ndarray, np.ndarray]] = None) -> Sums:
        """The kernel's sums per (batch, class) pair present; the rows start `first`
        rows into the current update (for the row of an error). `slotted`: the
        :func:`slot_rows` of these rows under `keep`, when the caller has them."""
        # The kernel's slots are the (batch, class) pairs present, numbered batch by batch.
        def sums(slotted: Optional[tuple[np.ndarray, np.ndarray]]) -> Sums:
            slots, keys = slotted or slot_rows(np.where(keep, labels, -1), self.num_classes, self._lookup,
                                               batch=batch)
            return accumulate(flat, _flat_layout(self.feature_dim), slots, keys, None, np.ones(len(keys), bool),
                              squares=False, scratch=self._workspace)
        try:
            return sums(slotted)
        except NonFiniteError as error:
            if self.nan_policy != "omit":
                raise self._located(error, first) from None
        # Under omit, a row holding NaN / Inf is skipped whole: found only in a block that has one.
        # `keep` is the caller's (a view of the update's mask), so the rows skipped are counted so.
        keep &= np.isfinite(flat).all(axis=1)
        return sums(None)  # the slots again: `keep` has changed

    def update_row(self, pieces: Iterator[tuple[int, np.ndarray]], template: np.ndarray,
                   labels: np.ndarray) -> "CentersEMA":
        """Add one row given as ``(e0, piece)`` pairs (a row larger than a read block:
        see :meth:`normstats.stream.Stream.wide_rows`) to its batch, as
        ``update(row, labels, more=True)`` would; `template` is a one-row array of
        its shape and dtype (:func:`normstats.row_pieces.row_template`)."""
        _, labels, keep = self._check(template, labels)
        batches = self.batches_in(1)
        sums = None
        if keep[0]:
            try:
                sums = accumulate_row(pieces, _flat_layout(self.feature_dim), 0, labels[:1].astype(np.int64), None,
                                      np.ones(1, bool), squares=False)
            except NonFiniteError as error:
                if self.nan_policy != "omit":
                    raise self._located(error, element=-1) from None
                keep[0] = False  # a row holding NaN / Inf is skipped whole
        self._open_sums(sums, 1)
        if self.open_rows == (self.batch_size or 1):
            self.close()
        self._count(labels, keep, batches)
        return self

    def _add_open(self, flat: np.ndarray, labels: np.ndarray, keep: np.ndarray, first: int) -> None:
        """Add rows to the open batch: per class, its sum around the class's first row."""
        self._open_sums(self._sums(flat, labels, keep, len(flat), first), len(flat))

    def _open_sums(self, sums: Optional[Sums], rows: int) -> None:
        """Add the sums of `rows` rows (None: rows left out) to the open batch."""
        if self._open is None:
            shape = (self.num_classes, self.feature_dim)
            self._open = (np.zeros(self.num_classes), np.zeros(shape), np.zeros(shape))
        if sums is None:
            self.open_rows += rows
            return
        weight, shift, total = self._open
        classes = sums.keys % self.num_classes
        base, residual = sums.centers()
        part = sums.s1 + sums.weight[:, None] * residual  # around `base`
        new = weight[classes] == 0
        shift[classes[new]] = base[new]
        old = ~new
        # around the open batch's shift: sum (x - s_open) = sum (x - s_block) + w (s_block - s_open)
        total[classes[new]] = part[new]
        total[classes[old]] += part[old] + sums.weight[old, None] * (base[old] - shift[classes[old]])
        weight[classes] += sums.weight
        self.open_rows += rows

    def close(self) -> "CentersEMA":
        """Fold in a batch left open by ``update(..., more=True)``."""
        if self.open_rows and self._open is not None:
            weight, shift, total = self._open
            present = np.flatnonzero(weight > 0)
            if len(present):
                w = weight[present]
                sums = Sums(present.astype(np.int64), w.astype(np.int64), w, np.zeros((0, 0)), total[present],
                            np.zeros((0, 0)), shift[present], False)
                self._fold(sums)
                weight[present] = 0.0
        self.open_rows = 0
        return self

    def merge(self, other: "_CentersBase") -> "CentersEMA":
        """Moving averages depend on batch order and cannot be merged."""
        raise UsageError(
            "ema centers cannot be merged: a moving average depends on the order of all "
            "batches; fit shards with --mode exact to merge them"
        )

    def follow(self, later: "CentersEMA") -> "CentersEMA":
        """Append the batches of `later`, fitted on the rows right after these.

        Per class the moving average is affine in its starting center: a
        state that started from zero (:meth:`zero_start`) over the later rows
        holds ``sum_i a_i prod_{k>i} (1-a_k) C_batch_i[j]`` and ``decay[j] =
        prod_i (1-a_i)`` (``a_i`` is alpha, or ``alpha * n_j`` in batch i
        under the per-sample rule), so
        ``decay[j] * C[j] + later.centers[j]`` is what one state fed every row
        in order would hold (to float64 rounding). A class these rows never
        initialized (``init='first'``) is seeded with its first batch mean in
        `later` instead. Appending is associative, so ranges combine in a tree.
        """
        if later.row_shape is None:
            return self
        if not later._follows:
            raise UsageError("only a state made with zero_start() can follow another")
        for name in ("num_classes", "row_shape", "alpha", "rule", "batch_size", "ignore_label", "nan_policy"):
            if getattr(self, name) != getattr(later, name):
                raise DataError(f"cannot append ema centers fitted with a different {name}")
        seen = later.first_seen
        start = np.where(self.initialized[:, None], self.centers, later.first_mean)
        self.centers[seen] = later.decay[seen, None] * start[seen] + later.centers[seen]
        self.initialized |= seen
        if self.first_mean is not None:  # this state follows others in turn
            fresh = seen & ~self.first_seen
            self.first_mean[fresh] = later.first_mean[fresh]
            self.first_seen |= seen
        self.decay *= later.decay
        self.counts += later.counts
        self._add_counters(later)
        self.rows_ignored += later.rows_ignored
        return self

    combine = follow

    def zero_start(self) -> "CentersEMA":
        """Start from zero centers (for a range of rows to :meth:`follow` others)."""
        self.init = "zeros"
        self._follows = True
        return self

    def result(self) -> Stats:
        """Centers (float64, NaN for never-initialized classes), counts and metadata."""
        self._require_updates()
        meta = self._meta()
        meta["alpha"] = self.alpha
        meta["rule"] = self.rule
        meta["init"] = self.init if isinstance(self.init, str) else "array"
        meta["seed"] = self.seed
        arrays = {"centers": self._shaped(self.centers.copy()), "counts": self.counts.copy()}
        return Stats(CENTERS, arrays, meta)


class CentersExact(_CentersBase):
    """Exact class means (and per-class variances), mergeable.

    ``centers[j]`` is the mean of every row labelled ``j``, accumulated in
    float64 with Chan–Golub–LeVeque merges; ``var[j]`` the population
    variance (ddof 0) per feature. Classes never seen hold NaN and count 0.

    Parameters
    ----------
    num_classes : int
        Number of classes K; labels must lie in ``[0, K)``.
    batch_size : int, optional
        Only recorded; the result does not depend on it.
    ignore_label : int, optional
        Rows with this label are skipped.
    nan_policy : {'error', 'omit'}
        A NaN / Inf feature value raises :class:`NonFiniteError`, or is left
        out of its class's statistic for that feature (``weight`` then holds
        the values used per class and feature).

    Examples
    --------
    >>> import numpy as np
    >>> c = CentersExact(3).update(np.array([[1.0], [3.0], [5.0]]), np.array([0, 0, 2]))
    >>> c.result().arrays["centers"]
    array([[ 2.],
           [nan],
           [ 5.]])
    """

    mode = "exact"

    def __init__(
        self,
        num_classes: int,
        *,
        batch_size: Optional[int] = None,
        ignore_label: Optional[int] = None,
        nan_policy: str = "error",
    ) -> None:
        super().__init__(num_classes, batch_size=batch_size, ignore_label=ignore_label,
                         nan_policy=nan_policy)
        self.moments = GroupedMoments(self.num_classes, (0,), nan_policy=self.nan_policy)
        self.weighted = False

    @classmethod
    def from_stats(cls, stats: Stats, **options) -> "CentersExact":
        """Continue an exact fit stored in `stats`."""
        stats.require(CENTERS)
        if stats.mode != "exact":
            raise StatsFileError(
                f"the centers file was fitted with --mode {stats.mode}; only exact centers "
                "can be continued or merged exactly"
            )
        state = cls(int(stats.meta["num_classes"]), **file_options(stats.meta, options, *CONTINUED))
        state._restore(stats)
        state._start()
        state.weighted = bool(stats.meta.get("weighted", False))
        shape = (state.num_classes, state.feature_dim)
        weight = stats.arrays.get("weight")
        count = (
            np.broadcast_to(state.counts[:, None], shape).astype(np.float64)
            if weight is None else np.asarray(weight, np.float64).reshape(shape)
        )
        var = np.asarray(stats.arrays["var"], np.float64).reshape(shape)
        state.moments.restore(state.counts, count, stats.arrays["centers"].reshape(shape), var * count)
        return state

    def _start(self) -> None:
        self.moments.start((self.feature_dim,))

    def update(
        self, x: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None
    ) -> "CentersExact":
        """Add the rows of `x` to the classes given by `labels`, optionally weighted
        (one non-negative weight per row)."""
        x = np.asarray(x)
        flat, labels, keep = self._check(x, labels)
        if weights is not None:
            weights = check_weights(weights, flat.shape[0], self.position)
            self.weighted = True
        if flat.shape[0] == 0:
            return self
        try:
            self.moments.update(flat, np.where(keep, labels, -1), weights)
        except NonFiniteError as error:
            raise self._located(error) from None
        self._count(labels, keep)
        return self

    def update_row(self, pieces: Iterator[tuple[int, np.ndarray]], template: np.ndarray, labels: np.ndarray,
                   weights: Optional[np.ndarray] = None) -> "CentersExact":
        """Add one row given as ``(e0, piece)`` pairs (a row larger than a read block:
        see :meth:`normstats.stream.Stream.wide_rows`), as :meth:`update` adds it;
        `template` is a one-row array of its shape and dtype, `labels` and `weights`
        hold one value."""
        _, labels, keep = self._check(template, labels)
        if weights is not None:
            weights = check_weights(weights, 1, self.position)
            self.weighted = True
        if keep[0]:
            try:
                self.moments.update_row(pieces, int(labels[0]), None if weights is None else float(weights[0]))
            except NonFiniteError as error:
                raise self._located(error, element=-1) from None
        self._count(labels, keep)
        return self

    def merge(self, other: "_CentersBase") -> "CentersExact":
        """Add what `other` (exact centers of the same classes and shape) has seen."""
        if not isinstance(other, CentersExact):
            raise UsageError("only exact centers can be merged")
        if other.row_shape is None:
            return self
        if other.num_classes != self.num_classes:
            raise DataError(
                f"cannot merge centers of {self.num_classes} and {other.num_classes} classes"
            )
        if self.row_shape is None:
            self.row_shape, self.input_dtype = other.row_shape, other.input_dtype
            self._start()
        elif self.row_shape != other.row_shape:
            raise DataError(
                f"cannot merge centers of features shaped {self.row_shape} and {other.row_shape}"
            )
        self.moments.merge(other.moments)
        self.counts += other.counts
        self._add_counters(other)
        self.rows_ignored += other.rows_ignored
        self.weighted = self.weighted or other.weighted
        return self

    combine = merge

    def result(self, *, spend: bool = False) -> Stats:
        """Class means and variances (NaN where unseen), counts and metadata; with
        `spend`, built in the state's arrays (no K x D copies; the state is spent)."""
        self._require_updates()
        moments = self.moments
        if self.weighted and not np.any(moments.weight > 0):
            raise DataError("every weight is 0: there is nothing to fit; give some rows a positive weight")
        moments.require_unspent()
        # weights keep the state: their per-class sums are read below
        centers, var = moments.mean_and_variance(0, spend=spend and not self.weighted)  # NaN where unseen
        arrays = {
            "centers": self._shaped(centers),
            "counts": self.counts.copy(),
            "var": self._shaped(var),
        }
        meta = self._meta()
        meta["weighted"] = self.weighted
        if self.weighted or self.nan_policy == "omit":
            arrays["weight"] = self._shaped(moments.count.copy())
        if self.nan_policy == "omit" and not self.weighted:
            used = (self.rows_seen - self.rows_ignored) * self.feature_dim
            meta["values_omitted"] = int(used - moments.count.sum())
        return Stats(CENTERS, arrays, meta)


def centers_state(
    num_classes: int, mode: str = "ema", *, init: Union[Init, Stats] = None, **options
) -> Union[CentersEMA, CentersExact]:
    """Make the centers state object for `mode` ('ema' or 'exact').

    `init` may be a :class:`Stats` of centers to continue from (ema: its
    centers are the starting values; exact: its classes are added to), or, for
    ema, ``'random'``, ``'zeros'``, ``'first'`` or an array of initial centers.
    """
    if mode not in ("ema", "exact"):
        raise UsageError(f"mode must be 'ema' or 'exact', got {mode!r}")
    cls = CentersEMA if mode == "ema" else CentersExact
    if isinstance(init, Stats):
        return cls.from_stats(init, **options)
    if init is not None:
        if mode == "exact":
            raise UsageError("initial centers apply to --mode ema only")
        options["init"] = init
    return cls(num_classes, **options)
