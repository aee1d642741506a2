"""Variable batches: the row offsets where batches start (``--batch-boundaries``).

A boundaries file is a ``.npy`` array or a text file of increasing integers
starting at 0 (whitespace-separated); ``sequences`` makes one batch per
sequence of a collection (scp:, ark:, file.h5:/group). The offsets count
rows of the whole input stream, so the batches do not depend on how the rows
are read: a batch may be one row or span many read blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError, UsageError
from .limits import require_regular_file

SEQUENCES = "sequences"


@dataclass(frozen=True, eq=False)
class BatchBoundaries:
    """Where each batch starts.

    Attributes
    ----------
    starts : ndarray of int64
        Strictly increasing row offsets, the first 0.
    name : str
        The file they came from (or ``sequences``), for messages and metadata.
    """

    starts: np.ndarray
    name: str

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, BatchBoundaries) and self.name == other.name
                and np.array_equal(self.starts, other.starts))

    def starts_in(self, start: int, stop: int) -> np.ndarray:
        """The batch starts in rows ``start:stop``, counted from `start`."""
        first, last = np.searchsorted(self.starts, [start, stop], side="left")
        return self.starts[first:last] - start

    def check_rows(self, rows: int) -> None:
        """Refuse offsets at or beyond the input's `rows`.

        Raises
        ------
        DataError
            Naming the file, the entry and the offset.
        """
        beyond = int(np.searchsorted(self.starts, rows, side="left"))
        if beyond < self.starts.size:
            raise DataError(f"{self.name}: offset {int(self.starts[beyond])} (entry {beyond}) is beyond the "
                            f"input's {rows} rows; every batch must start at a row of the input")


def read_boundaries(path: str) -> BatchBoundaries:
    """The offsets in `path` (``.npy`` or text), checked.

    Raises
    ------
    DataError
        Not integers, not one-dimensional, empty, not starting at 0, a
        negative offset, or one not greater than the one before.
    """
    require_regular_file(path, "--batch-boundaries file")
    if path.endswith(".npy"):
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(f"{path} is not a readable .npy array ({error}); give a .npy of row offsets "
                            "or a text file of integers") from None
        whole = values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values))
        if values.dtype.kind not in "iu" and not (whole and np.all(np.abs(values) < 2.0 ** 63)):
            raise DataError(f"{path} holds {values.dtype} values; batch boundaries are integer row offsets")
        if values.ndim != 1:
            raise DataError(f"{path} has shape {values.shape}; batch boundaries are one row offset per batch (1-D)")
    else:
        values = _text_offsets(path)
    return checked_boundaries(values, path)


def _text_offsets(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        tokens = f.read().split()
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not _is_int(t))
        raise DataError(f"{path}: {bad.decode('utf-8', 'replace')[:40]!r} (entry {tokens.index(bad)}) is not an "
                        "integer; batch boundaries are integer row offsets") from None
    except OverflowError:
        raise DataError(f"{path}: an offset does not fit a 64-bit integer") from None


def _is_int(token: bytes) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def checked_boundaries(values: np.ndarray, name: str) -> BatchBoundaries:
    """`values` as :class:`BatchBoundaries`, checked (see :func:`read_boundaries`)."""
    starts = np.asarray(values)
    if starts.size == 0:
        raise DataError(f"{name} holds no offsets; the first batch starts at row 0")
    negative = np.flatnonzero(starts < 0)
    if negative.size:
        raise DataError(f"{name}: offset {starts[negative[0]]} (entry {negative[0]}) is negative; "
                        "row offsets count from 0")
    starts = starts.astype(np.int64)
    if starts[0] != 0:
        raise DataError(f"{name}: the first offset is {starts[0]}, not 0; the first batch starts at row 0")
    back = np.flatnonzero(np.diff(starts) <= 0)
    if back.size:
        i = int(back[0]) + 1
        raise DataError(f"{name}: offset {starts[i]} (entry {i}) is not greater than the one before "
                        f"({starts[i - 1]}); offsets must increase")
    return BatchBoundaries(starts, os.fspath(name))


def sequence_boundaries(sources: list) -> BatchBoundaries:
    """One batch per sequence of the collection shards `sources` (empty sequences skipped).

    Raises
    ------
    UsageError
        A shard is one array, not a sequence collection.
    """
    lengths = []
    for source in sources:
        if not hasattr(source, "lengths"):
            raise UsageError(f"{source.name} is one array, without sequences; --batch-boundaries sequences "
                             "needs a sequence collection (scp:, ark:, file.h5:/group), or give a file of offsets")
        lengths.append(np.asarray(source.lengths, dtype=np.int64))
    ends = np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, np.int64)
    total = int(ends[-1]) if ends.size else 0
    starts = np.unique(np.r_[0, ends[:-1]]).astype(np.int64)
    starts = starts[(starts < total) | (starts == 0)]  # empty sequences at the end start no batch
    return BatchBoundaries(starts, SEQUENCES)
