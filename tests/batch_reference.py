"""Plain-NumPy references of the BatchNorm layer's batch rules (pooled batch
statistics, variable batches, batch-statistics output), written from the
layer's rule batch by batch, not from the library code."""

from __future__ import annotations

import numpy as np


def per_stat(batch: np.ndarray) -> np.ndarray:
    """A batch's elements per statistic ('auto' axes: every axis but the second), (C, n)."""
    x = np.asarray(batch, dtype=np.float64)
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def ref_pooled_ema(batches, *, alpha, eps=1e-5, ddof=1, pool=None, below=None, mean0=0.0, inv_std0=1.0):
    """The layer's rule, batch by batch: the pooled statistics are the mean and the
    variance of the union of the last `pool` batches' elements (this one included);
    with `below`, only for a statistic whose own batch has fewer than `below` elements."""
    kept = []
    mean = inv_std = None
    for batch in batches:
        own = per_stat(batch)
        kept = (kept + [own])[-(pool or 1):]
        union = np.concatenate(kept, axis=1)
        own_mean, own_var = own.mean(axis=1), own.var(axis=1, ddof=ddof)
        pooled_mean, pooled_var = union.mean(axis=1), union.var(axis=1, ddof=ddof)
        if below is not None and own.shape[1] >= below:
            batch_mean, batch_var = own_mean, own_var
        else:
            batch_mean, batch_var = pooled_mean, pooled_var
        if mean is None:
            mean, inv_std = np.full(own.shape[0], mean0), np.full(own.shape[0], inv_std0)
        mean = (1 - alpha) * mean + alpha * batch_mean
        inv_std = (1 - alpha) * inv_std + alpha / np.sqrt(batch_var + eps)
    return mean, inv_std


def fixed_batches(x: np.ndarray, size: int) -> list:
    return [x[i:i + size] for i in range(0, len(x), size)]


def data(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3 + 1
    if np.dtype(dtype).kind in "iu":
        return np.round(x * 20).astype(dtype)
    return x.astype(dtype)


def close(a, b) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def ref_batch_stats_apply(x, batch_size, *, eps=1e-5, ddof=1, gamma=1.0, beta=0.0, pool=None, below=None,
                          use_mean=True, use_inv_std=True):
    """Training-mode output ('auto' axes), batch by batch: each batch of `batch_size` rows
    normalized with its own mean and variance, or (with `pool`) those of the union of
    the last `pool` batches' elements where its own count is below `below`."""
    x64 = np.asarray(x, dtype=np.float64)
    channels = x64.shape[1]
    shape = (1, channels) + (1,) * (x64.ndim - 2)
    gamma = np.broadcast_to(np.asarray(gamma, np.float64), (channels,)).reshape(shape)
    beta = np.broadcast_to(np.asarray(beta, np.float64), (channels,)).reshape(shape)
    out, kept = [], []
    for batch in fixed_batches(x64, batch_size):
        own = per_stat(batch)
        kept = (kept + [own])[-(pool or 1):]
        use = own if below is not None and own.shape[1] >= below else np.concatenate(kept, axis=1)
        mean = use.mean(axis=1).reshape(shape) if use_mean else 0.0
        scale = 1 / np.sqrt(use.var(axis=1, ddof=ddof) + eps).reshape(shape) if use_inv_std else 1.0
        out.append((batch - mean) * (gamma * scale) + beta)
    return np.concatenate(out)
