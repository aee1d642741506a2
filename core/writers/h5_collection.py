"""HDF5 collections as outputs: ``out.h5:/`` or ``out.h5:/GROUP``, one dataset per key.

The layout of an input collection is kept: sequence ``KEY`` becomes the
dataset ``GROUP/KEY`` (a key ``spk1/utt1`` makes the group ``spk1``), so
``out.h5:/GROUP`` reads back as the same collection. Uncompressed, the
datasets are contiguous and allocated before any frame is written, and
frames go in with ``pwrite`` (:mod:`.rows`), as for array outputs;
compressed (``gzip`` / ``lzf``), they are chunked and written by HDF5.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DataError, UsageError
from .atomic import atomic_path
from .h5_chunked import chunked_dataset, finish, h5_write_error, open_for_writing
from .rows import _layout

COMPRESSIONS = ("gzip", "lzf")


def dataset_names(group: str, keys: Sequence[str]) -> list[str]:
    """The dataset of each key under `group`.

    Raises
    ------
    DataError
        A key that is no HDF5 path (empty parts, ``.`` or ``..``).
    """
    prefix = group.strip("/")
    names = []
    for key in keys:
        parts = key.strip("/").split("/")
        if not key.strip("/") or any(part in ("", ".", "..") for part in parts):
            raise DataError(f"key {key!r} cannot name an HDF5 dataset (an empty, '.' or '..' part); "
                            "write a Kaldi archive (ark,scp:OUT.ark,OUT.scp) instead")
        names.append("/".join(([prefix] if prefix else []) + parts))
    return names


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
        self.path, self.compression = path, compression
        self.names = dataset_names(group, keys)
        self.shapes = [(int(n),) + tuple(row_shape) for n in lengths]
        self.dtype = np.dtype(dtype)
        self._attrs = dict(attrs or {})

    def __enter__(self) -> "H5CollectionWriter":
        self._context = atomic_path(self.path)
        self._temporary = self._context.__enter__()
        self._file = None
        try:
            if self.compression is None:
                regions = _layout(self._temporary, ".h5", {name: (shape, self.dtype)
                                                          for name, shape in zip(self.names, self.shapes)},
                                  self._attrs)
                self._regions = [regions[name] for name in self.names]
            else:
                self._file = open_for_writing(self._temporary, self._attrs)
                self._datasets: list[Any] = [None] * len(self.names)
        except BaseException as error:
            if self._file is not None:
                self._file.close()
            if not self._context.__exit__(type(error), error, error.__traceback__):
                raise
        return self

    def write(self, index: int, begin: int, frames: np.ndarray) -> None:
        """Frames ``begin:begin + len(frames)`` of sequence `index`."""
        if self.compression is None:
            self._regions[index].write(begin, frames)
            return
        try:
            if self._datasets[index] is None:
                self._datasets[index] = self._create(index)
            self._datasets[index][begin:begin + frames.shape[0]] = frames
        except (OSError, RuntimeError, ValueError) as error:
            raise h5_write_error(error, self._temporary) from None
        self._file.check()

    def _create(self, index: int) -> Any:
        return chunked_dataset(self._file.file, self.names[index], self.shapes[index], self.dtype, self.compression)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.compression is None:
            self._context.__exit__(exc_type, exc, tb)
            return
        failure = None
        if exc_type is None:
            try:  # sequences without frames are datasets too
                for index in [i for i, dataset in enumerate(self._datasets) if dataset is None]:
                    self._create(index)
            except (OSError, RuntimeError, ValueError) as error:
                failure = h5_write_error(error, self._temporary)
        finish(self, exc_type, exc, tb, failure=failure)
