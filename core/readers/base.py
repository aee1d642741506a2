"""What the readers share: the array source base, optional packages, and
sequences of rows with keys."""

from __future__ import annotations

import array
import importlib
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import DataError, UsageError
from ..limits import MEMORY_SHARE, _size, available_memory, elements
from ..validate import check_numeric_dtype

# module -> (the package to install, the normstats extra that brings it)
EXTRAS = {"kaldiio": ("kaldiio", "kaldi"), "zarr": ("zarr", "zarr"), "pyarrow": ("pyarrow", "arrow")}


def require(module: str, spec: str, *, action: str = "reading") -> Any:
    """Import an optional package, or say in one line how to install it.

    Raises
    ------
    UsageError
        ``reading SPEC needs PACKAGE; pip install 'normstats[EXTRA]'`` (or `action`, e.g. writing).
    """
    package, extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{action} {spec} needs {package}; pip install 'normstats[{extra}]'") from None


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    """What must stay the same while a file is read: which file, its size and last write."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class ArraySource:
    """One array on disk, read by rows. Subclasses implement :meth:`read_into`.

    A source keeps only metadata between reads: its file is opened at the
    first read and closed by :meth:`close` (a Stream closes each shard when
    done with it), so a thousand shards never hold a thousand descriptors.
    Every read checks that the file is still the one opened, with the same
    size and modification time: a file changed under a run is an error, never
    a mix of two versions (or zeros, which HDF5 returns past a truncated end).
    """

    path: str
    name: str  # for messages: 'file.npy' or 'file.h5:NAME'
    dataset: Optional[str] = None  # the HDF5 dataset read, if any
    shape: tuple[int, ...]
    dtype: np.dtype
    first_row: int = 0  # the file's row that is row 0 here (see RowSlice)
    _identity: tuple[int, int, int, int]  # of the file holding the data, when first opened

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill `out` (C-contiguous, any numeric dtype) with rows ``start:start+len(out)``."""
        raise NotImplementedError

    @property
    def reads_pieces(self) -> bool:
        """Whether :meth:`read_piece` reads part of a row without the rest (else a
        row larger than a read block is read whole: see README, "Errors and guarantees")."""
        return False

    def read_piece(self, row: int, e0: int, out: np.ndarray) -> None:
        """Fill `out` (1-D, C-contiguous) with elements ``e0:e0+len(out)`` of row `row`
        in C order, a range of :func:`normstats.row_pieces.piece_ranges`; only where
        :attr:`reads_pieces`."""
        raise NotImplementedError

    def locate_row(self, row: int) -> tuple[str, int]:
        """Row `row` of this source for messages: (what holds it, its row there)."""
        return self.name, self.first_row + row

    def files(self) -> list[str]:
        """Every local file this source reads."""
        return [self.path]

    def close(self) -> None:
        """Release the file handle (a later read opens it again)."""

    def _validate(self) -> None:
        check_numeric_dtype(self.dtype, self.name)
        if len(self.shape) == 0:
            raise DataError(f"{self.name} is a scalar; it needs at least one (row) axis")
        if self.shape[0] == 0:
            raise DataError(f"{self.name} has zero rows; there is nothing to read")
        if elements(self.shape[1:]) == 0:
            raise DataError(f"{self.name} has shape {self.shape}: its rows hold no elements, so there is "
                            "nothing to compute; check how the array was saved")

    def _current_identity(self, file: Optional[str] = None) -> tuple:
        """The identity of `file` (default: the source's) now, laid out as :func:`_identity`'s."""
        return _identity(os.stat(file or self.path))

    def _check_current(self, file: Optional[str] = None) -> None:
        """Refuse to go on if `file` (default: the source's) is no longer the one first opened."""
        self._check_identity(self._current_identity(file), file)

    def _check_unchanged(self, info: os.stat_result, file: Optional[str] = None) -> None:
        self._check_identity(_identity(info), file)

    def _check_identity(self, now: tuple, file: Optional[str] = None) -> None:
        if now != self._identity:
            before, after = self._identity[2], now[2]
            size = f" (its size went from {before} to {after} bytes)" if after != before else ""
            raise DataError(f"{file or self.path} changed while it was read{size}; nothing was written: "
                            "run again once no other program writes to it")


SORT_BYTES_LIMIT = 64 << 20  # keys sorted by numpy as one fixed-width array up to this size


