"""Per-chunk moments of a block, computed while each chunk is in cache.

A read block (about 8 MB) is split into chunks of whole rows (one logical
batch for the moving averages, about a thousand rows for exact statistics).
Each unit of work (a chunk, or several small chunks stacked) is copied to
float64 and reduced in two passes while it sits in cache, instead of
sweeping the whole block several times through memory.

Measured on the 2-core development machine: splitting the chunks over two
threads ran no faster (the many small NumPy calls serialize on the GIL), so
the work is serial; the reader thread of :mod:`normstats.sources` overlaps
the file reads instead.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .moments import checked_moments
from .errors import NonFiniteError
from .workspace import Workspace

CHUNK_BYTES = 2 << 20  # float64 units of ~2 MB: in cache, and few enough calls to amortize numpy's overhead


def chunk_rows_for(row_elements: int) -> int:
    """Rows per chunk for exact statistics: about CHUNK_BYTES of float64."""
    return max(1, CHUNK_BYTES // (8 * max(row_elements, 1)))


def chunk_moments(
    x: np.ndarray,
    axes: tuple[int, ...],
    chunk: int,
    *,
    shift: Optional[np.ndarray] = None,
    nan_policy: str = "error",
    workspace: Optional[Workspace] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moments of each run of `chunk` consecutive rows of `x`.

    Parameters
    ----------
    x : ndarray, shape (rows, ...)
        `rows` need not be a multiple of `chunk`; the last chunk is shorter.
    axes : tuple of int
        Non-negative axes reduced within each chunk (including 0).
    chunk : int
        Rows per chunk.
    shift : ndarray, optional
        Of the statistic's (kept) shape; subtracted first, so that the means
        returned are relative to it.
    nan_policy : {'error', 'omit'}
        As for :func:`normstats.moments.checked_moments`.
    workspace : Workspace, optional
        Scratch memory the caller keeps across calls.

    Returns
    -------
    count, mean, m2 : ndarray of float64, shape (chunks,) + kept
        Elements, mean and M2 of each chunk.

    Raises
    ------
    NonFiniteError
        Its row counted from the first row of `x`.

    Notes
    -----
    Small chunks (single rows, say) are reduced several at a time, stacked
    along a new axis, so that each unit of work is about CHUNK_BYTES.
    """
    rows = x.shape[0]
    full, rest = divmod(rows, chunk)
    kept = tuple(size for axis, size in enumerate(x.shape) if axis not in axes)
    chunks = full + (1 if rest else 0)
    count = np.empty((chunks,) + kept)
    mean = np.empty_like(count)
    m2 = np.empty_like(count)
    per_chunk = (1,) + tuple(a + 1 for a in axes if a != 0)
    stacked_shift = None if shift is None else np.expand_dims(shift, (0,) + per_chunk)
    row_bytes = 8 * int(np.prod(x.shape[1:], dtype=np.int64))
    group = max(1, CHUNK_BYTES // max(chunk * row_bytes, 1))
    # Units of work: (first chunk, chunks in it, rows per chunk)
    units = [(c, min(group, full - c), chunk) for c in range(0, full, group)]
    if rest:
        units.append((full, 1, rest))

    workspace = workspace if workspace is not None else Workspace()
    for first, number, size in units:
        start = first * chunk
        block = x[start : start + number * size].reshape((number, size) + x.shape[1:])
        try:
            n, mean[first : first + number], m2[first : first + number] = checked_moments(
                block, per_chunk, workspace, shift=stacked_shift, nan_policy=nan_policy, row_axes=2
            )
        except NonFiniteError as error:
            raise error.shifted(start) from None
        count[first : first + number] = n
    return count, mean, m2


def combine_chunks(
    count: np.ndarray, mean: np.ndarray, m2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact moments of the union of chunks (axis 0), chunks with count 0 ignored::

        N = sum n_c,  mean = sum n_c mean_c / N,  M2 = sum M2_c + sum n_c (mean_c - mean)**2
    """
    total = count.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = np.where(count > 0, count * mean, 0.0)
        combined = weighted.sum(axis=0) / total
        spread = np.where(count > 0, count * (mean - combined) ** 2, 0.0)
    return total, combined, np.where(count > 0, m2, 0.0).sum(axis=0) + spread.sum(axis=0)
