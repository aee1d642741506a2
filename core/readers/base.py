"""What the readers share: optional packages, and sequences of rows with keys."""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DataError, UsageError
from ..sources import ArraySource

# module -> (the package to install, the normstats extra that brings it)
EXTRAS = {"kaldiio": ("kaldiio", "kaldi"), "zarr": ("zarr", "zarr"), "pyarrow": ("pyarrow", "arrow")}


def require(module: str, spec: str) -> Any:
    """Import an optional package, or say in one line how to install it.

    Raises
    ------
    UsageError
        ``reading SPEC needs PACKAGE; pip install 'normstats[EXTRA]'``.
    """
    package, extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"reading {spec} needs {package}; pip install 'normstats[{extra}]'") from None


class SequenceSource(ArraySource):
    """A collection of variable-length sequences (T_i, ...) read as one array of rows.

    The frames of the sequences are the rows, in the collection's order;
    ``keys[i]`` names sequence i and ``lengths[i]`` is its T_i. Subclasses
    set them with :meth:`_set_sequences` and implement :meth:`read_sequence`.
    """

    keys: list[str]
    lengths: np.ndarray

    def _set_sequences(self, keys: Sequence[str], lengths: Sequence[int], row_shape: tuple[int, ...],
                       dtype: np.dtype) -> None:
        if not keys:
            raise DataError(f"{self.name} holds no sequences; there is nothing to read")
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise DataError(f"{self.name} holds the key {key!r} twice; keys must be unique")
            seen.add(key)
        self.keys = list(keys)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.ends = np.cumsum(self.lengths)
        self.shape = (int(self.ends[-1]),) + tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self._validate()

    def spans(self, start: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
        """(sequence, first frame, last frame + 1, offset in the block) of rows ``start:start+rows``."""
        index = int(np.searchsorted(self.ends, start, side="right"))
        done = 0
        while done < rows:
            first = int(self.ends[index - 1]) if index else 0
            begin = start + done - first
            take = min(int(self.lengths[index]) - begin, rows - done)
            if take > 0:
                yield index, begin, begin + take, done
                done += take
            index += 1

    def read_into(self, start: int, out: np.ndarray) -> None:
        for index, begin, end, offset in self.spans(start, out.shape[0]):
            self.read_sequence(index, begin, end, out[offset:offset + end - begin])

    def read_sequence(self, index: int, begin: int, end: int, out: np.ndarray) -> None:
        """Fill `out` with frames ``begin:end`` of sequence `index`."""
        raise NotImplementedError

    def locate_row(self, row: int) -> tuple[str, int]:
        """The sequence holding `row`, and the frame within it."""
        index = int(np.searchsorted(self.ends, row, side="right"))
        first = int(self.ends[index - 1]) if index else 0
        return self.where(index), row - first

    def where(self, index: int) -> str:
        """Sequence `index` for messages: its key and the file holding it."""
        return f"utterance {self.keys[index]!r} of {self.name}"
