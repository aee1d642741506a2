"""Chunked HDF5 datasets (plain, gzip or shuffle + gzip) read chunk by chunk, decoded on both cores.

HDF5 runs its filters inside the library, one chunk after another under
h5py's lock. Here each chunk is located in the dataset's chunk index (a
short look-up under the lock), and a pool of threads reads its stored bytes
with ``pread`` into a reused buffer and decodes them: zlib releases the GIL
while it inflates, and the shuffle filter is undone by a compiled loop
(which releases it too). Only the layouts this handles exactly are taken
(chunks of whole rows, no filter, deflate or shuffle + deflate, native byte
order; known from the storage the source read); any other dataset keeps
h5py's own read, and so does a chunk stored with a filter skipped. The
dataset was opened through :mod:`normstats.hdf5_policy` by its
:class:`~normstats.readers.h5dataset.H5Source`, whose checks (external and
virtual data, chunks all written and inside the file) stand; a short read
is an error, a chunk never inflates past its declared size, and after every
read the file must still be the one opened.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import zlib
from typing import Optional

import numpy as np

from ..errors import DataError
from .h5_storage import plain_storage
from .reopened_file import ReopenedFile

SHUFFLE, DEFLATE = 2, 1  # HDF5 filter ids (H5Z_FILTER_SHUFFLE, H5Z_FILTER_DEFLATE)
_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max(2, min(os.cpu_count() or 1, 4)),
                                                          thread_name_prefix="normstats-inflate")
        return _pool


_heap_served = 0  # bytes up to which allocations were let come from the heap


def _served_from_heap(nbytes: int) -> None:
    """Let glibc serve buffers of `nbytes` (an inflated chunk) from its heap.

    Above its mmap threshold (128 KiB at start) every allocation is a fresh
    mapping whose pages fault in on first touch: half a million faults, 0.6 s of
    CPU, for the chunks of a 1 GB gzip fit. Freeing one mapped block raises the
    threshold to its size (glibc's dynamic threshold, mallopt(3)), as glibc does
    by itself only once some larger block happens to be freed (so only a second
    fit in a process was fast). ``bytes(n)`` is calloc'd: mapped and unmapped
    untouched. Elsewhere than glibc, or where a MALLOC_* variable fixes its
    thresholds (Dask's workers set MALLOC_TRIM_THRESHOLD_, to hand memory back),
    a no-op.
    """
    global _heap_served
    size = min(2 * nbytes, 32 << 20)  # (glibc's ceiling for the dynamic threshold)
    if size > _heap_served:
        _heap_served = size
        bytes(size)


class ChunkReader:
    """Rows of one chunked dataset of an H5Source, its chunks read raw and decoded in threads.

    Safe to call from several threads at once (each call decodes its own chunks).
    """

    def __init__(self, source, chunk_rows: int, shuffle: bool, deflate: bool) -> None:
        self.source = source
        self.chunk_rows = chunk_rows
        self.shuffle = shuffle
        self.deflate = deflate  # else the chunks are stored as they are
        self.rows = source.rows
        self.dtype = source.dtype
        self._lock = threading.Lock()  # h5py's calls and the handles: one thread at a time
        self._handles = None
        self._file = ReopenedFile(source._located.file, source.name)  # read outside the lock
        if deflate:
            _served_from_heap(chunk_rows * int(np.prod(source.shape[1:], dtype=np.int64)) * source.dtype.itemsize)

    @classmethod
    def of(cls, source, dtype: np.dtype) -> Optional["ChunkReader"]:
        """A reader for `source` if it is a dataset of whole-row chunks, unfiltered or gzip
        (+ shuffle), read as `dtype` without conversion; else None (from what the source
        read of its storage when it opened the dataset: the file is not opened again)."""
        storage = plain_storage(source, dtype)
        if storage is None or storage.layout != "chunked" or storage.chunk[1:] != tuple(source.shape[1:]):
            return None
        filters = list(storage.filters)
        if filters not in ([], [DEFLATE], [SHUFFLE, DEFLATE]):
            return None
        return cls(source, storage.chunk[0], filters[:1] == [SHUFFLE], bool(filters))

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with rows ``start:start+len(out)``, its chunks read and inflated in threads."""
        from .. import hdf5_policy

        rows = out.shape[0]
        if rows == 0:
            return
        first, last = start // self.chunk_rows, (start + rows - 1) // self.chunk_rows
        with self._lock:  # only the look-ups in the chunk index take turns; the reads do not
            if self._handles is None:
                self._handles = hdf5_policy.open_dataset(self.source._located)
            where = [self._where(c) for c in range(first, last + 1)]
        if self.deflate:
            jobs = [_threads().submit(self._decode, place, c, start, out)
                    for c, place in zip(range(first, last + 1), where)]
            for job in jobs:
                job.result()
        else:  # nothing to decode: read in this thread, straight into `out` (the readers run side by side)
            for c, place in zip(range(first, last + 1), where):
                self._decode(place, c, start, out)
        self.source._check_unchanged(self._file.fstat(), self.source._located.file)

    def _where(self, chunk: int) -> tuple[int, int, int]:
        """(filter mask, byte offset, stored bytes) of a chunk, from the dataset's chunk index."""
        offsets = (chunk * self.chunk_rows,) + (0,) * (len(self.source.shape) - 1)
        try:
            info = self._handles[1].id.get_chunk_info_by_coord(offsets)
        except (OSError, RuntimeError, ValueError) as error:
            raise DataError(f"{self.source.name}: the chunk at row {offsets[0]} cannot be read ({error}); "
                            "the file is damaged or was cut") from None
        if info.byte_offset is None:
            raise DataError(f"{self.source.name}: the chunk at row {offsets[0]} was never written; the file "
                            "is damaged or was not fully written")
        return int(info.filter_mask), int(info.byte_offset), int(info.size)

    def _decode(self, place: tuple[int, int, int], chunk: int, start: int, out: np.ndarray) -> None:
        """Read one chunk, inflate it (and undo the shuffle) into the rows of `out` it holds."""
        mask, offset, size = place
        lo = chunk * self.chunk_rows
        rows = min(self.chunk_rows, self.rows - lo)  # stored chunks are whole; the data may end earlier
        begin, end = max(lo, start), min(lo + rows, start + out.shape[0])
        target = out[begin - start:end - start]
        if mask:  # a filter was skipped for this chunk (HDF5 keeps a chunk it cannot shrink): h5py decodes it
            with self._lock:
                self._handles[1].read_direct(target, source_sel=np.s_[begin:end])
            return
        if not self.deflate:  # stored as they are: the rows' bytes, read in place
            view = memoryview(target.reshape(-1).view(np.uint8))
            if size != self.chunk_rows * target[0].nbytes:
                raise DataError(f"{self.source.name}: the chunk at row {lo} is not of its declared size; the "
                                "file is damaged")
            if self._file.read(view, offset + (begin - lo) * target[0].nbytes) != len(view):
                raise self._cut(lo)
            return
        raw = _stored(size)
        if self._file.read(raw, offset) != size:
            raise self._cut(lo)
        row_items = target[0].size
        item = self.dtype.itemsize
        full = self.chunk_rows * row_items
        try:  # one byte more than declared at most: a chunk that inflates further takes no more memory
            flat = zlib.decompressobj().decompress(raw, full * item + 1)
        except zlib.error:
            flat = b""
        if len(flat) != full * item:
            raise DataError(f"{self.source.name}: the chunk at row {lo} does not inflate to its declared "
                            "size; the file is damaged")
        target = target.reshape(-1)
        skip, count = (begin - lo) * row_items, (end - begin) * row_items
        if self.shuffle and item > 1:  # byte k of every element is in plane k
            from ..kernels import compiled_kernels

            compiled_kernels()._unshuffle(np.frombuffer(flat, np.uint8).reshape(item, full), skip,
                                target.view(np.dtype(f"u{item}")))
        else:
            target[...] = np.frombuffer(flat, self.dtype, count, skip * item)

    def _cut(self, lo: int) -> DataError:
        return DataError(f"{self.source.name} ended early, in the chunk at row {lo}; it was cut while being read")

    def close(self) -> None:
        with self._lock:
            if self._handles is not None:
                self._handles[0].close()
                self._handles = None
        self._file.close()


_buffers = threading.local()


def _stored(size: int) -> memoryview:
    """`size` bytes of this thread's reused buffer for stored chunks (fresh pages for
    every chunk cost more than reading it)."""
    buffer = getattr(_buffers, "raw", None)
    if buffer is None or len(buffer) < size:
        buffer = _buffers.raw = bytearray(max(size, 2 * len(buffer or b"")))
    return memoryview(buffer)[:size]
