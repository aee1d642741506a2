"""A row larger than a read block, taken in pieces (issue 11, item 4): the first part.

:func:`piece_ranges` cuts a row into element ranges of at most a block's bytes
that each readers can fetch as one hyperslab (a range along one row axis at
fixed indices of the axes before it, whole along the axes after it), and
:func:`accumulate_row` adds the pieces of one row to grouped shifted moments
as :func:`normstats.kernels.accumulate` adds the whole row: the same
counts and moments (to rounding; the shifts may differ), so a fit's numbers do not depend on the cut. Memory
is one piece plus the row's statistics (which any fit of such rows holds).

:func:`piece_slices` gives a range as the index of its hyperslab in the row
(readers of HDF5 select it; apply normalizes and writes it). The read path
(:meth:`normstats.stream.Stream.wide_rows`), the estimators'
``update_row`` and apply / assign take rows larger than a block this way.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from .errors import NonFiniteError
from .kernels import Layout, Sums, accumulate


def piece_ranges(row_shape: tuple, itemsize: int, block_bytes: int) -> list[tuple[int, int]]:
    """Element ranges ``[e0, e1)`` of one C-order row, each at most `block_bytes`
    (or one element, when an element alone is larger), in order, covering the row.

    Each range is a hyperslab: a run along the deepest row axis whose trailing
    sub-array fits the block, at fixed indices of the axes before it.
    """
    row_shape = tuple(int(n) for n in row_shape) or (1,)
    elements = int(np.prod(row_shape, dtype=np.int64))
    per_block = max(1, block_bytes // max(itemsize, 1))
    if elements <= per_block:
        return [(0, elements)] if elements else []
    # The first axis whose trailing sub-array (one index of it) fits the block.
    trailing = elements
    for axis, n in enumerate(row_shape):
        trailing //= n
        if trailing <= per_block:
            break
    step = max(1, per_block // max(trailing, 1))  # indices of `axis` per piece
    span = row_shape[axis] * trailing  # elements of one full run along `axis`
    ranges = []
    for start in range(0, elements, span):
        for first in range(0, row_shape[axis], step):
            last = min(row_shape[axis], first + step)
            ranges.append((start + first * trailing, start + last * trailing))
    return ranges


def piece_slices(row_shape: tuple, e0: int, e1: int) -> tuple[slice, ...]:
    """The index into a row of `row_shape` of the piece ``[e0, e1)`` of
    :func:`piece_ranges`: fixed indices before one axis, a range along it,
    whole axes after it (``row[index]`` is the piece, C order)."""
    row_shape = tuple(int(n) for n in row_shape)
    if not row_shape:
        return ()
    first = np.unravel_index(e0, row_shape)
    last = np.unravel_index(e1 - 1, row_shape)
    axis = next((a for a in range(len(row_shape)) if first[a] != last[a]), len(row_shape) - 1)
    index = tuple(slice(int(i), int(i) + 1) for i in first[:axis])
    return index + (slice(int(first[axis]), int(last[axis]) + 1),) + (slice(None),) * (len(row_shape) - axis - 1)


def piece_shape(row_shape: tuple, e0: int, e1: int) -> tuple[int, ...]:
    """The shape of ``row[piece_slices(row_shape, e0, e1)]``."""
    return tuple(len(range(*s.indices(int(n)))) for s, n in zip(piece_slices(row_shape, e0, e1), row_shape))


def accumulate_row(
    pieces: Iterator[tuple[int, np.ndarray]],
    layout: Layout,
    slot: int,
    keys: np.ndarray,
    shift: Optional[np.ndarray],
    fresh: np.ndarray,
    *,
    weight: Optional[float] = None,
    omit: bool = False,
    squares: bool = True,
    count0: Optional[np.ndarray] = None,
    start: Optional[Sums] = None,
) -> Sums:
    """The sums of one row given as ``(e0, piece)`` pairs, equal to
    :func:`~normstats.kernels.accumulate` of the whole row in slot `slot`.

    Parameters
    ----------
    pieces : iterator of (int, ndarray)
        Each piece's first element in the row and its elements (any shape,
        read in C order), in order and together covering the row once.
    layout, keys, shift, fresh, omit, squares, count0
        As for :func:`~normstats.kernels.accumulate`.
    slot : int
        The row's slot in ``[0, len(keys))``.
    start : Sums, optional
        Sums to continue (same slots), as for ``accumulate``: the row joins
        a batch or group open across rows.
    weight : float, optional
        The row's weight (default 1).

    Raises
    ------
    NonFiniteError
        Without `omit`, for the row's first NaN / Inf (row 0, its index in
        the row's shape).
    """
    slots = np.array([slot], np.int64)
    weights = None if weight is None else np.array([weight], np.float64)
    sums: Optional[Sums] = start
    calls = 0
    for e0, piece in pieces:
        flat = np.ascontiguousarray(piece).reshape(1, -1)
        try:
            # Every call counts the row once and reads `fresh` afresh (accumulate copies it):
            # each piece sets the shifts of its own elements or statistics from the data.
            sums = accumulate(flat, layout, slots, keys, shift, fresh, weights=weights, omit=omit,
                              squares=squares, count0=count0, start=sums, first_element=int(e0))
        except NonFiniteError as error:
            index = np.unravel_index(int(e0) + error.index[-1], layout.row_shape)
            raise NonFiniteError(0, tuple(int(i) for i in index), error.value) from None
        calls += 1
    if calls == 0:
        raise ValueError("a row needs at least one piece")
    # The row was counted once per call: count it once.
    sums.rows[slot] -= calls - 1
    sums.weight[slot] -= (calls - 1) * (1.0 if weight is None else float(weight))
    return sums


def row_template(row_shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A one-row array of `row_shape` and `dtype` that takes no memory (a read-only
    broadcast of one value): what an estimator's shape and dtype checks read
    when its row comes in pieces."""
    return np.broadcast_to(np.zeros((), dtype), (1,) + tuple(row_shape))


def row_pieces(read: Callable[[int, int, np.ndarray], None], ranges: list[tuple[int, int]],
               dtype: np.dtype, buffer: Optional[np.ndarray] = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(e0, piece)`` for `ranges`, each read by ``read(e0, e1, out)`` into one
    reused buffer of the largest range (`buffer` if given; valid until the next piece)."""
    width = max((e1 - e0 for e0, e1 in ranges), default=0)
    if buffer is None or buffer.dtype != dtype or buffer.size < width:
        buffer = np.empty(width, dtype)
    for e0, e1 in ranges:
        out = buffer[: e1 - e0]
        read(e0, e1, out)
        yield e0, out
