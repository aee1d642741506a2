"""Per-class feature centers: moving average (EMA) and exact class means.

Life cycle as for BatchNorm: ``update(x, labels) -> self``, ``merge`` (exact
only), ``result() -> Stats``. Features of any rank are centered per row; the
centers have shape ``(num_classes,) + row_shape``.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from ._version import __version__
from .errors import DataError, StatsFileError, UsageError
from .moments import grouped_moments, merge_moments
from .stats import CENTERS, Stats
from .validate import check_alpha, check_batch_size, check_numeric_dtype

Init = Union[str, np.ndarray]
INITS = ("random", "zeros", "first")


class _CentersBase:
    """Options, feature/label checks and bookkeeping shared by both modes."""

    mode = ""

    def __init__(self, num_classes: int, *, batch_size: Optional[int]) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise UsageError(f"the number of classes must be a positive integer, got {num_classes}")
        self.num_classes = int(num_classes)
        self.batch_size = check_batch_size(batch_size)
        self.row_shape: Optional[tuple[int, ...]] = None
        self.input_dtype: Optional[str] = None
        self.counts = np.zeros(self.num_classes, dtype=np.int64)
        self.rows_seen = 0
        self.batches_seen = 0

    @property
    def feature_dim(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64))

    def _check(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate one array of rows and its labels; return them as (rows, F) and int64."""
        check_numeric_dtype(x.dtype, "features")
        if x.ndim < 1:
            raise DataError("features are a scalar; they need at least one (row) axis")
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DataError(f"labels must be one integer per row, got shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise DataError(
                f"labels have dtype {labels.dtype}; they must be integers in [0, {self.num_classes})"
            )
        if len(labels) != x.shape[0]:
            raise DataError(
                f"{len(labels)} labels for {x.shape[0]} feature rows; features and labels "
                "must have the same number of rows"
            )
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            row = int(bad[0])
            raise DataError(
                f"label {labels[row]} at row {self.rows_seen + row} is outside "
                f"[0, {self.num_classes}); check --num-classes or the labels"
            )
        if self.row_shape is None:
            self.row_shape = tuple(x.shape[1:])
            self.input_dtype = str(x.dtype)
            self._start()
        elif tuple(x.shape[1:]) != self.row_shape:
            raise DataError(
                f"feature rows of shape {tuple(x.shape[1:])} do not match the rows seen so far "
                f"{self.row_shape}"
            )
        return x.reshape(x.shape[0], -1), labels.astype(np.int64, copy=False)

    def _start(self) -> None:
        """Allocate the state once the feature shape is known."""

    def _meta(self) -> dict:
        return {
            "normstats_version": __version__,
            "kind": CENTERS,
            "mode": self.mode,
            "num_classes": self.num_classes,
            "batch_size": self.batch_size,
            "rows_seen": self.rows_seen,
            "batches_seen": self.batches_seen,
            "row_shape": list(self.row_shape),
            "input_dtype": self.input_dtype,
            "classes_unseen": int(np.sum(self.counts == 0)),
        }

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
        self.row_shape = tuple(meta["row_shape"])
        self.input_dtype = meta["input_dtype"]
        self.rows_seen = int(meta["rows_seen"])
        self.batches_seen = int(meta["batches_seen"])
        self.counts = np.array(stats.arrays["counts"], dtype=np.int64)

    def _shaped(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape((self.num_classes,) + self.row_shape)


class CentersEMA(_CentersBase):
    """Per-class moving average of batch class means (the center-loss update).

    For every batch of `batch_size` rows and every class ``j`` present in it,
    with ``C_batch[j]`` the mean of the batch's rows labelled ``j``::

        C[j] <- alpha * C_batch[j] + (1 - alpha) * C[j]

    Classes absent from a batch keep their center; ``counts[j]`` is the
    number of rows of class ``j`` seen.

    Parameters
    ----------
    num_classes : int
        Number of classes K; labels must lie in ``[0, K)``.
    alpha : float
        Weight of the batch mean, in (0, 1].
    init : {'random', 'zeros', 'first'} or ndarray
        Initial centers: uniform in ``±1/sqrt(feature_dim)`` (seeded by
        `seed`), zeros, each class's first batch mean, or an array of shape
        ``(K, feature_dim)`` or ``(K,) + row_shape``. With ``'first'``, a
        class never seen holds NaN.
    seed : int
        Seed of the random initial centers.
    batch_size : int, optional
        Rows per batch; without it each :meth:`update` call is one batch.

    Examples
    --------
    >>> import numpy as np
    >>> c = CentersEMA(2, alpha=0.5, init="zeros")
    >>> c.update(np.array([[2.0], [4.0], [8.0]]), np.array([0, 0, 1])).result().arrays["centers"]
    array([[1.5],
           [4. ]])
    """

    mode = "ema"

    def __init__(
        self,
        num_classes: int,
        *,
        alpha: float = 0.9,
        init: Init = "random",
        seed: int = 0,
        batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(num_classes, batch_size=batch_size)
        self.alpha = check_alpha(alpha)
        if isinstance(init, str) and init not in INITS:
            raise UsageError(f"init must be one of {', '.join(INITS)} or an array, got {init!r}")
        self.init = init
        self.seed = int(seed)
        self.centers: Optional[np.ndarray] = None  # (K, feature_dim) float64
        self.initialized = np.zeros(self.num_classes, dtype=bool)

    @classmethod
    def from_stats(cls, stats: Stats, **options) -> "CentersEMA":
        """Continue from fitted centers: they are the starting values, counts go on."""
        stats.require(CENTERS)
        centers = np.asarray(stats.arrays["centers"], dtype=np.float64)
        state = cls(int(stats.meta["num_classes"]), init=centers, **options)
        state._restore(stats)
        state._start()
        state.initialized = ~np.isnan(state.centers).any(axis=1)
        return state

    def _start(self) -> None:
        shape = (self.num_classes, self.feature_dim)
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

    def update(self, x: np.ndarray, labels: np.ndarray) -> "CentersEMA":
        """Fold in the consecutive batches of `x` with their `labels`."""
        x = np.asarray(x)
        flat, labels = self._check(x, labels)
        rows = flat.shape[0]
        if rows == 0:
            return self
        batch = self.batch_size or rows
        batch_index = np.arange(rows, dtype=np.int64) // batch
        self._fold(flat, batch_index * self.num_classes + labels)
        self.counts += np.bincount(labels, minlength=self.num_classes)
        self.rows_seen += rows
        self.batches_seen += -(-rows // batch)
        return self

    def _fold(self, flat: np.ndarray, batch_class: np.ndarray) -> None:
        """Apply the EMA of every (batch, class) mean in batch order, at once.

        After its ``m`` batches in this call, class ``j`` holds
        ``(1-a)^m C[j] + sum_i a (1-a)^(m-1-i) C_batch_i[j]``; a class that
        starts uninitialized (``init='first'``) takes its first batch mean
        with weight 1 instead of ``a``.
        """
        alpha = self.alpha
        keys, _, means, _ = grouped_moments(flat, batch_class, with_m2=False)
        classes = keys % self.num_classes
        # keys are sorted by batch, then class; a stable sort by class keeps batch order.
        order = np.argsort(classes, kind="stable")
        classes, means = classes[order], means[order]
        group_end = np.searchsorted(classes, classes, side="right") - 1
        later = group_end - np.arange(len(classes))  # batches of the class after this one
        weights = alpha * (1.0 - alpha) ** later
        first = np.r_[True, classes[1:] != classes[:-1]]
        starting = first & ~self.initialized[classes]
        weights[starting] = (1.0 - alpha) ** later[starting]
        present = classes[first]
        seen_here = np.diff(np.r_[np.flatnonzero(first), len(classes)])
        fresh = ~self.initialized[present]
        decay = np.where(fresh, 0.0, (1.0 - alpha) ** seen_here)
        old = np.where(fresh[:, None], 0.0, self.centers[present])
        contribution = np.add.reduceat(weights[:, None] * means, np.flatnonzero(first), axis=0)
        self.centers[present] = decay[:, None] * old + contribution
        self.initialized[present] = True

    def merge(self, other: "_CentersBase") -> "CentersEMA":
        """Moving averages depend on batch order and cannot be merged."""
        raise UsageError(
            "ema centers cannot be merged: a moving average depends on the order of all "
            "batches; fit shards with --mode exact to merge them"
        )

    def result(self) -> Stats:
        """Centers (float64, NaN for never-initialized classes), counts and metadata."""
        self._require_updates()
        meta = self._meta()
        meta["alpha"] = self.alpha
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

    def __init__(self, num_classes: int, *, batch_size: Optional[int] = None) -> None:
        super().__init__(num_classes, batch_size=batch_size)
        self.means: Optional[np.ndarray] = None  # (K, feature_dim) float64
        self.m2: Optional[np.ndarray] = None

    @classmethod
    def from_stats(cls, stats: Stats, **options) -> "CentersExact":
        """Continue an exact fit stored in `stats`."""
        stats.require(CENTERS)
        if stats.mode != "exact":
            raise StatsFileError(
                f"the centers file was fitted with --mode {stats.mode}; only exact centers "
                "can be continued or merged exactly"
            )
        state = cls(int(stats.meta["num_classes"]), **options)
        state._restore(stats)
        state._start()
        seen = state.counts > 0
        state.means[seen] = np.asarray(stats.arrays["centers"], np.float64).reshape(
            state.means.shape
        )[seen]
        var = np.asarray(stats.arrays["var"], np.float64).reshape(state.m2.shape)
        state.m2[seen] = var[seen] * state.counts[seen, None]
        return state

    def _start(self) -> None:
        shape = (self.num_classes, self.feature_dim)
        self.means = np.zeros(shape)
        self.m2 = np.zeros(shape)

    def update(self, x: np.ndarray, labels: np.ndarray) -> "CentersExact":
        """Add the rows of `x` to the classes given by `labels`."""
        x = np.asarray(x)
        flat, labels = self._check(x, labels)
        if flat.shape[0] == 0:
            return self
        keys, counts, means, m2 = grouped_moments(flat, labels)
        self._add(keys, counts, means, m2)
        self.rows_seen += flat.shape[0]
        self.batches_seen += -(-flat.shape[0] // (self.batch_size or flat.shape[0]))
        return self

    def _add(self, keys: np.ndarray, counts: np.ndarray, means: np.ndarray, m2: np.ndarray) -> None:
        total, self.means[keys], self.m2[keys] = merge_moments(
            self.counts[keys, None], self.means[keys], self.m2[keys], counts[:, None], means, m2
        )
        self.counts[keys] = total[:, 0].astype(np.int64)

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
        keys = np.flatnonzero(other.counts)
        self._add(keys, other.counts[keys], other.means[keys], other.m2[keys])
        self.rows_seen += other.rows_seen
        self.batches_seen += other.batches_seen
        return self

    def result(self) -> Stats:
        """Class means and variances (NaN where unseen), counts and metadata."""
        self._require_updates()
        seen = self.counts > 0
        centers = np.where(seen[:, None], self.means, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(seen[:, None], self.m2 / self.counts[:, None], np.nan)
        arrays = {
            "centers": self._shaped(centers),
            "counts": self.counts.copy(),
            "var": self._shaped(var),
        }
        return Stats(CENTERS, arrays, self._meta())


def centers_state(num_classes: int, mode: str = "ema", **options) -> Union[CentersEMA, CentersExact]:
    """Make the centers state object for `mode` ('ema' or 'exact')."""
    if mode == "ema":
        return CentersEMA(num_classes, **options)
    if mode == "exact":
        return CentersExact(num_classes, **options)
    raise UsageError(f"mode must be 'ema' or 'exact', got {mode!r}")
