"""Chunked, compressed HDF5 outputs (``--compression gzip|lzf``), written by HDF5.

Compressed sizes are known only once written, so these datasets cannot be
laid out in advance like the contiguous ones of :mod:`.rows`; HDF5 writes
them, through a file object that keeps a refused write (a full disk) from
HDF5 and raises it as one OSError once the file is closed.
"""

from __future__ import annotations

import errno
import io
from typing import Any, Optional

import numpy as np

from ..limits import elements
from .atomic import atomic_path
from .base import split_output
from .h5_layout import h5_write_error, write_attrs

CHUNK_BYTES = 1 << 20  # HDF5's advice: chunks of about 1 MiB, and whole rows


class _NoFailingWrites(io.RawIOBase):
    """The file HDF5 writes a compressed output through (h5py's file-object driver).

    A write the system refuses (a full disk, the file-size limit) is kept
    from HDF5, which does not recover from one (it crashed the process as it
    closed the file): the failure is recorded, later writes are dropped, and
    :meth:`check` raises it once HDF5 has closed the file, which is then
    thrown away whole.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._file = open(path, "r+b", buffering=0)
        self.failure: Optional[OSError] = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(buffer)

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self.failure is None:
            try:
                written = 0
                while written < size:
                    written += self._file.write(memoryview(data).cast("B")[written:])
            except OSError as error:
                self.failure = error
        return size

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size: Optional[int] = None) -> int:
        if self.failure is None:
            try:
                return self._file.truncate(size)
            except OSError as error:
                self.failure = error
        return self._file.tell() if size is None else size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()
        super().close()

    def check(self, path: str) -> None:
        """Raise the write that failed, if one did."""
        if self.failure is not None:
            raise OSError(self.failure.errno or errno.EIO, self.failure.strerror or str(self.failure), path)


class H5Output:
    """A new HDF5 file written by HDF5 through :class:`_NoFailingWrites`."""

    def __init__(self, path: str, attrs: Optional[dict[str, Any]] = None) -> None:
        import h5py

        self.path = path
        self._raw = _NoFailingWrites(path)
        try:
            self.file = h5py.File(self._raw, "w")
            write_attrs(self.file, attrs or {})
        except (OSError, RuntimeError, ValueError) as error:
            self._raw.close()
            raise h5_write_error(error, path) from None

    def check(self) -> None:
        """Raise the write that failed, if one did (the rest of the work would be lost)."""
        self._raw.check(self.path)

    def close(self) -> None:
        """Close the file; raise the write that failed, if one did."""
        try:
            self.file.close()
        finally:
            self._raw.close()
        self.check()


def open_for_writing(path: str, attrs: Optional[dict[str, Any]] = None) -> H5Output:
    """A new HDF5 file at `path` (an empty temporary) with `attrs` as its metadata."""
    return H5Output(path, attrs)


def chunked_dataset(file: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, compression: str,
                    chunks: Optional[tuple[int, ...]] = None) -> Any:
    """A dataset compressed in chunks of whole rows, or of `chunks` (an empty one needs no chunks)."""
    if not shape[0]:
        return file.create_dataset(name, shape=shape, dtype=dtype)
    rows = max(1, min(shape[0], CHUNK_BYTES // max(1, elements(shape[1:]) * np.dtype(dtype).itemsize)))
    return file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks or (rows,) + tuple(shape[1:]),
                               compression=compression, shuffle=compression == "gzip")


class CompressedArrayWriter:
    """An array of known shape written block by block to a compressed HDF5 dataset, atomically.

    The compressed counterpart of :class:`normstats.writers.rows.ArrayWriter`
    (same parameters, plus `compression`).
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, dataset: str = "data", *,
                 compression: str, chunks: Optional[tuple[int, ...]] = None) -> None:
        path, name = split_output(path)
        self.path, self.dataset, self.compression = path, name or dataset, compression
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.chunks = chunks  # rows written in pieces: the pieces' shape (one chunk each)
        self._rows_written = 0

    def __enter__(self) -> "CompressedArrayWriter":
        self._context = atomic_path(self.path)
        self._temporary = self._context.__enter__()
        try:
            self._file = open_for_writing(self._temporary)
            self._data = chunked_dataset(self._file.file, self.dataset, self.shape, self.dtype, self.compression,
                                         self.chunks)
        except BaseException as error:
            if getattr(self, "_file", None) is not None:
                self._file.close()
            if not self._context.__exit__(type(error), error, error.__traceback__):
                raise
        return self

    def write(self, block: np.ndarray) -> None:
        """Append the next rows."""
        self._store(slice(self._rows_written, self._rows_written + block.shape[0]), block)
        self._rows_written += block.shape[0]

    def write_piece(self, e0: int, piece: np.ndarray) -> None:
        """As :meth:`normstats.writers.rows.ArrayWriter.write_piece` (with `chunks`
        the pieces' shape, each piece is one chunk, compressed once)."""
        from ..row_pieces import piece_shape, piece_slices

        e1 = e0 + piece.size
        index = (slice(self._rows_written, self._rows_written + 1),) + piece_slices(self.shape[1:], e0, e1)
        self._store(index, piece.reshape((1,) + piece_shape(self.shape[1:], e0, e1)))

    def end_row(self) -> None:
        """The next row is written (in pieces, by :meth:`write_piece`)."""
        self._rows_written += 1

    def _store(self, index: Any, values: np.ndarray) -> None:
        try:
            self._data[index] = values
        except (OSError, RuntimeError, ValueError) as error:
            raise h5_write_error(error, self._temporary) from None
        self._file.check()

    def __exit__(self, exc_type, exc, tb) -> None:
        short = None if self._rows_written == self.shape[0] else \
            RuntimeError(f"wrote {self._rows_written} of {self.shape[0]} rows")
        finish(self, exc_type, exc, tb, failure=short)


def finish(writer: Any, exc_type, exc, tb, *, failure: Optional[BaseException] = None) -> None:
    """Close `writer._file` and leave `writer._context` (an :func:`atomic_path`): the
    output is placed if all went well; else its temporary is removed and the error of
    the ``with`` block, or `failure` (the writer's own, at its end), is raised."""
    try:
        writer._file.close()
    except (OSError, RuntimeError, ValueError) as error:
        failure = failure or h5_write_error(error, writer._temporary)
    if exc_type is not None:
        writer._context.__exit__(exc_type, exc, tb)  # False: the block's error goes on
        return
    if failure is None:
        writer._context.__exit__(None, None, None)
        return
    if not writer._context.__exit__(type(failure), failure, None):
        raise failure
