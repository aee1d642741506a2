"""HDF5 collections: ``file.h5:/group`` (every dataset under it) and ``file.h5:/train/*`` (a glob).

ESPnet1 and many feature extractors write one dataset per utterance. Here
the datasets are sequences in sorted key order, their first axis the
frames. The file is walked once and each member opened once while indexing
(see :class:`H5Collection`): a contiguous member stored in the file itself
is then read by ``pread`` at its offset, with no HDF5 call per read; every
other member is reached through :mod:`normstats.hdf5_policy` (its links,
virtual sources and declared size checked, as for a single dataset) and
read with h5py.
"""

from __future__ import annotations

import array
import contextlib
import fnmatch
import os
from typing import Any, Optional

import numpy as np

from .. import hdf5_policy
from ..errors import DataError, NormstatsError, UsageError
from ..limits import available_memory, elements
from .base import KeyTable, KeyTableBuilder, SequenceSource, _identity, check_index_memory
from .h5dataset import _h5_stat
from .reopened_file import ReopenedFile

GLOB = set("*?[")


# Counted as the walk goes, not up front: counting a group's links first (H5Gget_num_objs, or
# a first pass) made the walk's dataset opens take ~50 MB more for 100 000 members.
INDEX_CHECK_EVERY = 65536


def is_glob(name: str) -> bool:
    return bool(GLOB & set(name))


