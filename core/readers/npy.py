"""`.npy` files, read with ``pread`` into reused buffers (never mapped)."""

from __future__ import annotations

import os
import tokenize
from typing import Optional

import numpy as np

from ..errors import DataError
from ..limits import elements
from .base import ArraySource, _identity
from .reopened_file import ReopenedFile


NPY_MAGIC = b"\x93NUMPY"


class NpySource(ArraySource):
    """A `.npy` file read with ``pread`` at the row's byte offset, never mapped.

    Plain reads into a reused buffer keep memory bounded by the block (a
    memory map would count every page touched as resident) and run at the
    page-cache copy speed; a file that shrinks under a map kills the process
    (SIGBUS), a short read is an error. A Fortran-order file is read as one
    strip per column.
    """

    def __init__(self, path: str) -> None:
        self.path = self.name = path
        self._file = ReopenedFile(path)
        self._strips: Optional[np.ndarray] = None  # Fortran order: the block's columns
        self._staging: Optional[np.ndarray] = None  # a block in the file's dtype, when the stream's differs
        with open(path, "rb") as f:
            self._read_header(f)
        self._validate()

    def _read_header(self, f) -> None:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError, SyntaxError, tokenize.TokenError) as error:
            # numpy parses an old-style header with tokenize, whose error is none of the others
            raise DataError(f"{self.path} is not a readable .npy file ({error})") from None
        if any(n < 0 for n in shape):
            raise DataError(f"{self.path} declares the shape {tuple(shape)}, with a negative size")
        self.shape, self.dtype, self._fortran = tuple(int(n) for n in shape), np.dtype(dtype), fortran_order
        if self.dtype.hasobject:
            raise DataError(
                f"{self.path} holds Python objects; they are never loaded (it would need "
                "unpickling); save numeric arrays instead"
            )
        self._offset = f.tell()
        # Python integers: a declared (1, 2**32, 2**32) must not wrap to 0 as numpy's int64 prod would
        self._row_bytes = elements(self.shape[1:]) * self.dtype.itemsize
        expected = self._offset + self._row_bytes * (self.shape[0] if self.shape else 1)
        self._identity = self._opened_identity(f)
        if self._identity[2] < expected:
            raise DataError(
                f"{self.path} is truncated: its header promises {expected} bytes, the file has "
                f"{self._identity[2]}; re-create or re-copy it"
            )

    def _opened_identity(self, f) -> tuple:
        """The identity (see :func:`_identity`) of the file `f` whose header was read."""
        return _identity(os.fstat(f.fileno()))

    def _current_identity(self, file: Optional[str] = None) -> tuple:
        return _identity(self._file.fstat())  # the file opened, even if its name now holds another

    def _pread(self, view: memoryview, offset: int) -> int:
        """Read ``len(view)`` bytes at `offset`; return the bytes read (fewer only at the end)."""
        return self._file.read(view, offset)

    def read_into(self, start: int, out: np.ndarray) -> None:
        rows = out.shape[0]
        columns = elements(self.row_shape)
        if self._fortran and columns > 1:
            got = self._read_columns(start, out)
        else:
            got = self._read_at(out, self._offset + start * self._row_bytes)
        self._check_current()
        if not got:
            raise DataError(f"{self.path} ended early, before row {start + rows}; it was cut while being read")

    @property
    def reads_pieces(self) -> bool:
        # A C-order row is one run of bytes; a Fortran-order row is strided by the
        # number of rows, so part of it costs reading every row: read whole.
        return not self._fortran or elements(self.row_shape) <= 1

    def read_piece(self, row: int, e0: int, out: np.ndarray) -> None:
        got = self._read_at(out, self._offset + row * self._row_bytes + e0 * self.dtype.itemsize)
        self._check_current()
        if not got:
            raise DataError(f"{self.path} ended early, inside row {row}; it was cut while being read")

    def _read_at(self, out: np.ndarray, offset: int) -> bool:
        """Fill `out` (C-contiguous) with the file's bytes at `offset`, through a staging
        buffer of the file's dtype when `out` has another; False on a short read."""
        target = out if out.dtype == self.dtype else self._staged(out.shape)
        view = memoryview(target.reshape(-1).view(np.uint8))
        got = self._pread(view, offset) == len(view)
        if got and target is not out:
            out[...] = target
        return got

    def _staged(self, shape: tuple[int, ...]) -> np.ndarray:
        size = elements(shape)
        if self._staging is None or self._staging.size < size:  # pieces of a row reuse one
            self._staging = np.empty(size, self.dtype)
        return self._staging[:size].reshape(shape)

    def _read_columns(self, start: int, out: np.ndarray) -> bool:
        """Rows of a Fortran-order file: column c's rows are contiguous at c * rows."""
        rows, columns, item = out.shape[0], elements(self.row_shape), self.dtype.itemsize
        if self._strips is None or self._strips.shape != (columns, rows):
            self._strips = np.empty((columns, rows), self.dtype)
        raw = self._strips.view(np.uint8).reshape(columns, rows * item)
        for column in range(columns):
            position = self._offset + (column * self.shape[0] + start) * item
            if self._pread(memoryview(raw[column]), position) != rows * item:
                return False
        # the strips are the transposed block: axes reversed, rows last
        out[...] = self._strips.reshape(self.row_shape[::-1] + (rows,)).T
        return True

    def close(self) -> None:
        self._file.close()
