"""Inference-mode normalization with fitted BatchNorm statistics."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from .axes import broadcastable, kept_shape
from .errors import DataError, UsageError
from .stats import BATCHNORM, Stats
from .validate import check_groups, check_numeric_dtype
from .workspace import Workspace

Affine = Union[float, np.ndarray, None]


def output_dtype(input_dtype: np.dtype) -> np.dtype:
    """Floating input keeps its dtype; integers become float32 (up to 16 bits)
    or float64 (wider, which float32 would round)."""
    input_dtype = np.dtype(input_dtype)
    if input_dtype.kind == "f":
        return input_dtype
    return np.dtype(np.float32 if input_dtype.itemsize <= 2 else np.float64)


class Normalizer:
    """``y = (x - mean) * (gamma * inv_std) + beta`` over rows of fitted shape.

    A statistic absent from `stats` (disabled at fit time) or a `gamma` /
    `beta` of ``None`` drops its term. The arithmetic runs in float32 for
    float16/float32 input and in float64 otherwise.

    Parameters
    ----------
    stats : Stats
        BatchNorm statistics (either mode).
    gamma, beta : float, ndarray or None
        Scale and shift; arrays must broadcast to the statistics' shape.

    Examples
    --------
    >>> import numpy as np
    >>> from normstats.stats import Stats
    >>> stats = Stats("batchnorm", {"mean": np.array([1.0]), "inv_std": np.array([0.5])},
    ...               {"mode": "exact", "axes": [0], "row_shape": [1]})
    >>> Normalizer(stats, beta=1.0)(np.array([[3.0], [5.0]]))
    array([[2.],
           [3.]])
    """

    def __init__(self, stats: Stats, *, gamma: Affine = 1.0, beta: Affine = 0.0) -> None:
        stats.require(BATCHNORM)
        self.axes = tuple(stats.meta["axes"])
        self.row_shape = tuple(stats.meta["row_shape"])
        self.ndim = len(self.row_shape) + 1
        self.num_groups = stats.meta.get("groups")
        shape = kept_shape(self.row_shape, self.axes)
        mean = stats.arrays.get("mean")
        inv_std = stats.arrays.get("inv_std")
        gamma = _affine(gamma, shape, "gamma", neutral=1.0)
        beta = _affine(beta, shape, "beta", neutral=0.0)
        if inv_std is not None and gamma is not None:
            scale = gamma * inv_std
        else:
            scale = inv_std if inv_std is not None else gamma
        grouped = self.num_groups is not None
        self._terms = {
            name: None if value is None else self._broadcastable(np.asarray(value, np.float64), grouped)
            for name, value in (("mean", mean), ("scale", scale))
        }
        self._terms["beta"] = None if beta is None else self._broadcastable(beta, False)
        self._group_rows = stats.arrays.get("group_rows")
        self._cast: dict[np.dtype, dict[str, Optional[np.ndarray]]] = {}
        self._workspace = Workspace()

    def _broadcastable(self, value: np.ndarray, grouped: bool) -> np.ndarray:
        """`value` shaped to broadcast over a batch; per-group terms keep their
        leading group axis, to be indexed by each row's group."""
        if not grouped:
            return broadcastable(value, self.axes, self.row_shape)
        return np.stack([broadcastable(v, self.axes, self.row_shape)[0] for v in value])

    def check(self, row_shape: tuple[int, ...], dtype: np.dtype, name: str = "input") -> None:
        """Raise DataError unless rows of `row_shape` and `dtype` can be normalized."""
        check_numeric_dtype(dtype, name)
        if tuple(row_shape) != self.row_shape:
            raise DataError(
                f"{name} has rows of shape {tuple(row_shape)}, but the statistics were fitted on "
                f"rows of shape {self.row_shape}"
            )

    def __call__(self, x: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalize `x`; the result has the shape of `x` and :func:`output_dtype`.

        With per-group statistics, `groups` gives each row's group. The
        returned array may be a reused buffer, valid until the next call.
        """
        x = np.asarray(x)
        self.check(x.shape[1:], x.dtype)
        target = output_dtype(x.dtype)
        compute = np.promote_types(target, np.float32)  # float16 is computed in float32
        terms = self._cast.get(compute)
        if terms is None:
            terms = {k: None if v is None else v.astype(compute) for k, v in self._terms.items()}
            self._cast[compute] = terms
        if self.num_groups is not None:
            terms = self._per_row(terms, groups, x.shape[0])
        y = self._workspace.array("y", x.shape, compute)
        if terms["mean"] is not None:
            np.subtract(x, terms["mean"], out=y, casting="unsafe")
        else:
            np.copyto(y, x, casting="unsafe")
        if terms["scale"] is not None:
            np.multiply(y, terms["scale"], out=y)
        if terms["beta"] is not None:
            np.add(y, terms["beta"], out=y)
        if target == compute:
            return y
        out = self._workspace.array("out", x.shape, target)
        np.copyto(out, y, casting="unsafe")
        return out

    def _per_row(self, terms: dict, groups: Optional[np.ndarray], rows: int) -> dict:
        """Select each row's group statistics."""
        if groups is None:
            raise UsageError(
                f"the statistics are per group ({self.num_groups} groups); give each row's group "
                "(--groups)"
            )
        groups = check_groups(groups, rows, self.num_groups, 0, "group")
        if self._group_rows is not None:
            empty = np.flatnonzero(self._group_rows[groups] == 0)
            if empty.size:
                raise DataError(
                    f"group {groups[empty[0]]} (block row {empty[0]}) had no rows when the "
                    "statistics were fitted; it has no statistics to apply"
                )
        return {k: v if v is None or k == "beta" else v[groups] for k, v in terms.items()}

def _affine(value: Affine, shape: tuple[int, ...], name: str, *, neutral: float) -> Optional[np.ndarray]:
    """`value` as float64 of the statistics' shape; None when absent or neutral."""
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0 and float(array) == neutral:
        return None
    return affine_array(array, shape, name)


def affine_array(value: Union[float, np.ndarray], shape: tuple[int, ...], name: str) -> np.ndarray:
    """A scale or shift `value` (number or array) broadcast to `shape`, as float64.

    Raises
    ------
    DataError
        `value` does not broadcast to `shape`.
    """
    array = np.asarray(value, dtype=np.float64)
    try:
        return np.array(np.broadcast_to(array, shape))
    except ValueError:
        raise DataError(
            f"{name} of shape {array.shape} does not fit statistics of shape {shape}"
        ) from None
