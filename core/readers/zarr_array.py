"""Zarr arrays (v2 and v3) as inputs: ``store.zarr`` (one array) or ``store.zarr:PATH``.

Blocks are read in whole chunk rows (zarr decodes every chunk a slice
touches, so a block ending inside a chunk row keeps that row for the next
block instead of decoding it twice); a chunk never written would read as the fill value, so every
chunk must exist. The array's metadata file is the identity checked after
each read: a store rewritten under a run is an error.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Optional

import numpy as np

from ..errors import DataError, UsageError
from ..limits import check_fits_memory, elements
from .base import ArraySource
from .base import require

METADATA = ("zarr.json", ".zarray")
STORE_NOT_CHUNKS = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


class ZarrSource(ArraySource):
    def __init__(self, path: str, name: Optional[str]) -> None:
        zarr = require("zarr", f"{path}:{name}" if name else path)
        self.path, self.dataset = path, name
        self.name = f"{path}:{name}" if name else path
        try:
            node = zarr.open(self._store(zarr), mode="r")
        except Exception as error:  # zarr raises many kinds for a store it cannot read
            raise DataError(f"{path} is not a readable Zarr store ({type(error).__name__}: {error})") from None
        if name is not None:
            if not hasattr(node, "array_keys"):
                raise UsageError(f"{path} is a Zarr array, not a group; it has no member {name!r}")
            try:
                node = node[name]
            except KeyError:
                raise UsageError(f"{path} has no array {name!r}; it has: "
                                 f"{', '.join(self._arrays(node)) or 'none'}") from None
        if hasattr(node, "array_keys"):
            arrays = self._arrays(node)
            if len(arrays) != 1:
                raise UsageError(f"{self.name} is a Zarr group of {len(arrays)} arrays "
                                 f"({', '.join(arrays) or 'none'}); name one as {path}:NAME")
            self.dataset = arrays[0] if name is None else f"{name}/{arrays[0]}"
            self.name = f"{path}:{self.dataset}"
            node = node[arrays[0]]
        self._array: Any = node
        self._band: Optional[tuple[int, np.ndarray]] = None  # (first row, rows) of the chunk row kept
        self.shape, self.dtype = tuple(int(n) for n in node.shape), np.dtype(node.dtype)
        self.chunks = tuple(int(n) for n in node.chunks)
        self._meta = self._metadata_file()
        # the chunk (shard) grid and how zarr names a chunk's file (zarr 3; older zarr: not checked)
        metadata = getattr(getattr(node, "_async_array", None), "metadata", None)
        self._chunk_key = None if metadata is None else (
            tuple(int(n) for n in (getattr(node, "shards", None) or self.chunks)), metadata.encode_chunk_key)
        self._identity = self._current_identity(self._meta)
        self._validate()
        check_fits_memory(elements(self.chunks) * self.dtype.itemsize, f"{self.name}: one of its chunks")
        self._check_grid(node)
        written, expected = node.nchunks_initialized, node.nchunks
        if written < expected:
            raise DataError(f"{self.name} has {written} of its {expected} chunks written; the rest would read as "
                            "the fill value, not data: re-create or re-copy it")

    def _check_grid(self, node: Any) -> None:
        """Refuse a chunk grid the store cannot hold before zarr walks it: zarr counts the
        written chunks by visiting every key of the declared grid (a 1 KB metadata file can
        declare 10^15 of them), and a chunk side of 0 divides by zero."""
        grid = tuple(int(n) for n in (getattr(node, "shards", None) or self.chunks))
        if len(grid) != len(self.shape) or any(n <= 0 for n in grid):
            raise DataError(f"{self.name} declares chunks of shape {grid} for its shape {self.shape}; "
                            "its metadata is damaged: re-create or re-copy it")
        folder = os.path.join(self.path, *(self.dataset or "").split("/"))
        if not os.path.isdir(folder):
            return
        expected = math.prod(-(-n // g) for n, g in zip(self.shape, grid))
        stored = 0
        for _, _, names in os.walk(folder):
            stored += sum(name not in STORE_NOT_CHUNKS for name in names)
            if stored >= expected:
                return
        raise DataError(f"{self.name} has at most {stored} of its {expected} chunks written (the files in its "
                        "folder); the rest would read as the fill value, not data: re-create or re-copy it")

    def _arrays(self, group: Any) -> list[str]:
        found: list[str] = []
        for key in sorted(group.array_keys()):
            found.append(key)
        return found

    def _store(self, zarr: Any) -> Any:
        """What ``zarr.open`` opens: the store's folder."""
        return self.path

    def _metadata_file(self) -> str:
        folder = os.path.join(self.path, *(self.dataset or "").split("/"))
        for name in METADATA:
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        return self.path

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Rows ``start:start+len(out)``, read in whole chunk rows: the whole chunk rows inside
        the block straight into `out`, a chunk row the block ends inside into a band kept for
        the next block (so each chunk is decoded once in a sequential read)."""
        stop, band = start + out.shape[0], self.chunks[0]
        position = start
        while position < stop:
            first = position - position % band
            end = min(first + band, self.rows)
            if position == first and (end <= stop or end == self.rows and stop == self.rows):
                whole = min(stop - stop % band if stop < self.rows else stop, self.rows)
                self._read(first, whole, out[position - start:whole - start])
                position = whole
                continue
            if self._band is None or self._band[0] != first:
                self._band = None
                self._band = (first, self._read(first, end))
            take = min(end, stop) - position
            out[position - start:position - start + take] = self._band[1][position - first:position - first + take]
            position += take
        self._check_current(self._meta)

    def _read(self, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        try:
            rows = self._array[start:stop]
        except Exception as error:  # a damaged chunk: zarr and its codecs raise many kinds
            raise DataError(f"{self.name}: rows {start}..{stop - 1} cannot be read "
                            f"({type(error).__name__}: {error}); the store is damaged") from None
        self._check_chunks_kept(start, stop)
        if out is None:
            return rows
        out[...] = rows
        return out

    def _check_chunks_kept(self, start: int, stop: int) -> None:
        """Refuse rows ``start:stop`` if a chunk (shard) file they span is gone: zarr reads a
        missing chunk as the fill value, silently. Checked after the read, so a chunk removed
        while it was read is seen too (a local store; an object store's chunks are its own)."""
        if not os.path.isdir(self.path):
            return
        if self._chunk_key is None:
            return
        grid, encode = self._chunk_key
        folder = os.path.join(self.path, *(self.dataset or "").split("/"))
        across = [range(-(-int(n) // g)) for n, g in zip(self.shape[1:], grid[1:])]
        for band in range(start // grid[0], -(-stop // grid[0])):
            for rest in itertools.product(*across):
                key = encode((band, *rest))
                if not os.path.isfile(os.path.join(folder, *key.split("/"))):
                    raise DataError(f"{self.name}: chunk {key!r} (rows {band * grid[0]}..) is gone from the "
                                    "store, which changed while it was read; nothing was written: run again "
                                    "once no other program writes to it")

    def close(self) -> None:
        self._band = None
