"""One HDF5 dataset (``file.h5[:NAME]``), read with ``read_direct``."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .. import hdf5_policy
from ..errors import DataError, NormstatsError, UsageError
from ..limits import available_memory
from .base import ArraySource, _identity
from .h5_storage import storage_of


class H5Source(ArraySource):
    """One dataset of an HDF5 file, read with ``read_direct``.

    The dataset is reached through :mod:`normstats.hdf5_policy` (links
    followed and checked there) and opened in the file that holds its data,
    with a chunk cache that holds the compressed chunks a block spans.
    """

    def __init__(self, path: str, dataset: Optional[str], *, allow_external: bool = False) -> None:
        self.path = path
        self._handles: Optional[tuple] = None
        try:
            self._open(dataset, allow_external)
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            if isinstance(error, NormstatsError):
                raise
            raise DataError(f"{path} is a damaged HDF5 file ({error})") from None

    def _open(self, dataset: Optional[str], allow_external: bool) -> None:
        """Find and check the dataset; h5py errors here mean a damaged file."""
        path = self.path
        with hdf5_policy.open_file(path) as f:
            name = dataset if dataset is not None else self._only_dataset(f)
            self.name, self.dataset = f"{path}:{name}", name
            try:
                located = hdf5_policy.locate(path, name, allow_external=allow_external, display=self.name)
            except hdf5_policy.MissingName:
                raise UsageError(
                    f"{path} has no dataset {name!r}; it has: {', '.join(self._datasets(f)) or 'none'}"
                ) from None
            if not located.is_dataset:
                inside = ", ".join(self._datasets(f, f[located.name])) if located.file == path else ""
                raise UsageError(f"{self.name} is a group, not a dataset; it holds: {inside or 'no datasets'} "
                                 f"(to read all of them as one collection, give {path}:/{located.name.lstrip('/')})")
        self._located = located
        file, obj = hdf5_policy.open_dataset(located)
        try:
            if obj.shape is None:
                raise DataError(f"{self.name} is an empty dataset (no shape)")
            self.shape, self.dtype = tuple(obj.shape), obj.dtype
            self._cache = hdf5_policy.chunk_cache(obj, available_memory())
            self.storage = storage_of(obj)  # what the readers around h5py need (never opened again)
            self._identity = _identity(os.stat(located.file))
        finally:
            file.close()
        self._validate()

    def _datasets(self, file, group=None) -> list[str]:
        import h5py

        names: list[str] = []
        (group or file).visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        return names

    def _only_dataset(self, file) -> str:
        names = self._datasets(file)
        if len(names) != 1:
            raise UsageError(
                f"{self.path} holds {len(names)} datasets ({', '.join(names) or 'none'}); "
                f"name one as {self.path}:NAME or with --dataset"
            )
        return names[0]

    def files(self) -> list[str]:
        """The file named, and every file its links, virtual sources and external storage lead to."""
        return list(dict.fromkeys([self.path, *self._located.files]))

    def read_into(self, start: int, out: np.ndarray) -> None:
        self._read(np.s_[start : start + out.shape[0]], out, f"rows {start}..{start + out.shape[0] - 1}")

    reads_pieces = True  # a piece is a hyperslab

    def read_piece(self, row: int, e0: int, out: np.ndarray) -> None:
        from ..row_pieces import piece_shape, piece_slices

        e1 = e0 + out.shape[0]
        index = (slice(row, row + 1),) + piece_slices(self.row_shape, e0, e1)
        self._read(index, out.reshape((1,) + piece_shape(self.row_shape, e0, e1)),
                   f"row {row} (elements {e0}..{e1 - 1})")

    def _read(self, selection: tuple, out: np.ndarray, what: str) -> None:
        if self._handles is None:
            self._handles = hdf5_policy.open_dataset(self._located, cache=self._cache)
        file, dataset = self._handles
        try:
            dataset.read_direct(out, source_sel=selection)
        except (OSError, RuntimeError, ValueError) as error:
            raise DataError(
                f"{self.name}: {what} cannot be read ({error}); "
                "the file is damaged or its external data is missing"
            ) from None
        # checked after the read: HDF5 returns zeros for what a truncation cut off
        self._check_unchanged(_h5_stat(file, self._located.file), self._located.file)

    def close(self) -> None:
        if self._handles is not None:
            self._handles[0].close()
            self._handles = None


def _h5_stat(file, path: str) -> os.stat_result:
    """The stat of an open HDF5 file, by its descriptor when the driver has one."""
    try:
        return os.fstat(file.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, AttributeError):
        return os.stat(path)
