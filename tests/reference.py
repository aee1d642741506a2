"""Naive reference implementations of the normstats contract.

Written from the formulas in ``DESIGN.md`` ("Semantics (the contract)"), not
from the library code. Everything is computed in float64 with a plain Python
loop over logical batches and ``np.mean`` / ``np.var`` over the reduced axes,
so that slowness buys obviousness.

Functions
---------
ref_axes
    ``'auto'`` or a tuple of axes resolved against an input rank.
ref_bn_ema, ref_bn_exact
    BatchNorm running (EMA) and exact population statistics.
ref_centers_ema, ref_centers_ema_first, ref_centers_exact
    Per-class centers: EMA from given initial centers, EMA with
    ``init='first'``, and exact class means.
ref_apply
    Inference-mode normalization.
ref_distances, ref_nearest
    Distances of rows to every usable center, and the k nearest (ties: lowest
    class).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest


def ref_axes(axes, ndim):
    """Sorted non-negative reduction axes for an input of rank `ndim`."""
    if isinstance(axes, str):
        assert axes == "auto"
        return (0,) + tuple(range(2, ndim))
    return tuple(sorted(int(a) % ndim for a in axes))


def _kept_shape(shape, axes):
    return tuple(size for axis, size in enumerate(shape) if axis not in axes)


def _initial(value, shape):
    if value is None:
        return None
    return np.broadcast_to(np.asarray(value, dtype=np.float64), shape).copy()


def ref_bn_ema(x, batch_size, axes="auto", alpha=0.01, eps=1e-5, ddof=1, mean=0.0, inv_std=1.0):
    """BatchNorm running statistics, one logical batch at a time.

    Returns
    -------
    mean, inv_std : ndarray or None
        Of the kept axes' shape; None where disabled.
    batches : int
        Logical batches seen (skipped ones included).
    skipped : int
        Batches with ``n <= ddof`` elements per statistic.
    """
    x = np.asarray(x).astype(np.float64)
    axes = ref_axes(axes, x.ndim)
    shape = _kept_shape(x.shape, axes)
    mean = _initial(mean, shape)
    inv_std = _initial(inv_std, shape)
    batches = skipped = 0
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size]
        batches += 1
        n = int(np.prod([batch.shape[a] for a in axes]))
        if n <= ddof:
            skipped += 1
            continue
        batch_mean = np.mean(batch, axis=axes)
        batch_inv_std = 1.0 / np.sqrt(np.var(batch, axis=axes, ddof=ddof) + eps)
        if mean is not None:
            mean = (1 - alpha) * mean + alpha * batch_mean
        if inv_std is not None:
            inv_std = (1 - alpha) * inv_std + alpha * batch_inv_std
    return mean, inv_std, batches, skipped


def ref_bn_exact(x, axes="auto", eps=1e-5, ddof=1):
    """Population mean, var (with `ddof`) and ``1/sqrt(var + eps)`` over all of `x`."""
    x = np.asarray(x).astype(np.float64)
    axes = ref_axes(axes, x.ndim)
    mean = np.mean(x, axis=axes)
    var = np.var(x, axis=axes, ddof=ddof)
    return mean, var, 1.0 / np.sqrt(var + eps)


def _batches_with_labels(x, labels, batch_size):
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size], labels[start : start + batch_size]


def ref_centers_ema(x, labels, K, batch_size, alpha=0.9, init_centers=None):
    """EMA class centers from `init_centers` (default zeros).

    For each batch and each class ``j`` present in it,
    ``C[j] <- alpha * C_batch[j] + (1 - alpha) * C[j]``.

    Returns
    -------
    centers : ndarray, shape ``(K,) + row_shape``
    counts : ndarray of int
    """
    x = np.asarray(x).astype(np.float64)
    labels = np.asarray(labels)
    row_shape = x.shape[1:]
    if init_centers is None:
        centers = np.zeros((K,) + row_shape)
    else:
        centers = np.asarray(init_centers, dtype=np.float64).reshape((K,) + row_shape).copy()
    for batch, batch_labels in _batches_with_labels(x, labels, batch_size):
        for j in np.unique(batch_labels):
            batch_center = np.mean(batch[batch_labels == j], axis=0)
            centers[j] = alpha * batch_center + (1 - alpha) * centers[j]
    return centers, np.bincount(labels, minlength=K)


def ref_centers_ema_first(x, labels, K, batch_size, alpha=0.9):
    """EMA class centers with ``init='first'``: a class's first batch mean
    becomes its center; classes never seen hold NaN."""
    x = np.asarray(x).astype(np.float64)
    labels = np.asarray(labels)
    centers = np.full((K,) + x.shape[1:], np.nan)
    seen = np.zeros(K, dtype=bool)
    for batch, batch_labels in _batches_with_labels(x, labels, batch_size):
        for j in np.unique(batch_labels):
            batch_center = np.mean(batch[batch_labels == j], axis=0)
            if seen[j]:
                centers[j] = alpha * batch_center + (1 - alpha) * centers[j]
            else:
                centers[j] = batch_center
                seen[j] = True
    return centers, np.bincount(labels, minlength=K)


def ref_centers_exact(x, labels, K):
    """Exact class means, counts and per-feature variances (ddof 0).

    Classes never seen have count 0 and NaN center and variance.
    """
    x = np.asarray(x).astype(np.float64)
    labels = np.asarray(labels)
    centers = np.full((K,) + x.shape[1:], np.nan)
    var = np.full((K,) + x.shape[1:], np.nan)
    counts = np.zeros(K, dtype=np.int64)
    for j in range(K):
        rows = x[labels == j]
        counts[j] = rows.shape[0]
        if rows.shape[0]:
            centers[j] = np.mean(rows, axis=0)
            var[j] = np.var(rows, axis=0, ddof=0)
    return centers, counts, var


def _expand(value, axes):
    """`value` (scalar or of the kept shape) with size-1 axes inserted at `axes`."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 0:
        return value
    return np.expand_dims(value, axes)


