"""Inference-mode normalization with fitted BatchNorm statistics."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from .axes import broadcastable, kept_shape
from .errors import DataError, RowError, UsageError
from .stats import BATCHNORM, Stats, check_values
from .validate import check_finite, check_groups, check_numeric_dtype
from .workspace import Workspace

Affine = Union[float, np.ndarray, None]
OUTPUT_DTYPES = ("float16", "float32", "float64")
FUSED_ROW_ELEMENTS = 1 << 22  # rows up to this size take the compiled pass (its terms: one row each)
# What the compiled pass uses for a term not fitted: ``(v - 0) * 1 + -0.0`` is `v`, bit for bit
# (``v + 0.0`` would turn -0 into +0)
FUSED_IDENTITY = {"mean": 0.0, "scale": 1.0, "beta": -0.0}


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
    `beta` of ``None`` drops its term. The arithmetic runs in float32 for a
    float16/float32 output and in float64 for a float64 one.

    Finite input never becomes NaN or infinity silently: a block whose result
    does not fit the output dtype (float16 holds at most 65504), or meets a
    statistic that the fit left undefined (NaN where it saw no data), raises
    RowError naming the row and the remedy. NaN and infinite input values
    stay NaN and infinite in the output, as they would in the formula.

    Parameters
    ----------
    stats : Stats
        BatchNorm statistics (either mode); their values are checked with
        :func:`normstats.stats.check_values`.
    gamma, beta : float, ndarray or None
        Scale and shift, finite; arrays must broadcast to the statistics' shape.
    dtype : {'float16', 'float32', 'float64'}, optional
        Output dtype; default :func:`output_dtype` of the input's.

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

    def __init__(self, stats: Stats, *, gamma: Affine = 1.0, beta: Affine = 0.0,
                 dtype: Optional[str] = None) -> None:
        check_values(stats.require(BATCHNORM))
        self.dtype = None if dtype is None else _output_dtype(dtype)
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
            with np.errstate(over="ignore"):  # an overflow is reported where it meets a row
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
        self._cast: dict[object, dict[str, Optional[np.ndarray]]] = {}
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

    def result_dtype(self, input_dtype: np.dtype) -> np.dtype:
        """The dtype of the rows this normalizer makes from rows of `input_dtype`."""
        return self.dtype if self.dtype is not None else output_dtype(input_dtype)

    def __call__(self, x: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalize `x`; the result has the shape of `x` and :meth:`result_dtype`.

        With per-group statistics, `groups` gives each row's group. The
        returned array may be a reused buffer, valid until the next call.

        Raises
        ------
        RowError
            A finite input value gave NaN or infinity (counted from the
            first row of `x`).
        """
        x = np.asarray(x)
        self.check(x.shape[1:], x.dtype)
        target = self.result_dtype(x.dtype)
        compute = np.promote_types(target, np.float32)  # float16 is computed in float32
        fused = self._fused(x, compute) if groups is None else None
        y, finite = fused if fused is not None else (self._normalize(x, groups, compute, "y"), False)
        out = self._in_dtype(y, target)
        # One cheap pass over the block (max and min run at memory speed and
        # propagate NaN); only a block that fails it is searched value by value.
        limit = np.finfo(target).max
        if y.size and not (finite and target == compute) and not (y.max() <= limit and y.min() >= -limit):
            self._check_finite(x, groups, out)
        return out

    def _in_dtype(self, y: np.ndarray, target: np.dtype) -> np.ndarray:
        """`y` in the output dtype `target` (a reused scratch array unless it is one)."""
        if y.dtype == target:
            return y
        out = self._workspace.array("out", y.shape, target)
        with np.errstate(over="ignore"):
            np.copyto(out, y, casting="unsafe")
        return out

    def _fused(self, x: np.ndarray, compute: np.dtype) -> Optional[tuple[np.ndarray, bool]]:
        """The formula as :meth:`_normalize` computes it (the same roundings), in one
        compiled pass over a C-contiguous block of native float32/64 or integers
        (not float16), with whether every output is finite; None where it does not apply."""
        if (self.num_groups is not None or not x.flags.c_contiguous or x.dtype.kind not in "fiu"
                or x.dtype == np.float16 or not x.dtype.isnative or x.ndim < 1):
            return None
        terms = self._cast.get(("rows", compute))
        if terms is None:
            if int(np.prod(self.row_shape)) > FUSED_ROW_ELEMENTS:
                return None
            with np.errstate(over="ignore"):  # terms beyond float32: reported where they meet a row
                # copies (np.array), never a read-only broadcast view, and a term not fitted as
                # the identity of its operation (the same bits as leaving it out), never None:
                # either would be one more variant of the kernel for numba to compile
                terms = {k: np.array(np.broadcast_to(FUSED_IDENTITY[k] if v is None else v[0], self.row_shape)
                                     .reshape(-1), dtype=compute)
                         for k, v in self._terms.items()}
            self._cast[("rows", compute)] = terms
        from .kernels import compiled_kernels, read_only

        rows = read_only(x.reshape(x.shape[0], -1))  # (read-only or writable input: one variant)
        y = self._workspace.array("y", x.shape, compute)
        seen = np.zeros(rows.shape[1], compute)
        args = (rows, terms["mean"], terms["scale"], terms["beta"], y.reshape(rows.shape), seen)
        compiled_kernels()._normalize_rows(*args)  # its first call loads it, signals held
        return y, bool(np.isfinite(seen).all())

    def _normalize(self, x: np.ndarray, groups: Optional[np.ndarray], compute: np.dtype,
                   name: str) -> np.ndarray:
        """The formula in `compute` precision, into the scratch array `name`."""
        terms = self._terms_in(compute)
        if self.num_groups is not None:
            terms = self._per_row(terms, groups, x.shape[0])
        return self._formula(x, terms, compute, name)

    def _terms_in(self, compute: np.dtype) -> dict[str, Optional[np.ndarray]]:
        """The terms in `compute` precision, broadcastable over a batch (kept)."""
        terms = self._cast.get(compute)
        if terms is None:
            with np.errstate(over="ignore"):  # terms beyond float32: reported where they meet a row
                terms = {k: None if v is None else v.astype(compute) for k, v in self._terms.items()}
            self._cast[compute] = terms
        return terms

    def _formula(self, x: np.ndarray, terms: dict, compute: np.dtype, name: str) -> np.ndarray:
        """``(x - mean) * scale + beta`` with the terms given, into the scratch array `name`."""
        y = self._workspace.array(name, x.shape, compute)
        with np.errstate(over="ignore", invalid="ignore"):
            if terms["mean"] is not None:
                np.subtract(x, terms["mean"], out=y, casting="unsafe")
            else:
                np.copyto(y, x, casting="unsafe")
            if terms["scale"] is not None:
                np.multiply(y, terms["scale"], out=y)
            if terms["beta"] is not None:
                np.add(y, terms["beta"], out=y)
        return y

    def _check_finite(self, x: np.ndarray, groups: Optional[np.ndarray], out: np.ndarray) -> None:
        """Raise RowError at the first non-finite output of a finite input value."""
        made = ~np.isfinite(out)
        if x.dtype.kind == "f":
            made &= np.isfinite(x)
        if not made.any():
            return  # NaN / Inf in, NaN / Inf out
        row, *index = (int(i) for i in np.argwhere(made)[0])
        one = None if groups is None else np.asarray(groups)[row:row + 1]
        exact = self._normalize(x[row:row + 1], one, np.dtype(np.float64), "row")[(0, *index)]
        raise RowError(row, self._problem(index, x[(row, *index)], exact, out.dtype, one))

    def _problem(self, index: list, value: object, exact: float, target: np.dtype,
                 one: Optional[np.ndarray]) -> str:
        """Why the finite input `value` at row element `index` (of group ``one[0]``) gave
        a non-finite `target` output, `exact` being its float64 result, and the remedy."""
        column = f"column {', '.join(map(str, index))}" if index else "its value"
        if np.isfinite(exact) and abs(exact) > np.finfo(target).max:
            wider = "float32" if target == np.float16 else "float64"
            problem = (f"{column} normalizes to {exact:.6g}, beyond the largest {target} "
                       f"({np.finfo(target).max:.6g}); write a wider output with --dtype {wider}")
        elif np.isfinite(exact):
            problem = (f"{column} normalizes to {exact:.6g}, but the statistics overflow the "
                       f"{np.promote_types(target, np.float32)} arithmetic of a {target} output; "
                       "compute in float64 with --dtype float64")
        elif self._undefined_at(index, one):
            problem = (f"{column} meets a statistic that the fit left undefined (NaN: it saw no data "
                       "there); fit statistics on data that has values there")
        else:
            problem = (f"{column} ({value}) normalizes beyond the float64 range; the "
                       "statistics (mean, inv_std, gamma, beta) do not fit this data")
        return problem

    def _undefined_at(self, index: list, groups: Optional[np.ndarray]) -> bool:
        """Whether a statistic term is NaN at element `index` of a row (of group `groups[0]`)."""
        for name, term in self._terms.items():
            if term is None:
                continue
            if self.num_groups is not None and name != "beta":
                term = term[int(groups[0])][None]
            if np.isnan(np.broadcast_to(term, (1, *self.row_shape))[(0, *index)]):
                return True
        return False

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

def _output_dtype(dtype: object) -> np.dtype:
    try:
        chosen = np.dtype(dtype)
    except TypeError:
        chosen = None
    if str(chosen) not in OUTPUT_DTYPES:
        raise UsageError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype}")
    return chosen


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
    UsageError
        `value` holds NaN or infinity.
    DataError
        `value` does not broadcast to `shape`.
    """
    array = check_finite(np.asarray(value, dtype=np.float64), name)
    try:
        return np.array(np.broadcast_to(array, shape))
    except ValueError:
        raise DataError(
            f"{name} of shape {array.shape} does not fit statistics of shape {shape}"
        ) from None
