"""Two readers side by side: consecutive blocks of a stream, each read and reduced in its thread.

A thread reads its block (``pread`` into its own reused buffer) and hands it
straight to the caller's `work` (a compiled kernel, which releases the GIL)
while the block is still in that core's cache; the other thread does the
same with the next block. The results come back in stream order, so a
caller folding them gets what one reader would have given. Compared with one
reader thread handing blocks to a computing thread, neither core waits and
no block crosses between the cores' caches.

Files are never memory-mapped: a file cut under a map would kill the process
(SIGBUS); a short read here is the reader's clean error, raised at that
block's turn. Readers never do arithmetic: `work` is the caller's.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..workspace import Workspace
from .h5_chunks import ChunkReader
from .h5_contiguous import ContiguousReader

THREADS = 2
AHEAD = 2  # results per thread that may wait to be taken (each keeps its scratch until then)


class _Shard:
    """One source of the stream and what the threads need to share it."""

    def __init__(self, source, first: int, pieces: int, dtype: np.dtype) -> None:
        self.source = source
        self.first = first  # the stream row of its row 0
        self.pieces = pieces  # block pieces still to read; closed at 0
        self.shared = _reads_in_parallel(source) and source.dtype == dtype
        self.lock = threading.Lock()
        self.opened = False
        self.reader = None
        if pieces and not self.shared:  # (a shard a resume skips is never probed)
            self.reader = ContiguousReader.of(source, dtype) or ChunkReader.of(source, dtype)
        if self.reader is not None:  # HDF5 read by pread, or gzip chunks located in turn, read and inflated side by side
            self.shared = True

    def read_into(self, start: int, out: np.ndarray) -> None:
        if self.reader is None:
            self.source.read_into(start, out)
        else:
            self.reader.read_into(start, out)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.source.close()


def _reads_in_parallel(source) -> bool:
    """Whether two threads may read `source` at once: a C-order `.npy` read without
    conversion (``pread`` on one descriptor, no shared staging buffer). Any other
    source is read by one thread at a time (HDF5 serializes its calls anyway)."""
    from .npy import NpySource

    return type(source) is NpySource and not getattr(source, "_fortran", True)


def _unwrapped(source):
    from ..stream import RowSlice

    while isinstance(source, RowSlice):
        source = source.source
    return source


def ordered_map(
    stream,
    block_rows: int,
    start_row: int,
    work: Callable[[np.ndarray, int, Workspace], Any],
    *,
    threads: int = THREADS,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(rows, work(block, row, scratch))`` for the consecutive blocks of
    rows ``start_row:`` of `stream`, in order, computed in `threads` threads.

    `row` is the stream row of the block's first row; `scratch` a Workspace
    whose arrays the result may use until the next result is asked for.
    The first error (of a read or of `work`) in stream order is raised at
    its block's turn; leaving early stops the threads.
    """
    stop_row = stream.rows
    count = -(-(stop_row - start_row) // block_rows) if stop_row > start_row else 0
    shards = _shards(stream.sources, start_row, stop_row, block_rows, stream.dtype)
    done: dict[int, tuple[int, Any, Optional[BaseException]]] = {}
    state = {"taken": 0, "stop": False, "failed": count}  # failed: the first block whose work raised
    cond = threading.Condition()
    dtype, row_shape = stream.dtype, stream.row_shape

    def run(thread: int) -> None:
        buffer = np.empty((min(block_rows, max(stop_row - start_row, 1)),) + row_shape, dtype)
        scratches = [Workspace() for _ in range(AHEAD)]
        for turn, index in enumerate(range(thread, count, threads)):
            with cond:  # the scratch of this turn is free once the result AHEAD turns back is taken
                while not state["stop"] and index >= state["taken"] + threads * AHEAD:
                    cond.wait()
                if state["stop"] or index > state["failed"]:  # blocks before a failed one still count
                    return
            row = start_row + index * block_rows
            rows = min(block_rows, stop_row - row)
            try:
                block = buffer[:rows]
                _read(shards, row, block)
                result = (rows, work(block, row, scratches[turn % AHEAD]), None)
            except BaseException as error:  # handed to the consumer at this block's turn
                result = (rows, None, error)
            with cond:
                done[index] = result
                if result[2] is not None:
                    state["failed"] = min(state["failed"], index)
                cond.notify_all()
            if result[2] is not None:
                return

    workers = [threading.Thread(target=run, args=(t,), name=f"normstats-reader-{t}", daemon=True)
               for t in range(min(threads, max(count, 1)))]
    for worker in workers:
        worker.start()
    try:
        for index in range(count):
            with cond:
                while index not in done:
                    if not any(worker.is_alive() for worker in workers):
                        raise RuntimeError(f"the reader threads ended before block {index}")  # a bug
                    cond.wait(0.1)  # a timeout keeps Ctrl-C deliverable to the main thread
                rows, value, error = done.pop(index)
            if error is not None:
                raise error
            yield rows, value
            with cond:
                state["taken"] = index + 1
                cond.notify_all()
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for worker in workers:
            worker.join()
        for shard in shards:
            if shard.pieces > 0:
                shard.close()


def _shards(sources: Sequence, start_row: int, stop_row: int, block_rows: int, dtype: np.dtype) -> list[_Shard]:
    """The sources with their first stream row and how many block pieces read them."""
    shards = []
    first = 0
    for source in sources:
        begin, end = max(first, start_row), min(first + source.rows, stop_row)
        pieces = 0
        if begin < end:
            pieces = (end - 1 - start_row) // block_rows - (begin - start_row) // block_rows + 1
        shards.append(_Shard(source, first, pieces, dtype))
        first += source.rows
    return shards


def _read(shards: list[_Shard], row: int, out: np.ndarray) -> None:
    """Fill `out` with the stream rows from `row`, from every shard they span."""
    filled = 0
    for shard in shards:
        rows = shard.source.rows
        if row + filled >= shard.first + rows or filled == len(out):
            if filled == len(out):
                break
            continue
        start = row + filled - shard.first
        take = min(len(out) - filled, rows - start)
        piece = out[filled:filled + take]
        if shard.shared and shard.opened:
            shard.read_into(start, piece)
        else:
            with shard.lock:  # the first read opens the file: one thread only
                shard.read_into(start, piece)
                shard.opened = True
        filled += take
        with shard.lock:
            shard.pieces -= 1
            last = shard.pieces == 0
        if last:
            shard.close()  # every piece read: one descriptor per shard in use, as one reader


def parallel_stream(stream) -> bool:
    """Whether two readers pay over one: two cores for this process, and `.npy` or HDF5
    shards (contiguous and whole-row chunked HDF5 read around h5py, side by side; other
    layouts take turns in h5py while the kernels still run side by side)."""
    import os

    from .h5dataset import H5Source
    from .npy import NpySource

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2 and all(isinstance(_unwrapped(s), (NpySource, H5Source)) for s in stream.sources)
