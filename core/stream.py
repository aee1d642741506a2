"""Streams: the shards of one data set read in order as one array of rows,
block by block into reused buffers (a reader thread may prefetch the next).

Readers (:mod:`normstats.readers`) never do arithmetic; a :class:`Stream`
concatenates the shards of one data set along axis 0 and yields blocks of
rows; every block is a view of one reused buffer, valid until the next block
is requested.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import DataError, UsageError
from .limits import elements
from .readers.api import open_source
from .readers.base import ArraySource
from .row_pieces import piece_ranges, row_pieces


BLOCK_BYTES = 8 << 20  # 4-8 MB blocks stay in cache; 64 MB ones run 30-40 % slower


def rows_per_block(row_bytes: int) -> int:
    """Rows of `row_bytes` in a read block of :data:`BLOCK_BYTES` (at least one; a
    wider row is read in pieces where its reader can). The one place the block
    size is read, so tests patch ``stream.BLOCK_BYTES`` alone."""
    return max(1, BLOCK_BYTES // max(row_bytes, 1))


def wider_than_block(row_bytes: int) -> bool:
    """Whether a row of `row_bytes` is larger than a read block (then read in pieces)."""
    return row_bytes > BLOCK_BYTES


class RowSlice(ArraySource):
    """Rows ``start:stop`` of another source: one task's share of a shard."""

    def __init__(self, source: ArraySource, start: int, stop: int) -> None:
        self.source = source
        self.path, self.name, self.dataset = source.path, source.name, source.dataset
        self.dtype = source.dtype
        self.shape = (stop - start,) + source.row_shape
        self.first_row = start

    def read_into(self, start: int, out: np.ndarray) -> None:
        self.source.read_into(self.first_row + start, out)

    @property
    def reads_pieces(self) -> bool:
        return self.source.reads_pieces

    def read_piece(self, row: int, e0: int, out: np.ndarray) -> None:
        self.source.read_piece(self.first_row + row, e0, out)

    def locate_row(self, row: int) -> tuple[str, int]:
        return self.source.locate_row(self.first_row + row)

    def close(self) -> None:
        self.source.close()


def open_window(
    shards: Sequence[tuple[str, Optional[str], int]],
    start: int,
    stop: int,
    *,
    allow_external: bool = False,
    dtype: Optional[np.dtype] = None,
) -> Stream:
    """Rows ``start:stop`` of a stream, opening only the shards they touch.

    `shards` are the stream's (path, dataset, rows) as the planner saw them;
    a shard that has since changed is an error. `dtype` is the whole stream's
    block dtype, so every window reads what one stream would.
    """
    return _stream_of(_window_sources(shards, start, stop, allow_external), dtype)


def _window_sources(shards: Sequence[tuple[str, Optional[str], int]], start: int, stop: int,
                    allow_external: bool) -> Iterator[ArraySource]:
    first = 0
    for path, dataset, rows in shards:
        begin, end = max(start - first, 0), min(stop - first, rows)
        first += rows
        if begin >= end:
            continue
        source = open_source(path, dataset, allow_external=allow_external)
        if source.rows != rows:
            source.close()
            raise DataError(f"{source.name} now has {source.rows} rows, not {rows}; "
                            "it changed while the fit ran")
        yield source if (begin, end) == (0, rows) else RowSlice(source, begin, end)


def block_rows_for(row_bytes: int, batch_size: Optional[int], rows: Optional[int] = None) -> int:
    """Rows per read block: `rows`, or about :data:`BLOCK_BYTES`; then rounded down
    to a whole number of batches (at least one batch)."""
    rows = rows or rows_per_block(row_bytes)
    if batch_size:
        rows = max(batch_size, rows - rows % batch_size)
    return rows


