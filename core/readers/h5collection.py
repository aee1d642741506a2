"""HDF5 collections: ``file.h5:/group`` (every dataset under it) and ``file.h5:/train/*`` (a glob).

ESPnet1 and many feature extractors write one dataset per utterance. Here
the datasets are sequences in sorted key order, their first axis the
frames. Every dataset is reached through :mod:`normstats.hdf5_policy` (its
links, virtual sources and declared size checked, as for a single dataset);
the file is opened once per read, each sequence's dataset in it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from typing import Any, Optional

import numpy as np

from .. import hdf5_policy
from ..errors import DataError, NormstatsError, UsageError
from ..limits import available_memory
from .base import _identity
from .h5dataset import _h5_stat
from .base import SequenceSource

GLOB = set("*?[")


def is_glob(name: str) -> bool:
    return bool(GLOB & set(name))


class H5Collection(SequenceSource):
    """The datasets of an HDF5 group or glob as one sequence collection.

    Parameters
    ----------
    path : str
    name : str
        A group (``/`` for the whole file) or a glob over dataset paths.
    allow_external : bool
        As for one dataset: links and virtual sources outside the folder.
    """

    def __init__(self, path: str, name: str, *, allow_external: bool = False) -> None:
        self.path, self.dataset, self.name = path, name, f"{path}:{name}"
        self._open: Optional[Any] = None  # (file path, h5py.File) being read
        self._current: Optional[tuple[int, Any]] = None  # (sequence, dataset) being read
        try:
            members = self._members(name, allow_external)
            self._index(members, allow_external)
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            if isinstance(error, NormstatsError):
                raise
            raise DataError(f"{path} is a damaged HDF5 file ({error})") from None

    def _members(self, name: str, allow_external: bool) -> list[tuple[str, str]]:
        """(key, name in the file) of the collection's datasets, sorted by key."""
        if is_glob(name):
            pattern = name.lstrip("/")
            found = [(n, "/" + n) for n in self._walk(self.path, "/") if fnmatch.fnmatchcase(n, pattern)]
            if not found:
                raise UsageError(f"{self.name} matches no dataset of {self.path}")
            return sorted(found)
        located = hdf5_policy.locate(self.path, name, allow_external=allow_external, display=self.name)
        prefix = located.name.rstrip("/")
        found = [(n, f"{prefix}/{n}") for n in self._walk(located.file, located.name)]
        if not found:
            raise UsageError(f"{self.name} is a group without datasets")
        self._group_file = located.file
        return sorted(found)

    def _walk(self, file: str, group: str) -> list[str]:
        """Paths (relative to `group`) of what may be datasets under it: hard-linked
        datasets, and links, which :meth:`_index` follows under the policy."""
        import h5py

        names: list[str] = []
        with hdf5_policy.open_file(file) as f:
            def walk(node: Any, prefix: str) -> None:
                for member in node:
                    link = node.get(member, getlink=True)
                    if isinstance(link, h5py.HardLink):
                        obj = node[member]
                        if isinstance(obj, h5py.Group):
                            walk(obj, f"{prefix}{member}/")
                            continue
                    names.append(f"{prefix}{member}")
            walk(f[group], "")
        return names

    def _index(self, members: list[tuple[str, str]], allow_external: bool) -> None:
        """Locate every member under the policy, each file opened once, and record its shape."""
        file = getattr(self, "_group_file", self.path)
        found = hdf5_policy.locate_many(file, [member for _, member in members], allow_external=allow_external,
                                        display=self.name)
        self._located, self._caches, self._files = [], [], {}
        keys, lengths, dtypes, row_shape = [], [], [], None
        memory = available_memory()
        with contextlib.ExitStack() as stack:
            handles: dict = {}
            for (key, _), located in zip(members, found):
                display = f"{self.name} (dataset {key!r})"
                if not located.is_dataset:
                    raise DataError(f"{display} is a link to a group; a collection's members must be datasets")
                if located.file not in handles:
                    handles[located.file] = stack.enter_context(hdf5_policy.open_file(located.file))
                    self._files[located.file] = _identity(os.stat(located.file))
                dataset = hdf5_policy.open_in(handles[located.file], located)
                shape = tuple(dataset.shape or ())
                if not shape:
                    raise DataError(f"{display} is a scalar; each sequence needs a frame axis")
                if row_shape is not None and shape[1:] != row_shape:
                    raise DataError(f"{display} has frames of shape {shape[1:]} but {keys[0]!r} has "
                                    f"{row_shape}; every sequence of a collection must agree")
                row_shape = shape[1:]
                self._caches.append(hdf5_policy.chunk_cache(dataset, memory))
                self._located.append(located)
                keys.append(key)
                lengths.append(shape[0])
                dtypes.append(dataset.dtype)
        self._identity = self._files[self._located[0].file]
        self._set_sequences(keys, lengths, row_shape, np.result_type(*dtypes))

    def read_sequence(self, index: int, begin: int, end: int, out: np.ndarray) -> None:
        located = self._located[index]
        if self._current is None or self._current[0] != index:
            if self._open is None or self._open[0] != located.file:
                self.close()
                with hdf5_policy._h5_errors(located):
                    import h5py

                    self._open = (located.file, h5py.File(located.file, "r"))
            self._current = (index, hdf5_policy.open_in(self._open[1], located, cache=self._caches[index]))
        try:
            self._current[1].read_direct(out, source_sel=np.s_[begin:end])
        except (OSError, RuntimeError, ValueError) as error:
            raise DataError(f"{self.where(index)}: frames {begin}..{end - 1} cannot be read ({error}); the file "
                            "is damaged or its external data is missing") from None
        if _identity(_h5_stat(self._open[1], located.file)) != self._files[located.file]:
            raise DataError(f"{located.file} changed while it was read ({self.where(index)}); nothing was "
                            "written: run again once no other program writes to it")

    def where(self, index: int) -> str:
        return f"dataset {self.keys[index]!r} of {self.name}"

    def close(self) -> None:
        self._current = None
        if self._open is not None:
            self._open[1].close()
            self._open = None


def is_collection(path: str, name: str, allow_external: bool) -> bool:
    """Whether ``path:name`` names a collection (a glob, or a group given by its
    absolute name, ``/group``) rather than one dataset. A group named without the
    leading slash stays an error that shows both readings."""
    if is_glob(name):
        return True
    if not name.startswith("/"):
        return False
    try:
        located = hdf5_policy.locate(path, name, allow_external=allow_external)
    except hdf5_policy.MissingName:
        return False  # H5Source reports it, listing the datasets there are
    return not located.is_dataset
