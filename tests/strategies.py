"""Hypothesis strategies shared by the property tests.

Everything that generates data lives here: feature arrays of rank 1-5 with
small dimensions, their dtypes and bounded finite values, reduction axes in
any valid spelling, batch sizes, splits of the rows into consecutive chunks,
and class labels.

Value ranges are bounded so that the statistics stay well conditioned and
float16 never overflows (``|x| <= 100`` for float16, ``|x| <= 1e3`` for the
other float types), except for :func:`elements` with ``wide=True``, which
spans the whole finite range of float16/float32 for robustness checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MAX_ROWS = 40
MAX_DIM = 4

FLOAT_DTYPES = ("float16", "float32", "float64")
INT_DTYPES = ("int8", "int32", "uint8")
DTYPES = FLOAT_DTYPES + INT_DTYPES
LABEL_DTYPES = ("int8", "uint8", "int32", "int64")

# |x| bounds of the generated values per dtype.
BOUNDS = {"float16": 100.0, "float32": 1e3, "float64": 1e3, "int32": 1000}


def dtypes(choices=DTYPES) -> st.SearchStrategy[np.dtype]:
    """One of the supported input dtypes."""
    return st.sampled_from([np.dtype(d) for d in choices])


def elements(dtype: np.dtype, wide: bool = False) -> st.SearchStrategy:
    """Finite, bounded element values for `dtype`.

    With ``wide=True`` float16/float32 values span the dtype's whole finite
    range (their squares still fit float64); other dtypes are unchanged.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        width = dtype.itemsize * 8
        if wide and width < 64:
            bound = float(np.finfo(dtype).max)
        else:
            bound = BOUNDS[dtype.name]
        return st.floats(-bound, bound, width=width, allow_nan=False, allow_infinity=False)
    info = np.iinfo(dtype)
    bound = BOUNDS.get(dtype.name)
    low = info.min if bound is None else max(info.min, -bound)
    high = info.max if bound is None else min(info.max, bound)
    return st.integers(int(low), int(high))


