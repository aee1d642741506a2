"""HDF5 collections as outputs: ``out.h5:/`` or ``out.h5:/GROUP``, one dataset per key.

The layout of an input collection is kept: sequence ``KEY`` becomes the
dataset ``GROUP/KEY`` (a key ``spk1/utt1`` makes the group ``spk1``), so
``out.h5:/GROUP`` reads back as the same collection. Uncompressed, the
datasets are contiguous and allocated before any frame is written, and
frames go in with ``pwrite`` (:mod:`.rows`), as for array outputs;
compressed (``gzip`` / ``lzf``), they are chunked and written by HDF5.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import DataError, UsageError
from .atomic import atomic_path
from .h5_chunked import chunked_dataset, finish, open_for_writing
from .h5_layout import h5_write_error
from .rows import RowRegion, sequences_layout

COMPRESSIONS = ("gzip", "lzf")


def dataset_names(group: str, keys: Iterable[str]) -> Iterator[str]:
    """The dataset of each key under `group`, one at a time.

    Raises
    ------
    DataError
        A key that is no HDF5 path (empty parts, ``.`` or ``..``).
    """
    prefix = group.strip("/")
    for key in keys:
        parts = key.strip("/").split("/")
        if not key.strip("/") or any(part in ("", ".", "..") for part in parts):
            raise DataError(f"key {key!r} cannot name an HDF5 dataset (an empty, '.' or '..' part); "
                            "write a Kaldi archive (ark,scp:OUT.ark,OUT.scp) instead")
        yield "/".join(([prefix] if prefix else []) + parts)


def check_compression(compression: Optional[str]) -> None:
    if compression is not None and compression not in COMPRESSIONS:
        raise UsageError(f"--compression {compression}: choose one of {', '.join(COMPRESSIONS)}")


class H5CollectionWriter:
    """Sequences written as datasets of one HDF5 file, atomically.

    Use as a context manager; :meth:`write` takes any piece of a sequence's
    frames, in any order, so memory is bounded by the piece.

    Parameters
    ----------
    path : str
        The HDF5 file.
    group : str
        Where the keys go (``/``: the file's root).
    keys, lengths : sequence
        Every sequence's key and frame count.
    row_shape : tuple of int
    dtype : numpy dtype
    compression : {None, 'gzip', 'lzf'}
    attrs : dict, optional
        Attributes of the file (metadata).
    """

    def __init__(self, path: str, group: str, keys: Sequence[str], lengths: Sequence[int],
                 row_shape: tuple[int, ...], dtype: np.dtype, *, compression: Optional[str] = None,
                 attrs: Optional[dict[str, Any]] = None) -> None:
        check_compression(compression)
        self.path, self.compression, self.group, self.keys = path, compression, group, keys
        # Arrays and the keys as given, not a name and shape per sequence (10^5-10^7 of them)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.dtype = np.dtype(dtype)
        self._attrs = dict(attrs or {})
        for _ in dataset_names(group, keys):  # every key checked before any file is made
            pass

    def __enter__(self) -> "H5CollectionWriter":
        self._context = atomic_path(self.path)
        self._temporary = self._context.__enter__()
        self._file = None
        try:
            if self.compression is None:
                self._offsets, row_bytes = sequences_layout(
                    self._temporary, dataset_names(self.group, self.keys), self.lengths, self.row_shape,
                    self.dtype, self._attrs)
                # one region over the file: a sequence's frames start at its dataset's offset
                self._region = RowRegion(self._temporary, 0, row_bytes, self.dtype.newbyteorder("=").str)
            else:
                self._file = open_for_writing(self._temporary, self._attrs)
                self._made = np.zeros(len(self.lengths), bool)
                self._current: Optional[tuple[int, Any]] = None  # the dataset being written, and its index
        except BaseException as error:
            if self._file is not None:
                self._file.close()
            if not self._context.__exit__(type(error), error, error.__traceback__):
                raise
        return self

    def write(self, index: int, begin: int, frames: np.ndarray) -> None:
        """Frames ``begin:begin + len(frames)`` of sequence `index`."""
        if self.compression is None:
            self._region.write_at(int(self._offsets[index]) + begin * self._region.row_bytes, frames)
            return
        try:
            if self._current is None or self._current[0] != index:
                self._current = None  # (closes the one before: sequences are written in turn)
                self._current = (index, self._dataset(index))
            self._current[1][begin:begin + frames.shape[0]] = frames
        except (OSError, RuntimeError, ValueError) as error:
            raise h5_write_error(error, self._temporary) from None
        self._file.check()

    def _dataset(self, index: int) -> Any:
        """Sequence `index`'s dataset, made on its first frames."""
        name, = dataset_names(self.group, [self.keys[index]])
        if self._made[index]:
            return self._file.file[name]
        self._made[index] = True
        return chunked_dataset(self._file.file, name, (int(self.lengths[index]),) + self.row_shape, self.dtype,
                               self.compression)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.compression is None:
            self._context.__exit__(exc_type, exc, tb)
            return
        failure = None
        if exc_type is None:
            try:  # sequences without frames are datasets too
                self._current = None
                for index in np.flatnonzero(~self._made).tolist():
                    self._dataset(index)
            except (OSError, RuntimeError, ValueError) as error:
                failure = h5_write_error(error, self._temporary)
        finish(self, exc_type, exc, tb, failure=failure)