class RowPieces:
    """The pieces of one row: iterating reads them (again) into one reused buffer,
    or gives views of the row when `whole` holds it (a reader that cannot read part
    of a row)."""

    def __init__(self, ranges: list[tuple[int, int]], buffer: np.ndarray, read=None,
                 whole: Optional[np.ndarray] = None) -> None:
        self._ranges, self._buffer, self._read, self._whole = ranges, buffer, read, whole

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._whole is not None:
            flat = self._whole.reshape(-1)
            return ((e0, flat[e0:e1]) for e0, e1 in self._ranges)
        return row_pieces(self._read, self._ranges, self._buffer.dtype, self._buffer)


class Stream:
    """The shards of one data set, read in order as one array of rows.

    Parameters
    ----------
    sources : sequence of ArraySource
        Shards sharing the shape after axis 0.
    dtype : numpy dtype, optional
        Dtype of the blocks; default: the shards' common type.
    """

    def __init__(self, sources: Sequence[ArraySource], dtype: Optional[np.dtype] = None) -> None:
        if not sources:
            raise UsageError("no input files given")
        first = sources[0]
        for source in sources[1:]:
            if source.row_shape != first.row_shape:
                raise DataError(
                    f"{source.name} has rows of shape {source.row_shape} but {first.name} has "
                    f"{first.row_shape}; shards of one data set must agree after axis 0"
                )
        self.sources = list(sources)
        self.row_shape = first.row_shape
        self.rows = sum(source.rows for source in sources)
        self.dtype = np.dtype(dtype) if dtype is not None else np.result_type(*[s.dtype for s in sources])
        self.shape = (self.rows,) + self.row_shape

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def row_bytes(self) -> int:
        return elements(self.row_shape) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def wide(self) -> bool:
        """Whether a row is larger than a read block (then read in pieces: :meth:`wide_rows`)."""
        return wider_than_block(self.row_bytes)

    def piece_ranges(self) -> list[tuple[int, int]]:
        """The element ranges :meth:`wide_rows` reads each row in."""
        return piece_ranges(self.row_shape, self.dtype.itemsize, BLOCK_BYTES)

    def wide_rows(self, start_row: int = 0, stop_row: Optional[int] = None
                  ) -> Iterator[tuple[int, Iterator[tuple[int, np.ndarray]]]]:
        """Yield ``(row, pieces)`` for rows ``start_row:stop_row``: `pieces` yields the
        row's ``(e0, piece)`` of :func:`~normstats.row_pieces.piece_ranges` (each at most
        a block, a view of one reused buffer), read again at each iteration (a second
        pass over the row), valid until the next row is requested.

        A shard whose reader cannot read part of a row (see
        :attr:`ArraySource.reads_pieces`) is read a whole row at a time.
        """
        stop_row = self.rows if stop_row is None else min(stop_row, self.rows)
        ranges = self.piece_ranges()
        buffer = np.empty(max((e1 - e0 for e0, e1 in ranges), default=0), self.dtype)
        whole: Optional[np.ndarray] = None
        first = 0
        for source in self.sources:
            begin, end = max(start_row - first, 0), min(stop_row - first, source.rows)
            first += source.rows
            for local in range(begin, end):
                row = first - source.rows + local
                if source.reads_pieces:
                    yield row, RowPieces(ranges, buffer,
                                         read=lambda e0, e1, out, s=source, r=local: s.read_piece(r, e0, out))
                else:
                    whole = np.empty((1,) + self.row_shape, self.dtype) if whole is None else whole
                    source.read_into(local, whole)
                    yield row, RowPieces(ranges, buffer, whole=whole)
            if end >= source.rows and begin < end:
                source.close()  # one shard open at a time: its rows are all read

    def locate(self, row: int) -> tuple[str, int]:
        """The shard holding `row` of the stream, and the row's index within it."""
        for source in self.sources:
            if row < source.rows:
                return source.locate_row(row)
            row -= source.rows
        raise IndexError(row)

    def blocks(
        self, block_rows: int, start_row: int = 0, stop_row: Optional[int] = None, *, prefetch: bool = True
    ) -> Iterator[np.ndarray]:
        """Yield consecutive blocks of `block_rows` rows (the last may be shorter)
        of rows ``start_row:stop_row`` (default: to the end).

        Blocks span shard boundaries, so logical batches do too. Each block is a
        view of a reused buffer, valid until the next block is requested. With
        `prefetch`, a reader thread fills the next buffer while the caller works
        on this one (file reads and HDF5 decoding release the GIL).
        """
        stop_row = self.rows if stop_row is None else min(stop_row, self.rows)
        rows = min(block_rows, max(stop_row - start_row, 1))
        shape = (rows,) + self.row_shape
        if not prefetch or stop_row - start_row <= rows:  # one block: nothing to read ahead
            buffer = np.empty(shape, dtype=self.dtype)
            yield from self._fill(lambda: buffer, rows, start_row, stop_row)
            return
        yield from _prefetched(lambda take: self._fill(take, rows, start_row, stop_row), shape, self.dtype)

    def _fill(self, take_buffer, block_rows: int, start_row: int, stop_row: int) -> Iterator[np.ndarray]:
        """Read rows ``start_row:stop_row`` into buffers from `take_buffer()`,
        yielding each when full."""
        buffer = take_buffer()
        filled = 0
        position = start_row  # the stream row read next
        first = 0  # the stream row where the current shard starts
        for source in self.sources:
            start = min(max(position - first, 0), source.rows)
            end = min(stop_row - first, source.rows)
            first += source.rows
            while start < end:
                take = min(block_rows - filled, end - start)
                source.read_into(start, buffer[filled : filled + take])
                filled += take
                start += take
                position += take
                if start == end:
                    source.close()  # one shard open at a time: its rows are all read
                if filled == block_rows:
                    yield buffer
                    filled = 0
                    if position < stop_row:
                        buffer = take_buffer()
        if filled:
            yield buffer[:filled]

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prefetched(fill, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Run `fill(take_buffer)` in a reader thread over two buffers, yielding its blocks.

    A buffer goes back to the reader only when the consumer asks for the next
    block, so the block in hand is never overwritten. Errors in the reader
    are raised here; leaving early stops the reader.
    """
    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(np.empty(shape, dtype=dtype))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def take_buffer() -> np.ndarray:
        while not stop.is_set():
            try:
                return free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def reader() -> None:
        try:
            for block in fill(take_buffer):
                ready.put(("block", block))
            ready.put(("end", None))
        except _Stopped:
            pass
        except BaseException as error:  # handed to the consumer
            ready.put(("error", error))

    thread = threading.Thread(target=reader, name="normstats-reader", daemon=True)
    thread.start()
    try:
        previous = None
        while True:
            kind, item = ready.get()
            if previous is not None:
                free.put(previous.base if previous.base is not None else previous)
            if kind == "end":
                return
            if kind == "error":
                raise item
            previous = item
            yield item
    finally:
        stop.set()
        thread.join()


class _Stopped(Exception):
    """The consumer left; the reader thread ends."""


def open_stream(
    specs: Sequence[str], dataset: Optional[str] = None, *, allow_external: bool = False
) -> Stream:
    """Open every shard in `specs` (closing those opened if one fails); within
    :func:`normstats.opened_inputs.opened_once`, once for the same shards."""
    from .opened_inputs import reused

    return reused(("stream", tuple(specs), dataset, allow_external),
                  lambda: _stream_of(open_source(spec, dataset, allow_external=allow_external) for spec in specs))


def _stream_of(opening: Iterator[ArraySource], dtype: Optional[np.dtype] = None) -> Stream:
    """A Stream of the sources `opening` yields; if opening one or the Stream
    fails, those already opened are closed."""
    sources: list[ArraySource] = []
    try:
        for source in opening:
            sources.append(source)
        return Stream(sources, dtype=dtype)
    except BaseException:
        for source in sources:
            source.close()
        raise
