"""Training-mode output: each batch normalized with its own statistics
(``apply --batch-stats``), as the BatchNorm layer does while it trains.

For every batch ``x`` of `batch_size` consecutive rows (the last may be shorter)::

    batch_mean    = mean(x over axes)
    batch_inv_std = 1 / sqrt(var(x over axes, ddof) + eps)
    y = (x - batch_mean) * (gamma * batch_inv_std) + beta

optionally with the batch statistics pooled over the last K batches
(:mod:`normstats.pooling`). A stats file supplies the axes, eps, ddof,
which terms apply (a statistic fitted as 'none' drops its term) and the
shape gamma and beta must fit; its mean and inv_std are not used.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .axes import broadcastable, kept_shape
from .errors import RowError, UsageError
from .kernels import Layout, accumulate
from .normalize import Affine, Normalizer, affine_array
from .pooling import BatchPool
from .stats import BATCHNORM, Stats
from .validate import check_batch_size

MAX_BATCH_BYTES = 1 << 30  # a batch is held whole (read in one block): its size is capped


class BatchStatsNormalizer(Normalizer):
    """Normalize consecutive batches of rows, each with its own statistics.

    Blocks given to :meth:`__call__` must start on a batch (a whole number of
    batches, but for the stream's last block): batches never span blocks, so
    a batch is held whole, at most :data:`MAX_BATCH_BYTES` (see
    :meth:`check`). With `pool_batches` the object keeps the last batches'
    sums between calls: feed it the blocks of one stream in order.

    Parameters
    ----------
    stats : Stats
        BatchNorm statistics giving axes, eps, ddof and the terms used
        (not per group).
    batch_size : int
        Rows per batch.
    gamma, beta, dtype
        As for :class:`Normalizer`.
    pool_batches, pool_below : int, optional
        As for :class:`normstats.batchnorm.BatchNormEMA`.

    Notes
    -----
    NaN / Inf input values are left out of their batch's statistics (and
    stay NaN / Inf in the output). A batch with at most `ddof` elements per
    statistic has no variance: a :class:`RowError` at its first row.

    Examples
    --------
    >>> stats = Stats("batchnorm", {"mean": np.zeros(1), "inv_std": np.ones(1)},
    ...               {"mode": "exact", "axes": [0], "row_shape": [1], "eps": 0.0, "ddof": 0})
    >>> BatchStatsNormalizer(stats, batch_size=2)(np.array([[1.0], [3.0], [5.0], [9.0]]))[:, 0]
    array([-1.,  1., -1.,  1.])
    """

    def __init__(self, stats: Stats, *, batch_size: int, gamma: Affine = 1.0, beta: Affine = 0.0,
                 dtype: Optional[str] = None, pool_batches: Optional[int] = None,
                 pool_below: Optional[int] = None) -> None:
        stats.require(BATCHNORM)
        if stats.meta.get("groups") is not None:
            raise UsageError("--batch-stats normalizes batches with their own statistics; per-group "
                             "statistics do not apply (leave --groups out, use a stats file without groups)")
        super().__init__(stats, gamma=1.0, beta=beta, dtype=dtype)
        self.batch_size = check_batch_size(batch_size)
        self.eps = float(stats.meta["eps"])
        self.ddof = int(stats.meta["ddof"])
        self.use_mean = "mean" in stats.arrays
        self.use_inv_std = "inv_std" in stats.arrays
        self.layout = Layout.of(self.row_shape, self.axes)
        self.shape = kept_shape(self.row_shape, self.axes)
        self._gamma = None if gamma is None else affine_array(gamma, self.shape, "gamma")
        self.pool = None if pool_batches is None else BatchPool(pool_batches, pool_below, self.shape)

    def check(self, row_shape: tuple[int, ...], dtype: np.dtype, name: str = "input") -> None:
        """As :meth:`Normalizer.check`, and refuse batches larger than MAX_BATCH_BYTES."""
        super().check(row_shape, dtype, name)
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self.batch_size * row_bytes > MAX_BATCH_BYTES:
            raise UsageError(
                f"--batch-stats holds each batch whole: {self.batch_size} rows of {row_bytes} bytes is more "
                f"than {MAX_BATCH_BYTES >> 20} MB; use a smaller --batch-size"
            )

    def __call__(self, x: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalize the batches of `x` (its first row starts a batch)."""
        if groups is not None:
            raise UsageError("--batch-stats takes no --groups")
        x = np.asarray(x)
        self.check(x.shape[1:], x.dtype)
        which = np.arange(x.shape[0], dtype=np.int64) // self.batch_size
        self._batch_terms = self._terms_of(x, which, int(which[-1]) + 1 if x.shape[0] else 0)
        self._batch_cast: dict = {}
        return super().__call__(x, which)

    def _terms_of(self, x: np.ndarray, which: np.ndarray, batches: int) -> dict[str, Optional[np.ndarray]]:
        """Each batch's mean and scale (float64, stacked), shaped to broadcast over a row
        (`which`: each row's batch)."""
        if not batches:
            return {"mean": None, "scale": None}
        # omit: NaN values are left out of their batch's statistics (never an error here)
        sums = accumulate(x, self.layout, which, np.arange(batches, dtype=np.int64), None,
                          np.ones(batches, bool), omit=True)
        stacked = (batches,) + self.shape
        n, mean, m2 = sums.moments(self.layout.per_stat, self.shape)
        if self.pool is not None:
            n, mean, m2 = self.pool.take(n, mean, m2)
        short = np.flatnonzero((n <= self.ddof).reshape(batches, -1).any(axis=1))
        if short.size and self.use_inv_std:
            batch = int(short[0])
            least = int(n[batch].min())
            raise RowError(batch * self.batch_size,
                           f"its batch has {least} element(s) per statistic, no variance with ddof={self.ddof}; "
                           "use a larger --batch-size (or --pool-batches) or fit the stats with --ddof 0")
        terms: dict[str, Optional[np.ndarray]] = {"mean": None, "scale": None}
        if self.use_mean:
            terms["mean"] = mean.reshape(self._stacked_terms(batches))
        scale = None
        if self.use_inv_std:
            with np.errstate(invalid="ignore", divide="ignore"):
                scale = 1.0 / np.sqrt(m2 / (n - self.ddof) + self.eps)
        if self._gamma is not None:
            scale = np.broadcast_to(self._gamma, stacked) if scale is None else scale * self._gamma
        if scale is not None:
            terms["scale"] = np.reshape(scale, self._stacked_terms(batches))
        return terms

    def _stacked_terms(self, batches: int) -> tuple[int, ...]:
        """The shape of `batches` stacked terms, each broadcastable over a row."""
        return (batches,) + broadcastable(np.zeros(self.shape), self.axes, self.row_shape).shape[1:]

    def _normalize(self, x: np.ndarray, groups: Optional[np.ndarray], compute: np.dtype,
                   name: str) -> np.ndarray:
        """The formula with each row's batch terms (`groups` holds each row's batch)."""
        cast = self._batch_cast.get(compute)
        if cast is None:
            with np.errstate(over="ignore"):
                cast = {k: None if v is None else v.astype(compute) for k, v in self._batch_terms.items()}
                beta = self._terms["beta"]
                cast["beta"] = None if beta is None else beta.astype(compute)
            self._batch_cast[compute] = cast
        terms = {k: v if v is None or k == "beta" else v[groups] for k, v in cast.items()}
        return self._formula(x, terms, compute, name)

    def _undefined_at(self, index: list, groups: Optional[np.ndarray]) -> bool:
        for name, term in self._batch_terms.items():
            if term is not None and np.isnan(np.broadcast_to(term[int(groups[0])], self.row_shape)[tuple(index)]):
                return True
        return False