class H5Collection(SequenceSource):
    """The datasets of an HDF5 group or glob as one sequence collection.

    The file is walked once with h5py's low-level calls (each dataset opened
    once, its shape, type and file offset noted), and the index is arrays:
    keys in a :class:`KeyTable`, lengths, offsets, type numbers. A member
    hard-linked in the file, contiguous and stored whole inside it (HDF5
    has no file offset for chunked, compact, virtual or externally stored
    data) holds nothing the outside-data policy refuses: it is read by
    ``pread`` at its offset, as a `.npy` file is. Every other member (a
    link, chunked or filtered data, a virtual dataset, external storage) is
    reached through :mod:`normstats.hdf5_policy` and read with h5py.

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
        self._open: Optional[Any] = None  # (file path, h5py.File) being read by h5py
        self._current: Optional[tuple[int, Any]] = None  # (sequence, dataset) being read by h5py
        try:
            self._index(name, allow_external)
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            if isinstance(error, NormstatsError):
                raise
            raise DataError(f"{path} is a damaged HDF5 file ({error})") from None

    def _index(self, name: str, allow_external: bool) -> None:
        if is_glob(name):
            file, group, pattern = self.path, "/", name.lstrip("/")
        else:
            located = hdf5_policy.locate(self.path, name, allow_external=allow_external, display=self.name)
            file, group, pattern = located.file, located.name, None
        self._group_file, self._prefix = file, group.rstrip("/") + "/"
        self._file = ReopenedFile(file)  # the group's file, for members read by pread
        self._files = {file: _identity(os.stat(file))}
        self._identity = self._files[file]
        with hdf5_policy.open_file(file) as f:
            scan = _Scan(f, group, pattern, os.path.getsize(file), self.name)
        if not scan.keys:
            raise UsageError(f"{self.name} matches no dataset of {self.path}" if pattern is not None else
                             f"{self.name} is a group without datasets")
        permute = scan.keys.sorted_order()
        keys = scan.keys.take(permute)
        del scan.keys
        arrays = {field: np.frombuffer(getattr(scan, field), dtype)[permute] for field, dtype in
                  (("lengths", np.int64), ("offsets", np.int64), ("shape_of", np.int32), ("dtype_of", np.int32))}
        self._offsets, self._dtype_of = arrays["offsets"], arrays["dtype_of"]
        self._dtypes, shapes = scan.dtypes, arrays["shape_of"]
        self._linked: dict[int, tuple[hdf5_policy.Located, tuple[int, int]]] = {}
        slow = np.flatnonzero(self._offsets < 0)
        if len(slow):
            self._locate(keys, slow, arrays["lengths"], shapes, scan, allow_external)
        mismatch = np.flatnonzero(shapes != shapes[0])
        if len(mismatch):
            bad = int(mismatch[0])
            raise DataError(f"{self.name} (dataset {keys[bad]!r}) has frames of shape "
                            f"{scan.shapes[shapes[bad]]} but {keys[0]!r} has {scan.shapes[shapes[0]]}; every "
                            "sequence of a collection must agree")
        self._set_sequences(keys, arrays["lengths"], scan.shapes[shapes[0]], np.result_type(*self._dtypes))
        self._row_elements = elements(self.row_shape)

    def _locate(self, keys: KeyTable, slow: np.ndarray, lengths: np.ndarray, shapes: np.ndarray, scan: "_Scan",
                allow_external: bool) -> None:
        """The members not read by pread: found under the policy, each file opened once."""
        found = hdf5_policy.locate_many(self._group_file, [self._prefix + keys[int(i)] for i in slow],
                                        allow_external=allow_external, display=self.name)
        memory = available_memory()
        with contextlib.ExitStack() as stack:
            handles: dict = {}
            for index, located in zip(slow.tolist(), found):
                display = f"{self.name} (dataset {keys[index]!r})"
                if not located.is_dataset:
                    raise DataError(f"{display} is a link to a group; a collection's members must be datasets")
                if located.file not in handles:
                    handles[located.file] = stack.enter_context(hdf5_policy.open_file(located.file))
                # every file the member's resolution met (virtual sources, link holders) is read too
                for file in (located.file, *located.files):
                    if file not in self._files:
                        self._files[file] = _identity(os.stat(file))
                dataset = hdf5_policy.open_in(handles[located.file], located)
                shape = tuple(dataset.shape or ())
                if not shape:
                    raise DataError(f"{display} is a scalar; each sequence needs a frame axis")
                lengths[index], shapes[index] = shape[0], scan.shape_number(shape[1:])
                self._dtype_of[index] = scan.dtype_number(dataset.dtype)
                self._linked[index] = (located, hdf5_policy.chunk_cache(dataset, memory))

    def read_sequence(self, index: int, begin: int, end: int, out: np.ndarray) -> None:
        offset = int(self._offsets[index])
        if offset >= 0:
            self._pread(index, offset, begin, end, out)
            return
        located, cache = self._linked[index]
        if self._current is None or self._current[0] != index:
            if self._open is None or self._open[0] != located.file:
                self._close_h5()
                with hdf5_policy._h5_errors(located):
                    import h5py

                    self._open = (located.file, h5py.File(located.file, "r"))
            self._current = (index, hdf5_policy.open_in(self._open[1], located, cache=cache))
        try:
            self._current[1].read_direct(out, source_sel=np.s_[begin:end])
        except (OSError, RuntimeError, ValueError) as error:
            raise DataError(f"{self.where(index)}: frames {begin}..{end - 1} cannot be read ({error}); the file "
                            "is damaged or its external data is missing") from None
        self._check_file(_h5_stat(self._open[1], located.file), located.file, index)

    def _pread(self, index: int, offset: int, begin: int, end: int, out: np.ndarray) -> None:
        """Frames of a contiguous member, read at their offset in the group's file."""
        dtype = self._dtypes[self._dtype_of[index]]
        into = out if dtype == out.dtype and out.flags.c_contiguous else np.empty(out.shape, dtype)
        view = memoryview(into.reshape(-1).view(np.uint8))
        got = self._file.read(view, offset + begin * self._row_elements * dtype.itemsize,
                              lambda: self.where(index))
        self._check_file(self._file.fstat(), self._group_file, index)
        if got != len(view):
            raise DataError(f"{self.where(index)} ends early, before frame {end}; {self._group_file} was cut "
                            "while being read")
        if into is not out:
            out[...] = into

    def _check_file(self, info: os.stat_result, file: str, index: int) -> None:
        if _identity(info) != self._files[file]:
            raise DataError(f"{file} changed while it was read ({self.where(index)}); nothing was "
                            "written: run again once no other program writes to it")

    def where(self, index: int) -> str:
        return f"dataset {self.keys[index]!r} of {self.name}"

    def _close_h5(self) -> None:
        self._current = None
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def close(self) -> None:
        self._close_h5()
        self._file.close()

    def __getstate__(self) -> dict:
        # open handles stay with this process (the pread file drops its descriptor itself); a copy
        # opens its own at its first read
        return {**vars(self), "_open": None, "_current": None}


