"""Contiguous HDF5 datasets read with ``pread`` at their offset in the file.

A contiguous, unfiltered dataset in native byte order is one run of bytes of
its file, like a `.npy` file's data: two reader threads can then read it at
once (h5py serializes its own calls), with no HDF5 buffers in between. The
dataset was opened and checked through :mod:`normstats.hdf5_policy` by its
:class:`~normstats.readers.h5dataset.H5Source` (external and virtual data refused,
declared bytes inside the file); external storage is never taken here. After
every read the file must still be the one opened, and a short read is an
error: a file cut under the run stops it cleanly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import DataError
from .h5_storage import plain_storage
from .reopened_file import ReopenedFile


class ContiguousReader:
    """Rows of one contiguous dataset of an H5Source, by ``pread`` (safe from several threads)."""

    def __init__(self, source, offset: int) -> None:
        self.source = source
        self.offset = offset
        self.row_bytes = int(np.prod(source.shape[1:], dtype=np.int64)) * source.dtype.itemsize
        self._file = ReopenedFile(source._located.file, source.name)

    @classmethod
    def of(cls, source, dtype: np.dtype) -> Optional["ContiguousReader"]:
        """A reader for `source` if it is a contiguous, unfiltered, non-external dataset
        read as `dtype` without conversion; else None (from what the source read of its
        storage when it opened the dataset: the file is not opened again)."""
        storage = plain_storage(source, dtype)
        if storage is None or storage.layout != "contiguous" or storage.offset is None:
            return None
        return cls(source, storage.offset)

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with rows ``start:start+len(out)``."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = self._file.read(view, self.offset + start * self.row_bytes)
        self.source._check_unchanged(self._file.fstat(), self.source._located.file)
        if got != len(view):
            raise DataError(f"{self.source.name} ended early, before row {start + out.shape[0]}; it was cut "
                            "while being read")

    def close(self) -> None:
        self._file.close()
