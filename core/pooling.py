"""Batch statistics pooled over the last K batches (the reference layer's
``update_buffer_size`` / ``update_batch_limit``).

Every batch's sums (element count, mean, M2 per statistic) enter a buffer of
the last K batches, the current one included; the pool of the buffer is
their union, combined with the parallel-variance formula in float64::

    N  = sum n_i
    M  = sum n_i * mean_i / N
    M2 = sum M2_i + sum n_i * (mean_i - M)**2

With a limit L, the pool replaces a batch's own values only where that batch
has fewer than L elements (per statistic); otherwise always.

The layer's code adds the *current* batch's inv_std to its buffer where it
meant the buffered batches' ones (a bug that makes the pool a plain average
of one value); this is the intent, the element-weighted pool of the batches'
moments. Plain arithmetic: no files.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import StatsFileError, UsageError

CHUNK_ELEMENTS = 1 << 20  # window elements pooled at once (bounds the scratch memory)


def check_pool(pool_batches: Optional[int], pool_below: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """Validated ``(K, L)``: K >= 1 (1 is no pooling), L >= 1 and only with K."""
    for name, value in (("pool_batches", pool_batches), ("pool_below", pool_below)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if pool_below is not None and pool_batches is None:
        raise UsageError("pool_below (--pool-below) needs pool_batches (--pool-batches K)")
    return (None if pool_batches is None else int(pool_batches),
            None if pool_below is None else int(pool_below))


class BatchPool:
    """The buffer of the last ``K - 1`` batches' sums and the pooling rule.

    Parameters
    ----------
    batches : int
        K, the batches pooled (the current one included).
    below : int, optional
        L: pool only the statistics of a batch with fewer than L elements.
    shape : tuple of int
        The statistics' shape.

    Examples
    --------
    >>> pool = BatchPool(2, None, (1,))
    >>> n, mean, m2 = pool.take(np.array([[2.0], [2.0]]), np.array([[0.0], [2.0]]), np.array([[2.0], [2.0]]))
    >>> n[:, 0], mean[:, 0], m2[:, 0]
    (array([2., 4.]), array([0., 1.]), array([2., 8.]))
    """

    def __init__(self, batches: int, below: Optional[int], shape: tuple[int, ...]) -> None:
        self.batches, self.below = check_pool(batches, below)
        self.shape = tuple(shape)
        empty = np.zeros((0,) + self.shape)
        self.n, self.mean, self.m2 = empty, empty.copy(), empty.copy()

    def restore(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> "BatchPool":
        """Refill the buffer (from a checkpoint): the last batches' sums, oldest first."""
        keep = self.batches - 1
        arrays = [np.asarray(a, dtype=np.float64) for a in (n, mean, m2)]
        if any(a.ndim != len(self.shape) + 1 or a.shape[1:] != self.shape for a in arrays):
            raise StatsFileError(f"the pooled batches' sums (pool_count, pool_mean, pool_m2) do not fit "
                                 f"statistics of shape {self.shape}; the file is damaged")
        if len({a.shape[0] for a in arrays}) != 1 or not all(np.isfinite(a).all() for a in arrays) \
                or (arrays[0] < 0).any() or (arrays[2] < 0).any():
            raise StatsFileError("the pooled batches' sums (pool_count, pool_mean, pool_m2) differ in length "
                                 "or hold negative or non-finite values; the file is damaged")
        self.n, self.mean, self.m2 = (a[a.shape[0] - min(keep, a.shape[0]):] for a in arrays)
        return self

    def take(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The count, mean and M2 each batch enters the average with, for
        consecutive batches stacked on axis 0; the batches then join the buffer."""
        mean = np.where(n > 0, mean, 0.0)  # an empty batch weighs nothing (its mean is NaN)
        keep = self.batches - 1
        all_n = np.concatenate([self.n, n])
        all_mean = np.concatenate([self.mean, mean])
        all_m2 = np.concatenate([self.m2, m2])
        before = self.n.shape[0]
        real = before + n.shape[0]
        pad = keep - before  # batches missing before the first (none seen yet): weight 0
        if pad > 0:
            zeros = np.zeros((pad,) + self.shape)
            all_n, all_mean, all_m2 = (np.concatenate([zeros, a]) for a in (all_n, all_mean, all_m2))
            before = keep
        pooled = [np.empty(n.shape) for _ in range(3)]
        count = n.shape[0]
        step = max(1, CHUNK_ELEMENTS // max(1, self.batches * int(np.prod(self.shape, dtype=np.int64))))
        for first in range(0, count, step):
            last = min(count, first + step)
            window = slice(before + first - keep, before + last)
            parts = [np.lib.stride_tricks.sliding_window_view(a[window], self.batches, axis=0)
                     for a in (all_n, all_mean, all_m2)]
            for target, value in zip(pooled, _pool(*parts)):
                target[first:last] = value
        if self.below is not None:
            own = n >= self.below
            pooled = [np.where(own, a, p) for a, p in zip((n, mean, m2), pooled)]
        held = min(keep, real)  # the buffer: the last K - 1 batches seen (never the padding)
        self.n, self.mean, self.m2 = (np.array(a[a.shape[0] - held:]) for a in (all_n, all_mean, all_m2))
        return pooled[0], pooled[1], pooled[2]

    def state(self) -> dict[str, np.ndarray]:
        """The buffer as arrays for a stats file (``pool_count``, ``pool_mean``, ``pool_m2``)."""
        return {"pool_count": self.n.copy(), "pool_mean": self.mean.copy(), "pool_m2": self.m2.copy()}


def _pool(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine windows of batches (the last axis) with the parallel-variance formula."""
    total = n.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled_mean = np.where(total > 0, (n * mean).sum(axis=-1) / total, np.nan)
    centred = np.where(n > 0, mean - np.nan_to_num(pooled_mean)[..., None], 0.0)
    return total, pooled_mean, m2.sum(axis=-1) + (n * centred * centred).sum(axis=-1)
