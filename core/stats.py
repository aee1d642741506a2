"""The result of a fit: named arrays plus metadata, as stored in a stats file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import StatsFileError

BATCHNORM = "batchnorm"
CENTERS = "centers"


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


def check_stats(stats: Stats) -> Stats:
    """Return `stats` if its arrays and metadata fit together, else raise StatsFileError.

    A file read from disk may be damaged or hand-edited; this catches what
    would otherwise fail later with an obscure error.
    """
    name = stats.source or "the stats file"
    try:
        _check_consistent(stats)
    except StatsFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise StatsFileError(f"{name} has inconsistent contents ({error!r}); re-create it") from None
    return stats


def _check_consistent(stats: Stats) -> None:
    from .axes import kept_shape, resolve_axes

    name = stats.source or "the stats file"
    meta, arrays = stats.meta, stats.arrays
    missing = [key for key in _REQUIRED[stats.kind] if key not in meta]
    if missing:
        raise StatsFileError(f"{name} lacks the metadata {', '.join(missing)}; re-create it")
    if meta["mode"] not in ("ema", "exact"):
        raise StatsFileError(f"{name} has an unknown mode {meta['mode']!r}")
    row_shape = tuple(int(n) for n in meta["row_shape"])
    if stats.kind == BATCHNORM:
        axes = tuple(int(a) for a in meta["axes"])
        if resolve_axes(axes, len(row_shape) + 1) != axes:
            raise ValueError(f"axes {axes} are not normalized")
        shape = kept_shape(row_shape, axes)
        if meta.get("groups") is not None:
            shape = (int(meta["groups"]),) + shape
        names = ("mean", "inv_std", "var", "count", "moment_mean")
        needed = ("count", "var") if meta["mode"] == "exact" else ()
        if not ({"mean", "inv_std"} & set(arrays)):
            raise StatsFileError(f"{name} holds neither mean nor inv_std")
    else:
        classes = int(meta["num_classes"])
        shape = (classes,) + row_shape
        names = ("centers", "var", "weight")
        needed = ("centers", "counts") + (("var",) if meta["mode"] == "exact" else ())
        if np.shape(arrays.get("counts")) != (classes,):
            raise ValueError(f"counts of shape {np.shape(arrays.get('counts'))} for {classes} classes")
    for key in needed:
        if key not in arrays:
            raise StatsFileError(f"{name} lacks the array {key!r}; re-create it")
    for key in names:
        if key in arrays and (arrays[key].shape != shape or arrays[key].dtype.kind not in "fiu"):
            raise ValueError(f"{key} has shape {arrays[key].shape} and dtype {arrays[key].dtype}, "
                             f"expected {shape}")