class KeyTable:
    """Many short strings in one bytes buffer and an offsets array: a read-only sequence of str.

    A million keys as Python strings in a list take ~80 bytes each; here
    they take their UTF-8 bytes and 8 more, and pickle as two arrays (to
    workers too).

    Parameters
    ----------
    keys : iterable of str
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._set((key.encode("utf-8", "surrogateescape") for key in keys))

    @classmethod
    def from_bytes(cls, keys: Iterable[bytes]) -> "KeyTable":
        """A table of keys given UTF-8 encoded (no str made on the way)."""
        table = cls()
        table._set(keys)
        return table

    def _set(self, encoded: Iterable[bytes]) -> None:
        builder = KeyTableBuilder()
        for key in encoded:
            builder.append(key)
        self._buffer, self._ends = builder.parts()

    def sorted_order(self) -> np.ndarray:
        """The permutation that sorts the keys (as ``sorted`` sorts str: UTF-8 bytes sort the same),
        by numpy over fixed-width bytes when that array is small, else by Python."""
        width = int(np.max(np.diff(self._ends, prepend=0), initial=1)) or 1
        if len(self) * width <= SORT_BYTES_LIMIT:
            fixed = np.fromiter((self._bytes(i) for i in range(len(self))), dtype=f"S{width}", count=len(self))
            return np.argsort(fixed, kind="stable")
        return np.asarray(sorted(range(len(self)), key=self._bytes), dtype=np.int64)

    def take(self, order: np.ndarray) -> "KeyTable":
        """The keys in the order `order` gives."""
        return KeyTable.from_bytes(self._bytes(int(i)) for i in order)

    def __len__(self) -> int:
        return len(self._ends)

    def _bytes(self, index: int) -> bytes:
        begin = int(self._ends[index - 1]) if index else 0
        return self._buffer[begin:int(self._ends[index])]

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._bytes(index).decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        begin = 0
        buffer = self._buffer
        for end in self._ends.tolist():
            yield buffer[begin:end].decode("utf-8", "surrogateescape")
            begin = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyTable):
            return self._buffer == other._buffer and np.array_equal(self._ends, other._ends)
        try:
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        except TypeError:
            return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"KeyTable({len(self)} keys)"

    def nbytes(self) -> int:
        """Bytes held (the buffer and its offsets)."""
        return len(self._buffer) + self._ends.nbytes

    def first_repeated(self) -> Optional[str]:
        """A key that appears twice, or None: by hashes sorted in numpy, equal hashes compared."""
        hashes = np.fromiter((hash(self._bytes(i)) for i in range(len(self))), dtype=np.int64, count=len(self))
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        for at in same.tolist():
            first, second = int(order[at]), int(order[at + 1])
            if self._bytes(first) == self._bytes(second):
                return self[max(first, second)]
        return None


class KeyTableBuilder:
    """A :class:`KeyTable` built key by key, as a reader indexing a collection meets them:
    the keys' UTF-8 bytes appended to one buffer, their ends to an array (no str per key)."""

    def __init__(self) -> None:
        self._buffer, self._ends = bytearray(), array.array("q")

    def append(self, key: bytes) -> None:
        """Add the next key, UTF-8 encoded."""
        self._buffer += key
        self._ends.append(len(self._buffer))

    def __len__(self) -> int:
        return len(self._ends)

    def parts(self) -> tuple[bytes, np.ndarray]:
        """The keys' bytes and their ends, as a :class:`KeyTable` holds them."""
        return bytes(self._buffer), np.array(self._ends, dtype=np.int64)

    def table(self) -> KeyTable:
        """The keys appended so far, as a table."""
        table = KeyTable()
        table._buffer, table._ends = self.parts()
        return table


# Bytes one sequence's index takes while it is built (keys and names as Python objects for a
# moment; kept, it is ~50 bytes and the key): what the estimate before indexing assumes.
INDEX_BYTES_PER_SEQUENCE = 400


def check_index_memory(count: int, what: str, *, so_far: bool = False, estimated: bool = False) -> None:
    """Refuse to index `count` sequences of `what` (with `so_far`, the first `count` of
    more; `estimated`, a count inferred from part of the file) when their index would not
    fit in memory.

    Raises
    ------
    DataError
        Naming the collection, the count and the figure.
    """
    need = count * INDEX_BYTES_PER_SEQUENCE
    limit = int(available_memory() * MEMORY_SHARE)
    if need > limit:
        holds = f"more than {count}" if so_far else f"about {count}" if estimated else f"{count}"
        raise DataError(f"{what} holds {holds} sequences, whose index takes about {_size(need)}, more than the "
                        f"{_size(limit)} of memory normstats may take; split it into several collections, fit "
                        "each and combine them with normstats merge")


class SequenceSource(ArraySource):
    """A collection of variable-length sequences (T_i, ...) read as one array of rows.

    The frames of the sequences are the rows, in the collection's order;
    ``keys[i]`` names sequence i and ``lengths[i]`` is its T_i. Subclasses
    set them with :meth:`_set_sequences` and implement :meth:`read_sequence`.
    The index is numpy arrays and one :class:`KeyTable`, never an object per
    sequence: a million sequences index in tens of MB.
    """

    keys: KeyTable
    lengths: np.ndarray

    def _set_sequences(self, keys: Iterable[str], lengths: Sequence[int], row_shape: tuple[int, ...],
                       dtype: np.dtype) -> None:
        self.keys = keys if isinstance(keys, KeyTable) else KeyTable(keys)
        if not len(self.keys):
            raise DataError(f"{self.name} holds no sequences; there is nothing to read")
        twice = self.keys.first_repeated()
        if twice is not None:
            raise DataError(f"{self.name} holds the key {twice!r} twice; keys must be unique")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.ends = np.cumsum(self.lengths)
        self.shape = (int(self.ends[-1]),) + tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self._validate()

    def index_bytes(self) -> int:
        """Bytes the per-sequence index holds (keys, lengths, ends and the subclass's arrays)."""
        arrays = [value for value in vars(self).values() if isinstance(value, np.ndarray)]
        tables = [value for value in vars(self).values() if isinstance(value, KeyTable)]
        return sum(a.nbytes for a in arrays) + sum(t.nbytes() for t in tables)

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

    def files(self) -> list[str]:
        """Every local file read: the collection's own, and those its entries point into."""
        return list(dict.fromkeys([self.path, *getattr(self, "_files", {})]))

    def locate_row(self, row: int) -> tuple[str, int]:
        """The sequence holding `row`, and the frame within it."""
        index = int(np.searchsorted(self.ends, row, side="right"))
        first = int(self.ends[index - 1]) if index else 0
        return self.where(index), row - first

    def where(self, index: int) -> str:
        """Sequence `index` for messages: its key and the file holding it."""
        return f"utterance {self.keys[index]!r} of {self.name}"
