"""The result of a fit: named arrays plus metadata, as stored in a stats file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import StatsFileError

BATCHNORM = "batchnorm"
CENTERS = "centers"
CENTER_RULES = ("batch-mean", "per-sample")  # how a batch's rows of a class move its center


@dataclass
class Stats:
    """Fitted statistics.

    Attributes
    ----------
    kind : {'batchnorm', 'centers'}
        Which estimator produced them.
    arrays : dict of str to ndarray
        ``mean`` / ``inv_std`` (absent when disabled) for BatchNorm,
        ``centers`` / ``counts`` for centers; exact mode adds ``var`` and
        ``count`` (BatchNorm) so that files stay mergeable.
    meta : dict
        JSON-serializable options and provenance (mode, axes, alpha, eps,
        ddof, batch size, rows and batches seen, input shape and dtype, ...).
    """

    kind: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None  # the file it was read from, for messages

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    def require(self, kind: str, source: Optional[str] = None) -> "Stats":
        """Return self if it holds `kind` statistics, else raise StatsFileError."""
        if self.kind != kind:
            name = source or self.source or "the stats file"
            raise StatsFileError(
                f"{name} holds {self.kind} statistics, not {kind}; give a file written by "
                f"{'fit-bn' if kind == BATCHNORM else 'fit-centers'}"
            )
        return self


_REQUIRED = {
    BATCHNORM: ("mode", "axes", "row_shape", "input_dtype", "rows_seen", "batches_seen", "eps", "ddof"),
    CENTERS: ("mode", "num_classes", "row_shape", "input_dtype", "rows_seen", "batches_seen"),
}
# Integer metadata the arithmetic uses, by the smallest value each may take.
_COUNTERS = ("rows_seen", "batches_seen", "batches_skipped", "ddof", "seed")
_POSITIVE = ("num_classes", "groups", "batch_size")
_COUNTS = ("count", "counts", "weight", "group_rows")  # finite and >= 0 everywhere
_VALUES = {"mean": "finite", "moment_mean": "finite", "centers": "finite", "var": ">= 0", "inv_std": "> 0"}


def check_stats(stats: Stats) -> Stats:
    """Return `stats` if its arrays and metadata fit together, else raise StatsFileError.

    A file read from disk may be damaged or hand-edited; this catches what
    would otherwise fail later with an obscure error. The values themselves
    are checked by :func:`check_values` where they are used.
    """
    name = stats.source or "the stats file"
    try:
        _check_meta(stats)
        _check_consistent(stats)
    except StatsFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
        raise StatsFileError(f"{name} has inconsistent contents ({error!r}); re-create it") from None
    return stats


def _bad(stats: Stats, what: str) -> StatsFileError:
    return StatsFileError(f"{stats.source or 'the stats file'}: {what}; re-create it")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _check_meta(stats: Stats) -> None:
    """The metadata the arithmetic reads must have the type and range it expects."""
    meta = stats.meta
    missing = [key for key in _REQUIRED.get(stats.kind, ()) if key not in meta]
    if missing:
        raise _bad(stats, f"it lacks the metadata {', '.join(missing)}")
    for key in ("row_shape", "axes"):
        if key in meta and not (isinstance(meta[key], (list, tuple)) and all(_is_int(n) for n in meta[key])):
            raise _bad(stats, f"the metadata {key} is {meta[key]!r}, not a list of integers")
    if any(n < 0 for n in meta["row_shape"]):
        raise _bad(stats, f"the metadata row_shape {meta['row_shape']!r} holds a negative size")
    for key in _COUNTERS:
        if key in meta and not (_is_int(meta[key]) and meta[key] >= 0):
            raise _bad(stats, f"the metadata {key} is {meta[key]!r}, not an integer >= 0")
    for key in _POSITIVE:
        if meta.get(key) is not None and not (_is_int(meta[key]) and meta[key] >= 1):
            raise _bad(stats, f"the metadata {key} is {meta[key]!r}, not an integer >= 1")
    if "eps" in meta and not (_is_number(meta["eps"]) and math.isfinite(meta["eps"]) and meta["eps"] > 0):
        raise _bad(stats, f"the metadata eps is {meta['eps']!r}, not a finite number > 0")
    alpha = meta.get("alpha")
    if alpha is not None and not (_is_number(alpha) and 0 < alpha <= 1):
        raise _bad(stats, f"the metadata alpha is {alpha!r}, not a number in (0, 1]")


def _check_consistent(stats: Stats) -> None:
    from .axes import check_channel_meta, kept_shape, resolve_axes

    name = stats.source or "the stats file"
    meta, arrays = stats.meta, stats.arrays
    if meta["mode"] not in ("ema", "exact"):
        raise StatsFileError(f"{name} has an unknown mode {meta['mode']!r}")
    row_shape = tuple(int(n) for n in meta["row_shape"])
    if stats.kind == BATCHNORM:
        axes = tuple(int(a) for a in meta["axes"])
        if resolve_axes(axes, len(row_shape) + 1) != axes:
            raise _bad(stats, f"the metadata axes {list(axes)} are not sorted, distinct and non-negative")
        problem = check_channel_meta(meta)
        if problem:
            raise _bad(stats, problem)
        shape = kept_shape(row_shape, axes)
        shapes = {}
        if meta.get("groups") is not None:
            shape = (int(meta["groups"]),) + shape
            shapes["group_rows"] = shape[:1]
        shapes.update(dict.fromkeys(("mean", "inv_std", "var", "count", "moment_mean"), shape))
        needed = ("count", "var") if meta["mode"] == "exact" else ()
        if not ({"mean", "inv_std"} & set(arrays)):
            raise StatsFileError(f"{name} holds neither mean nor inv_std")
    else:
        classes = int(meta["num_classes"])
        shape = (classes,) + row_shape
        shapes = dict.fromkeys(("centers", "var", "weight"), shape)
        shapes["counts"] = (classes,)
        needed = ("centers", "counts") + (("var",) if meta["mode"] == "exact" else ())
    for key in needed:
        if key not in arrays:
            raise StatsFileError(f"{name} lacks the array {key!r}; re-create it")
    for key, expected in shapes.items():
        if key in arrays and (np.shape(arrays[key]) != expected or np.asarray(arrays[key]).dtype.kind not in "fiu"):
            array = np.asarray(arrays[key])
            raise _bad(stats, f"the array {key!r} has shape {array.shape} and dtype {array.dtype}, but "
                              f"its metadata call for a numeric array of shape {expected}")


def check_values(stats: Stats) -> Stats:
    """Return `stats` if every statistic that data defined is usable, else raise StatsFileError.

    Where a statistic saw data, means and centers must be finite, variances
    finite and >= 0, inv_std finite and > 0: anything else (a hand-edited or
    damaged file, a fit that overflowed) would turn rows into NaN or infinity
    without a word. A statistic that saw no data (count 0: a class never
    seen, an empty group, a column that ``nan_policy='omit'`` emptied; for a
    variance, a count not above ddof) may hold NaN, its documented marker.
    Counts must be finite and >= 0. Call it on :func:`check_stats`-checked
    stats before applying, exporting, merging or continuing them.
    """
    name = stats.source or "the stats file"
    check_counts(stats.arrays, name)
    for key, rule in _VALUES.items():
        if key in stats.arrays:
            _check_array(stats.arrays[key], key, rule, _seen(stats, key), name)
    return stats


def check_counts(arrays: dict[str, np.ndarray], name: str) -> None:
    """Raise StatsFileError unless every count among `arrays` (``count``,
    ``counts``, ``weight``, ``group_rows``) is finite and >= 0; `name` is the
    file, for messages. A stats file's counts are checked as it is read."""
    for key in _COUNTS:
        if key in arrays:
            _check_array(arrays[key], key, ">= 0", None, name)