def ref_apply(x, mean, inv_std, axes="auto", gamma=1.0, beta=0.0):
    """``y = (x - mean) * (gamma * inv_std) + beta`` in float64.

    A None `mean` / `inv_std` / `gamma` / `beta` drops its term.
    """
    x = np.asarray(x).astype(np.float64)
    axes = ref_axes(axes, x.ndim)
    y = x.copy()
    if mean is not None:
        y = y - _expand(mean, axes)
    scale = np.float64(1.0)
    if gamma is not None:
        scale = scale * _expand(gamma, axes)
    if inv_std is not None:
        scale = scale * _expand(inv_std, axes)
    y = y * scale
    if beta is not None:
        y = y + _expand(beta, axes)
    return y


def ref_distances(x, centers, counts, metric="euclidean"):
    """Distances of every row of `x` to every usable center, all pairs at once.

    Usable: count > 0 and a finite center. ``euclidean``: sqrt of the summed
    squared differences; ``cosine``: ``1 - x.c / (|x| |c|)``, 1 where either
    vector is zero.

    Returns
    -------
    classes : ndarray of int
        The usable classes.
    distances : ndarray, shape (rows, len(classes))
    """
    x = np.asarray(x).astype(np.float64).reshape(len(x), -1)
    centers = np.asarray(centers, dtype=np.float64).reshape(len(centers), -1)
    classes = np.flatnonzero((np.asarray(counts) > 0) & np.isfinite(centers).all(axis=1))
    c = centers[classes]
    if metric == "euclidean":
        return classes, np.sqrt(((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2))
    x_norm = np.sqrt((x * x).sum(axis=1))
    c_norm = np.sqrt((c * c).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (x @ c.T) / x_norm[:, None] / c_norm[None, :]
    distance = 1.0 - cos
    distance[x_norm == 0, :] = 1.0
    distance[:, c_norm == 0] = 1.0
    return classes, distance


def ref_nearest(x, centers, counts, k=1, metric="euclidean"):
    """The `k` nearest usable centers of each row, nearest first, ties to the
    lowest class: labels and distances of shape (rows, k)."""
    classes, distance = ref_distances(x, centers, counts, metric)
    labels = np.empty((len(distance), k), dtype=np.int64)
    nearest = np.empty((len(distance), k))
    for row, values in enumerate(distance):
        order = sorted(range(len(classes)), key=lambda j: (values[j], classes[j]))[:k]
        labels[row] = classes[order]
        nearest[row] = values[order]
    return labels, nearest


# Input shapes and axes the tests sweep: ranks 1-5, auto and custom (also negative) axes.
N = 10

SHAPES = [
    pytest.param((N,), "auto", id="1d-auto"),
    pytest.param((N, 3), "auto", id="2d-auto"),
    pytest.param((N, 3, 4), "auto", id="3d-auto"),
    pytest.param((N, 2, 3, 2), "auto", id="4d-auto"),
    pytest.param((N, 2, 2, 3, 2), "auto", id="5d-auto"),
    pytest.param((N, 3), (0, -1), id="2d-axes0,-1"),
    pytest.param((N, 3, 4), (0,), id="3d-axes0"),
    pytest.param((N, 2, 3, 2), (0, 1, 3), id="4d-axes0,1,3"),
    pytest.param((N, 2, 3, 2), (0, -1), id="4d-axes0,-1"),
    pytest.param((N, 2, 2, 3, 2), (-5, 2, -1), id="5d-axes-5,2,-1"),
]


# Small files for the tests that read through normstats' readers.

def write_npy(tmp_path, x, name="x.npy"):
    path = tmp_path / name
    np.save(path, x)
    return str(path)


def write_h5(tmp_path, x, name="x.h5", dataset="features"):
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        f.create_dataset(dataset, data=x)
    return f"{path}:{dataset}"


def make_data(shape, dtype="float64", seed=0):
    """Random data of `shape` and `dtype` with a non-zero mean."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(0.5, 2.0, size=shape).astype(dtype)
    if dtype.kind == "u":
        return rng.integers(0, 200, size=shape).astype(dtype)
    return rng.integers(-60, 90, size=shape).astype(dtype)
