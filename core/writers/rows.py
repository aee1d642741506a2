"""Array outputs (apply, assign): rows written block by block, in place, into
a temporary `.npy` or HDF5 file whose data areas exist before any row does."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .atomic import atomic_path
from .base import _extension, split_output
from .h5_layout import _check_file_size, _h5_skeleton
from .npy_layout import _write_npy_header


@dataclasses.dataclass(frozen=True)
class RowRegion:
    """The data area of an output file: rows live at ``offset + row * row_bytes``.

    Plain data, so it pickles to workers, which write disjoint rows in place
    (on the same machine, or on storage every worker mounts at this path).
    Rows are written with plain ``pwrite``: a full disk is an ordinary
    OSError, never an error inside the HDF5 library (whose file object may
    crash the process if closed after a failed write).
    """

    path: str
    offset: int
    row_bytes: int
    dtype: str

    def write(self, row: int, block: np.ndarray) -> None:
        """Write `block` as rows ``row:row + len(block)``."""
        self.write_at(self.offset + row * self.row_bytes, block)

    def write_piece(self, row: int, e0: int, piece: np.ndarray) -> None:
        """Write `piece` as elements ``e0:e0 + piece.size`` of row `row` (C order)."""
        self.write_at(self.offset + row * self.row_bytes + e0 * np.dtype(self.dtype).itemsize, piece)

    def write_at(self, position: int, block: np.ndarray) -> None:
        """Write the bytes of `block` at byte `position` of the file."""
        data = memoryview(np.ascontiguousarray(block, dtype=self.dtype)).cast("B")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while data:  # pwrite may write less than asked
                written = os.pwrite(fd, data, position)
                data, position = data[written:], position + written
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Flush this process's writes to the storage."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize


def _layout(temporary: str, extension: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
            attrs: Optional[dict[str, Any]] = None,
            values: Optional[dict[str, np.ndarray]] = None) -> dict[str, RowRegion]:
    """Create `temporary` as a `.npy` (one array) or HDF5 file whose data areas
    exist, unwritten, before any value is; return where each array's rows go.

    The HDF5 datasets are contiguous and allocated at creation, so their
    values are raw bytes at fixed offsets: the HDF5 library writes only the
    metadata, here, and no value but the few small `values` (datasets
    written whole, with the metadata) -- no lock, no parallel HDF5 needed.
    """
    shapes = {name: (tuple(int(n) for n in shape), np.dtype(dtype).newbyteorder("="))
              for name, (shape, dtype) in arrays.items()}

    def region(name: str, offset: Optional[int]) -> RowRegion:
        shape, dtype = shapes[name]
        if offset is None and _nbytes(shape, dtype):
            raise RuntimeError(f"HDF5 gave dataset {name!r} no place in {temporary}")
        row_bytes = _nbytes(shape[1:], dtype) if shape else dtype.itemsize
        return RowRegion(temporary, int(offset or 0), row_bytes, dtype.str)

    if extension == ".npy":
        (name, (shape, dtype)), = shapes.items()
        with open(temporary, "wb") as f:
            _write_npy_header(f, shape, dtype)
            offset = f.tell()
            f.truncate(offset + _nbytes(shape, dtype))
        return {name: region(name, offset)}
    values = values or {}
    _check_h5_room(temporary, sum(_nbytes(*v) for v in shapes.values()), len(shapes) + len(values), attrs)
    offsets = _h5_skeleton(temporary, ((name, shape, dtype) for name, (shape, dtype) in shapes.items()),
                           attrs or {}, values)
    return {name: region(name, None if offset < 0 else int(offset)) for name, offset in zip(shapes, offsets)}


def sequences_layout(temporary: str, names: Iterable[str], lengths: np.ndarray, row_shape: tuple[int, ...],
                     dtype: np.dtype, attrs: Optional[dict[str, Any]] = None) -> tuple[np.ndarray, int]:
    """As :func:`_layout` for an HDF5 file of one dataset per sequence (`names`, each of
    its `lengths` frames of `row_shape`): each dataset's data offset (int64) and the
    frame bytes, with no object per sequence."""
    dtype = np.dtype(dtype).newbyteorder("=")
    row_bytes = _nbytes(row_shape, dtype)
    _check_h5_room(temporary, int(lengths.sum()) * row_bytes, len(lengths), attrs)
    offsets = _h5_skeleton(temporary, ((name, (int(n),) + tuple(row_shape), dtype) for name, n in zip(names, lengths)),
                           attrs or {}, {})
    if np.any((offsets < 0) & (lengths > 0) & (row_bytes > 0)):
        raise RuntimeError(f"HDF5 gave a dataset no place in {temporary}")
    return offsets, row_bytes


def _check_h5_room(temporary: str, data_bytes: int, datasets: int, attrs: Optional[dict[str, Any]]) -> None:
    metadata = len(json.dumps(attrs or {}, default=str)) + 256 * datasets
    _check_file_size(temporary, data_bytes + 2 * metadata + (16 << 10))


class _RowsWriter:
    """Rows written block by block into a temporary beside `path`, placed at
    `path` on a clean exit of the ``with`` block (removed on an exception).

    Subclasses say which arrays the file holds (``_arrays``) and its
    attributes (``_attrs``); ``_put`` writes the next rows of each.
    """

    def __init__(self, path: str, rows: int) -> None:
        self.path, self.rows = path, int(rows)
        self._context: Optional[contextlib.AbstractContextManager] = None
        self._rows_written = 0
        self._arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._attrs: dict[str, Any] = {}

    def __enter__(self) -> "_RowsWriter":
        self._context = atomic_path(self.path)
        temporary = self._context.__enter__()
        try:
            self._regions = _layout(temporary, _extension(self.path), self._arrays, self._attrs)
        except BaseException as error:
            if not self._context.__exit__(type(error), error, error.__traceback__):
                raise
        return self

    @property
    def temporary(self) -> str:
        """The file being written (placed at `path` on a clean exit)."""
        return next(iter(self._regions.values())).path

    def _put(self, blocks: dict[str, np.ndarray]) -> None:
        rows = {block.shape[0] for block in blocks.values()}
        if len(rows) != 1:
            raise ValueError("blocks with different numbers of rows")
        for name, block in blocks.items():
            self._regions[name].write(self._rows_written, block)
        self._rows_written += rows.pop()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._rows_written != self.rows:
            exc = RuntimeError(f"wrote {self._rows_written} of {self.rows} rows")
            self._context.__exit__(RuntimeError, exc, None)
            raise exc
        self._context.__exit__(exc_type, exc, tb)


class ArrayWriter(_RowsWriter):
    """Writes an array of known shape block by block to `.npy` or an HDF5 dataset.

    Use as a context manager: on a clean exit the file is placed at `path`,
    on an exception the temporary is removed.

    Parameters
    ----------
    path : str
        ``out.npy``, ``out.h5`` or ``out.h5:NAME``.
    shape : tuple of int
        Shape of the whole output.
    dtype : numpy dtype
    dataset : str
        Dataset name in an HDF5 output when `path` names none.
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, dataset: str = "data") -> None:
        path, name = split_output(path)
        super().__init__(path, shape[0])
        self.dataset = name or dataset
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._arrays = {self.dataset: (self.shape, self.dtype)}

    def write(self, block: np.ndarray) -> None:
        """Append the next rows."""
        self._put({self.dataset: block})

    def write_piece(self, e0: int, piece: np.ndarray) -> None:
        """Write elements ``e0:e0 + piece.size`` of the next row (a row larger than a
        read block, written in pieces); :meth:`end_row` then moves to the row after."""
        self._regions[self.dataset].write_piece(self._rows_written, e0, piece)

    def end_row(self) -> None:
        """The next row is written (in pieces, by :meth:`write_piece`)."""
        self._rows_written += 1