def _seen(stats: Stats, key: str) -> Optional[np.ndarray]:
    """Where statistic `key` saw data (a mask broadcastable to it); None: everywhere."""
    arrays = stats.arrays
    if stats.kind == CENTERS:
        seen = np.asarray(arrays["counts"]) > 0
        seen = seen.reshape(seen.shape + (1,) * len(stats.meta["row_shape"]))
        return seen & (np.asarray(arrays["weight"]) > 0) if "weight" in arrays else seen
    seen = None
    if "count" in arrays:
        # A variance needs more elements than ddof; a moving average counts only such batches.
        least = stats.meta["ddof"] if key in ("var", "inv_std") and stats.mode == "exact" else 0
        seen = np.asarray(arrays["count"]) > least
    if "group_rows" in arrays:
        rows = np.asarray(arrays["group_rows"]) > 0
        rows = rows.reshape(rows.shape + (1,) * (np.ndim(arrays[key]) - 1))
        seen = rows if seen is None else seen & rows
    return seen


def _check_array(values: np.ndarray, key: str, rule: str, seen: Optional[np.ndarray], name: str) -> None:
    array = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(array)
        if rule == ">= 0":
            ok &= array >= 0
        elif rule == "> 0":
            ok &= array > 0
    if seen is not None:
        ok |= ~np.broadcast_to(seen, array.shape)
    if ok.all():
        return
    where = tuple(int(i) for i in np.argwhere(~ok)[0])
    at = f" at index {', '.join(map(str, where))}" if array.ndim else ""
    need = "finite" if rule == "finite" else f"finite and {rule}"
    context = " where data was seen" if seen is not None else ""
    raise StatsFileError(
        f"{name}: {key} holds {array[where]}{at}; it must be {need}{context} "
        "(applying or continuing from it would give NaN or infinite numbers); re-create the file"
    )
