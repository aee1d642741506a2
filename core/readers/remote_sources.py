"""Inputs by URL: `.npy` objects, HDF5 datasets, Zarr arrays and Parquet / Arrow columns in object stores.

Each is the local reader of its format reading through a
:class:`~normstats.readers.remote.RemoteObject`: `.npy` by one ranged request
per read block straight into the block's buffer; HDF5 and Parquet through a
file object reading ahead one block; Zarr through zarr's fsspec store. After
each block the object's identity (ETag, size, last modification) is checked,
as a local file's size and modification time are: an object replaced under a
run is an error, never a mix of two versions.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np

from ..errors import DataError, NormstatsError, UsageError
from ..stream import BLOCK_BYTES
from .base import ArraySource
from .npy import NPY_MAGIC, NpySource
from ..specs import InputSpec
from .arrow_column import ArrowColumn
from .base import require
from ..file_signatures import HDF5_SIGNATURE
from .remote import RemoteObject, failures
from .zarr_array import ZarrSource

HEADER_BYTES = 1 << 16  # a .npy header is at most 64 KiB (format version 2 allows 4 GiB; none seen)


class _Remote:
    """What the remote readers share: the object, and its identity checked by URL."""

    _remote: RemoteObject

    def _current_identity(self, file: Optional[str] = None) -> tuple:
        return self._remote.identity(file)

    def _check_identity(self, now: tuple, file: Optional[str] = None) -> None:
        if now != self._identity:
            raise DataError(f"{file or self.path} changed while it was read (its ETag, size or modification "
                            "time differ); nothing was written: run again once no other program writes to it")


class RemoteNpy(_Remote, NpySource):
    """A `.npy` object read by ranged requests of one read block each, into the block's buffer."""

    def __init__(self, remote: RemoteObject, head: bytes) -> None:
        self._remote = remote
        self.path = self.name = remote.url
        self._strips = self._staging = None
        self._read_header(io.BytesIO(head))
        self._validate()

    def _opened_identity(self, f) -> tuple:
        return self._remote.identity()

    def _pread(self, view: memoryview, offset: int) -> int:
        return self._remote.read_into(view, offset)

    def close(self) -> None:
        pass


class RemoteH5(_Remote, ArraySource):
    """One dataset of an HDF5 object, read by h5py through a read-ahead file object.

    Only data inside the object is read: a dataset reached through an
    external link, or virtual or stored externally, is refused (its files
    would be looked for on this machine).
    """

    def __init__(self, remote: RemoteObject, name: Optional[str]) -> None:
        self._remote, self.path = remote, remote.url
        self._handles: Optional[tuple] = None
        self._identity = remote.identity()
        file, dataset = self._open(name)
        try:
            self.dataset, self.name = dataset.name.lstrip("/"), f"{self.path}:{dataset.name.lstrip('/')}"
            if dataset.shape is None:
                raise DataError(f"{self.name} is an empty dataset (no shape)")
            self.shape, self.dtype = tuple(dataset.shape), dataset.dtype
        finally:
            file.close()
        self._validate()

    def _open(self, name: Optional[str]) -> tuple[Any, Any]:
        import h5py

        handle = self._remote.open(BLOCK_BYTES)
        try:
            with failures(self.path):
                file = h5py.File(handle, "r")
        except NormstatsError:
            raise
        except OSError as error:
            raise DataError(f"{self.path} is a damaged HDF5 file ({error})") from None
        try:
            return file, self._dataset(file, name)
        except BaseException:
            file.close()
            raise

    def _dataset(self, file: Any, name: Optional[str]) -> Any:
        import h5py

        def listing() -> list[str]:  # a walk of the whole remote file: only to choose or to tell
            datasets: list[str] = []
            file.visititems(lambda key, obj: datasets.append(key) if isinstance(obj, h5py.Dataset) else None)
            return datasets

        if name is None:
            datasets = listing()
            if len(datasets) != 1:
                raise UsageError(f"{self.path} holds {len(datasets)} datasets ({', '.join(datasets) or 'none'}); "
                                 f"name one as {self.path}:NAME or with --dataset")
            name = datasets[0]
        shown = f"{self.path}:{name}"
        node = file
        for part in [p for p in name.split("/") if p]:
            link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
            if link is None:
                raise UsageError(f"{self.path} has no dataset {name!r}; it has: {', '.join(listing()) or 'none'}")
            if isinstance(link, h5py.ExternalLink):
                raise UsageError(f"{shown} is an external link to {link.filename!r}; a remote HDF5 file is read "
                                 "only from its own data: copy the linked data into it")
            node = node[part]
        if not isinstance(node, h5py.Dataset):
            raise UsageError(f"{shown} is a group, not a dataset; HDF5 collections are read from local files "
                             f"only: name a dataset (it has: {', '.join(listing()) or 'none'})")
        if node.is_virtual or node.external:
            raise UsageError(f"{shown} is {'a virtual dataset' if node.is_virtual else 'stored externally'}; a remote "
                             "HDF5 file is read only from its own data: copy the data into it")
        return node

    def read_into(self, start: int, out: np.ndarray) -> None:
        if self._handles is None:
            self._handles = self._open(self.dataset)
        stop = start + out.shape[0]
        try:
            with failures(self.path):
                self._handles[1].read_direct(out, source_sel=np.s_[start:stop])
        except (OSError, RuntimeError, ValueError) as error:
            raise DataError(f"{self.name}: rows {start}..{stop - 1} cannot be read ({error})") from None
        self._check_current()

    def close(self) -> None:
        if self._handles is not None:
            self._handles[0].close()
            self._handles = None


