"""A summary of a stats or centers file: what a person checks before trusting it."""

from __future__ import annotations

from typing import Any

import numpy as np

from .stats import BATCHNORM, Stats

LISTED = 20  # indices listed per finding (empty classes, near-constant channels, ...)
PAIRWISE_LIMIT = 4096  # closest center pairs are searched up to this many classes
RARE_SHARE = 0.1  # a class is rare below this share of the median class count

PROVENANCE = ("mode", "axes", "channel_axis", "alpha", "rule", "eps", "ddof", "batch_size", "nan_policy",
              "rows_seen", "batches_seen", "batches_skipped", "row_shape", "input_dtype", "sources",
              "normstats_version", "groups", "num_classes", "init", "weighted", "merged_from",
              "imported_from", "imported_layer", "reference")


def describe(stats: Stats) -> dict[str, Any]:
    """Summarize `stats` as plain JSON-ready data.

    Returns
    -------
    dict
        ``kind``, ``source``, ``options`` (provenance from the metadata) and
        the findings of :func:`_batchnorm` or :func:`_centers`: ranges per
        array, NaN counts, near-constant channels, class counts, center norms
        and the closest pairs of centers.
    """
    summary: dict[str, Any] = {
        "kind": stats.kind,
        "source": stats.source,
        "options": {key: stats.meta[key] for key in PROVENANCE if key in stats.meta},
        "nan_counts": {name: int(np.isnan(a).sum()) for name, a in stats.arrays.items() if a.dtype.kind == "f"},
    }
    summary.update(_batchnorm(stats) if stats.kind == BATCHNORM else _centers(stats))
    return summary


def _range(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"min": None, "median": None, "max": None}
    return {"min": float(finite.min()), "median": float(np.median(finite)), "max": float(finite.max())}


def _indices(mask: np.ndarray) -> dict[str, Any]:
    flat = np.flatnonzero(mask)
    return {"count": int(flat.size), "first": [int(i) for i in flat[:LISTED]]}


def _batchnorm(stats: Stats) -> dict[str, Any]:
    arrays, meta = stats.arrays, stats.meta
    found: dict[str, Any] = {"shape": list(next(iter(arrays.values())).shape)}
    if "mean" in arrays:
        found["mean"] = _range(arrays["mean"])
    if "inv_std" in arrays:
        inv_std = arrays["inv_std"]
        found["inv_std"] = _range(inv_std)
        with np.errstate(divide="ignore", over="ignore"):  # eps 0 or inv_std 0: inf, shown as such
            found["sqrt(var+eps)"] = _range(1.0 / inv_std)
            # inv_std near 1/sqrt(eps): a channel whose variance was (nearly) zero
            found["near_constant"] = _indices(inv_std >= 0.99 / np.sqrt(float(meta["eps"])))
    if "near_constant" in meta:
        listed = list(meta["near_constant"])  # a hand-edited file may lack the count: the list is the floor
        found["near_constant"] = {"count": meta.get("near_constant_count", len(listed)), "first": listed[:LISTED]}
    return found


def _centers(stats: Stats) -> dict[str, Any]:
    centers = np.asarray(stats.arrays["centers"], dtype=np.float64)
    counts = np.asarray(stats.arrays["counts"])
    flat = centers.reshape(len(centers), -1)
    seen = counts > 0
    median = float(np.median(counts[seen])) if seen.any() else 0.0
    found: dict[str, Any] = {
        "classes": int(len(counts)),
        "counts": {"total": int(counts.sum()), "min": int(counts.min()), "median": median,
                   "max": int(counts.max())},
        "empty_classes": _indices(~seen),
        "rare_classes": _indices(seen & (counts < RARE_SHARE * median)),
    }
    valid = np.isfinite(flat).all(axis=1)
    found["center_norms"] = _range(np.linalg.norm(flat[valid], axis=1)) if valid.any() else _range(np.array([]))
    found["closest_pairs"] = _closest_pairs(flat, valid)
    return found


def center_distances(points: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of `points` (float64), as a square matrix.

    From ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product; good to about 1e-8 of
    the norms, which is plenty to rank or show pairs of centers).
    """
    squared = (points * points).sum(axis=1)
    return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * points @ points.T, 0.0))


def _closest_pairs(flat: np.ndarray, valid: np.ndarray, pairs: int = 5) -> Any:
    """The `pairs` closest pairs of valid centers (euclidean), or a note past PAIRWISE_LIMIT."""
    index = np.flatnonzero(valid)
    if len(index) > PAIRWISE_LIMIT:
        return f"not computed for more than {PAIRWISE_LIMIT} classes"
    if len(index) < 2:
        return []
    distance = center_distances(flat[index])
    upper = np.triu_indices(len(index), k=1)
    order = np.argsort(distance[upper], kind="stable")[:pairs]
    return [{"classes": [int(index[upper[0][k]]), int(index[upper[1][k]])], "distance": float(distance[upper][k])}
            for k in order]