class _Scan:
    """One walk over a group with h5py's low-level calls: the members' keys (paths
    under the group), lengths, offsets (-1: read with h5py under the policy), and
    numbers into the frame shapes and dtypes seen.

    A member gets an offset only if it is a hard link to a dataset of this
    file whose data HDF5 places at one offset (contiguous: never filtered,
    never external, never virtual), with its declared bytes inside the
    file; anything else is left to :func:`normstats.hdf5_policy.locate_many`,
    which also gives the message for a member the policy refuses.
    """

    def __init__(self, file: Any, group: str, pattern: Optional[str], size: int, display: str) -> None:
        import h5py

        self.lengths, self.offsets = array.array("q"), array.array("q")
        self.shape_of, self.dtype_of = array.array("i"), array.array("i")
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[np.dtype] = []
        self._size, self.pattern = size, pattern
        self._gid = h5py.h5g.open(file.id, group.encode())
        self._display = display
        self._error: Optional[BaseException] = None
        self._keys = KeyTableBuilder()
        self._walk(h5py)
        check_index_memory(len(self.lengths), display)
        self.keys = self._keys.table()
        del self._keys

    def shape_number(self, shape: tuple[int, ...]) -> int:
        if shape not in self.shapes:
            self.shapes.append(shape)
        return self.shapes.index(shape)

    def dtype_number(self, dtype: np.dtype) -> int:
        if dtype not in self.dtypes:
            self.dtypes.append(dtype)
        return self.dtypes.index(dtype)

    def _walk(self, h5py: Any) -> None:
        """Every link under the group, as H5Lvisit walks them (depth first, in name order,
        each group entered once: a hard link back to an ancestor is a link, not a loop),
        each group's links listed by H5Literate: H5Lvisit's own table of visited objects
        took ~1.7 KB a member (175 MB for a group of 100 000 datasets)."""
        seen: set = set()
        stack = [(self._gid, None, b"")]  # (group or its parent, link name in the parent, path)
        while stack:
            parent, name, path = stack.pop()
            found = h5py.h5o.get_info(parent) if name is None else h5py.h5o.get_info(parent, name)
            if (found.fileno, found.addr) in seen:
                continue
            seen.add((found.fileno, found.addr))
            self._group = parent if name is None else h5py.h5g.open(parent, name)
            self._path, self._subgroups = path, []
            self._group.links.iterate(self._visit, info=True)
            if self._error is not None:
                raise self._error
            stack.extend(reversed([(self._group, sub, self._path + sub + b"/") for sub in self._subgroups]))

    def _visit(self, name: bytes, info: Any) -> Optional[int]:
        try:
            self._member(self._path + name, name, info)
        except BaseException as error:  # h5py would swallow it inside its C callback
            self._error = error
            return 1
        return None

    def _member(self, raw: bytes, name: bytes, info: Any) -> None:
        """The link `name` of the group being walked, `raw` its path under the collection's group."""
        import h5py

        if info.type == h5py.h5l.TYPE_HARD:
            if self._pattern_misses(raw):
                self._enter_group(h5py, name)  # not a member; if a group, its members may be
                return
            try:
                dataset = h5py.h5d.open(self._group, name)
            except (KeyError, ValueError, RuntimeError, OSError):
                if self._enter_group(h5py, name):
                    return
                raise
        elif self._pattern_misses(raw):
            return
        length, shape_number, dtype_number, offset = 0, 0, 0, -1
        if info.type == h5py.h5l.TYPE_HARD:
            shape, dtype = dataset.shape, dataset.dtype
            at = dataset.get_offset()
            if shape and at is not None:
                declared = elements(shape) * dtype.itemsize
                if dataset.get_storage_size() >= declared and at + declared <= self._size:
                    offset = int(at)
                    length, shape_number, dtype_number = shape[0], self.shape_number(shape[1:]), \
                        self.dtype_number(dtype)
        self._keys.append(raw)
        self.lengths.append(length)
        self.offsets.append(offset)
        self.shape_of.append(shape_number)
        self.dtype_of.append(dtype_number)
        if len(self.lengths) % INDEX_CHECK_EVERY == 0:  # refused as it grows past the memory it may take
            check_index_memory(len(self.lengths), self._display, so_far=True)

    def _enter_group(self, h5py: Any, name: bytes) -> bool:
        """Whether the link `name` is to a group; if so, its members are walked next."""
        if h5py.h5o.get_info(self._group, name).type != h5py.h5o.TYPE_GROUP:
            return False
        self._subgroups.append(name)
        return True

    def _pattern_misses(self, raw: bytes) -> bool:
        return self.pattern is not None and not fnmatch.fnmatchcase(raw.decode("utf-8", "surrogateescape"),
                                                                    self.pattern)


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