class RemoteZarr(_Remote, ZarrSource):
    """A Zarr array under a URL prefix, read through zarr's fsspec store."""

    def __init__(self, remote: RemoteObject, name: Optional[str]) -> None:
        self._remote = remote
        super().__init__(remote.url, name)

    def _store(self, zarr: Any) -> Any:
        return self._remote.zarr_store(zarr)

    def _metadata_file(self) -> str:
        folder = self.path.with_suffix("/" + self.dataset.strip("/") if self.dataset else "")
        for name in ("zarr.json", ".zarray"):
            candidate = folder.with_suffix("/" + name)
            if self._remote.exists(candidate):
                return candidate
        raise DataError(f"{self.name} has no array metadata (zarr.json or .zarray) in the store")


class RemoteArrow(_Remote, ArrowColumn):
    """A Parquet (by row groups) or Arrow IPC (by record batches) column of an object."""

    def __init__(self, remote: RemoteObject, column: Optional[str], kind: str) -> None:
        self._remote = remote
        super().__init__(remote.url, column, kind)

    def _reader(self) -> Any:
        if self._file is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            handle = self._remote.open(BLOCK_BYTES)
            try:
                with failures(self.path):
                    self._file = pq.ParquetFile(handle) if self.kind == "parquet" else pa.ipc.open_file(handle)
            except BaseException:
                handle.close()
                raise
        return self._file

    def _part(self, index: int) -> Any:
        with failures(self.path):
            return super()._part(index)


def open_remote(parsed: InputSpec) -> ArraySource:
    """Open an input given by URL (see :mod:`normstats.specs`).

    Raises
    ------
    UsageError
        The object does not exist, cannot be reached with these credentials,
        names no dataset / column, or needs a package not installed.
    DataError
        The store cannot be read, or the object is not of its kind.
    """
    remote = RemoteObject(parsed.path)
    if parsed.kind == "zarr":
        require("zarr", parsed.spec)
        return RemoteZarr(remote, parsed.name)
    if parsed.kind in ("parquet", "arrow"):
        require("pyarrow", parsed.spec)
        return RemoteArrow(remote, parsed.name, parsed.kind)
    remote.identity()  # a missing object is reported as missing, not as unreadable
    head = remote.read(0, HEADER_BYTES)
    if head.startswith(NPY_MAGIC):
        if parsed.name is not None:
            raise UsageError(f"{parsed.path} is a .npy file; it has no dataset {parsed.name!r}")
        return RemoteNpy(remote, head)
    if head.startswith(HDF5_SIGNATURE):
        return RemoteH5(remote, parsed.name)
    raise DataError(f"{parsed.path} is neither a .npy nor an HDF5 file; name other formats by their extension "
                    "(.zarr, .parquet, .arrow)")