def shapes(
    min_rank: int = 1,
    max_rank: int = 5,
    min_rows: int = 1,
    max_rows: int = MAX_ROWS,
    max_dim: int = MAX_DIM,
) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes ``(rows, d1, ...)``: rows in ``[min_rows, max_rows]``, other dims 1..max_dim."""

    @st.composite
    def build(draw):
        rank = draw(st.integers(min_rank, max_rank))
        rows = draw(st.integers(min_rows, max_rows))
        rest = draw(st.lists(st.integers(1, max_dim), min_size=rank - 1, max_size=rank - 1))
        return (rows,) + tuple(rest)

    return build()


def arrays(
    dtype: Union[np.dtype, st.SearchStrategy, None] = None,
    shape: Union[tuple[int, ...], st.SearchStrategy, None] = None,
    wide: bool = False,
) -> st.SearchStrategy[np.ndarray]:
    """Arrays of the given (or any supported) dtype and shape with bounded finite values."""

    @st.composite
    def build(draw):
        dt = dtype if dtype is not None else dtypes()
        dt = draw(dt) if isinstance(dt, st.SearchStrategy) else np.dtype(dt)
        shp = shape if shape is not None else shapes()
        shp = draw(shp) if isinstance(shp, st.SearchStrategy) else tuple(shp)
        return draw(hnp.arrays(dt, shp, elements=elements(dt, wide=wide)))

    return build()


def axes_for(ndim: int, allow_auto: bool = True) -> st.SearchStrategy:
    """A valid reduction-axes spec for rank `ndim`.

    Always contains axis 0 (in some spelling); each axis may be given in its
    negative form and the tuple is in any order. With `allow_auto`, may be
    the string ``'auto'``.
    """

    @st.composite
    def build(draw):
        others = draw(st.lists(st.integers(1, ndim - 1), unique=True)) if ndim > 1 else []
        chosen = [0] + others
        spelled = [a - ndim if draw(st.booleans()) else a for a in chosen]
        return tuple(draw(st.permutations(spelled)))

    spec = build()
    return st.one_of(st.just("auto"), spec) if allow_auto else spec


def resolved(axes, ndim: int) -> tuple[int, ...]:
    """The sorted non-negative form of an axes spec (reference for the tests)."""
    if axes == "auto":
        return (0,) + tuple(range(2, ndim))
    return tuple(sorted(a % ndim for a in axes))


@dataclass
class Batch:
    """An input array together with a reduction-axes spec valid for it."""

    x: np.ndarray
    axes: Union[str, tuple[int, ...]]

    @property
    def axes_resolved(self) -> tuple[int, ...]:
        return resolved(self.axes, self.x.ndim)


def batches(
    dtype=None, shape=None, allow_auto: bool = True, wide: bool = False
) -> st.SearchStrategy[Batch]:
    """An array (any rank 1-5, any supported dtype) with valid axes for it."""

    @st.composite
    def build(draw):
        x = draw(arrays(dtype=dtype, shape=shape, wide=wide))
        axes = draw(axes_for(x.ndim, allow_auto=allow_auto))
        return Batch(x, axes)

    return build()


def batch_sizes(max_size: int = 16) -> st.SearchStrategy[int]:
    """Logical batch sizes (rows per EMA step)."""
    return st.integers(1, max_size)


def alphas() -> st.SearchStrategy[float]:
    """EMA weights in (0, 1], including the edge 1 and the defaults."""
    return st.one_of(st.sampled_from([0.01, 0.1, 0.5, 0.9, 1.0]), st.floats(1e-3, 1.0))


def epsilons() -> st.SearchStrategy[float]:
    """Positive eps values over many orders of magnitude."""
    return st.one_of(st.just(1e-5), st.floats(1e-12, 10.0))


def splits(
    rows: int, max_cuts: int = 4, allow_empty: bool = True
) -> st.SearchStrategy[list[int]]:
    """Cut points splitting ``rows`` rows into consecutive chunks (for ``np.split``).

    Sorted integers in ``[0, rows]``; with `allow_empty`, repeated cuts or
    cuts at the ends give empty chunks, otherwise every chunk holds a row.
    """
    if allow_empty:
        points = st.lists(st.integers(0, rows), max_size=max_cuts)
    elif rows <= 1:
        return st.just([])
    else:
        points = st.lists(st.integers(1, rows - 1), max_size=max_cuts, unique=True)
    return points.map(sorted)


def batch_splits(
    rows: int, batch_size: int, max_cuts: int = 4, allow_empty: bool = True
) -> st.SearchStrategy[list[int]]:
    """Cut points at multiples of `batch_size`: every chunk but the last holds
    whole batches; the last chunk holds the rest (any number of rows)."""
    if allow_empty:
        multiples = st.lists(st.integers(0, rows // batch_size), max_size=max_cuts)
    else:
        top = (rows - 1) // batch_size  # a cut at top * batch_size leaves a row after it
        if top < 1:
            return st.just([])
        multiples = st.lists(st.integers(1, top), max_size=max_cuts, unique=True)
    return multiples.map(lambda ms: sorted(m * batch_size for m in ms))


def chunks(x: np.ndarray, cuts: list[int], labels: Optional[np.ndarray] = None):
    """Split `x` (and `labels`) at `cuts` along axis 0."""
    parts = np.split(x, cuts)
    if labels is None:
        return parts
    return list(zip(parts, np.split(labels, cuts)))


def num_classes(max_classes: int = 6) -> st.SearchStrategy[int]:
    """Numbers of classes K."""
    return st.integers(1, max_classes)


def labels(rows: int, k: int) -> st.SearchStrategy[np.ndarray]:
    """One integer label in ``[0, k)`` per row, in one of several integer dtypes."""

    @st.composite
    def build(draw):
        dtype = np.dtype(draw(st.sampled_from(LABEL_DTYPES)))
        return draw(hnp.arrays(dtype, (rows,), elements=st.integers(0, k - 1)))

    return build()


@dataclass
class Labelled:
    """Features, their labels and the number of classes."""

    x: np.ndarray
    labels: np.ndarray
    k: int


def labelled(
    dtype=None, min_rank: int = 1, max_rank: int = 4, min_rows: int = 1
) -> st.SearchStrategy[Labelled]:
    """Features of rank `min_rank`..`max_rank` with labels for K classes."""

    @st.composite
    def build(draw):
        x = draw(arrays(dtype=dtype, shape=shapes(min_rank, max_rank, min_rows=min_rows)))
        k = draw(num_classes())
        return Labelled(x, draw(labels(x.shape[0], k)), k)

    return build()