class DatasetsWriter(_RowsWriter):
    """Writes several HDF5 datasets with the same rows, block by block, atomically.

    Parameters
    ----------
    path : str
        The HDF5 file to write.
    arrays : dict of str to (shape, dtype)
        The datasets; every shape starts with the same number of rows.
    attrs : dict, optional
        File attributes (metadata), stored as by :func:`write_attrs`.
    """

    def __init__(self, path: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
                 attrs: Optional[dict[str, Any]] = None) -> None:
        rows = {shape[0] for shape, _ in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"datasets with different numbers of rows: {sorted(rows)}")
        super().__init__(path, rows.pop())
        self._arrays, self._attrs = dict(arrays), dict(attrs or {})

    def write(self, **blocks: np.ndarray) -> None:
        """Append the next rows of every dataset (one keyword each)."""
        if set(blocks) != set(self._arrays):
            raise ValueError(f"write needs {sorted(self._arrays)}, got {sorted(blocks)}")
        self._put(blocks)


@contextlib.contextmanager
def preallocated_output(path: str, shape: tuple[int, ...], dtype: np.dtype,
                        dataset: str = "data") -> Iterator[RowRegion]:
    """An output `.npy` or HDF5 file whose data area exists before any row is written.

    Yields the :class:`RowRegion` of a temporary file beside `path` that
    other processes fill in any order; on a clean exit the file is placed at
    `path`, on an exception it is removed.
    """
    path, name = split_output(path)
    with atomic_path(path) as temporary:
        regions = _layout(temporary, _extension(path), {name or dataset: (tuple(shape), dtype)})
        yield next(iter(regions.values()))
