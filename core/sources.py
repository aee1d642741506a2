"""Readers: `.npy` and HDF5 arrays read block by block into reused buffers.

Readers never do arithmetic. A :class:`Stream` concatenates the shards of one
data set along axis 0 and yields blocks of rows; every block is a view of one
reused buffer, valid until the next block is requested.
"""

from __future__ import annotations

import os
import queue
import threading
import tokenize
from typing import Iterator, Optional, Sequence

import numpy as np

from . import hdf5_policy
from .errors import DataError, NormstatsError, UsageError
from .limits import available_memory, elements, require_regular_file
from .readers.remote import is_url
from .specs import KALDI, parse_spec
from .validate import check_numeric_dtype

BLOCK_BYTES = 8 << 20  # 4-8 MB blocks stay in cache; 64 MB ones run 30-40 % slower

NPY_MAGIC = b"\x93NUMPY"


def split_spec(spec: str, dataset: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Split ``file.h5:NAME`` into path and dataset name (see :func:`normstats.specs.parse_spec`).

    A path that exists as given is never split (so Windows drive letters and
    file names with colons work); `dataset` (from ``--dataset``) applies when
    the spec names no dataset.
    """
    parsed = parse_spec(spec, dataset)
    return parsed.path, parsed.name


def _check_input_path(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"input file {path!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"input {path!r} is a directory (not a Zarr store); give the file inside it")
    require_regular_file(path, "input")
    if not os.access(path, os.R_OK):
        raise UsageError(f"input file {path!r} is not readable")


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    """What must stay the same while a file is read: which file, its size and last write."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class ArraySource:
    """One array on disk, read by rows. Subclasses implement :meth:`read_into`.

    A source keeps only metadata between reads: its file is opened at the
    first read and closed by :meth:`close` (a Stream closes each shard when
    done with it), so a thousand shards never hold a thousand descriptors.
    Every read checks that the file is still the one opened, with the same
    size and modification time: a file changed under a run is an error, never
    a mix of two versions (or zeros, which HDF5 returns past a truncated end).
    """

    path: str
    name: str  # for messages: 'file.npy' or 'file.h5:NAME'
    dataset: Optional[str] = None  # the HDF5 dataset read, if any
    shape: tuple[int, ...]
    dtype: np.dtype
    first_row: int = 0  # the file's row that is row 0 here (see RowSlice)
    _identity: tuple[int, int, int, int]  # of the file holding the data, when first opened

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill `out` (C-contiguous, any numeric dtype) with rows ``start:start+len(out)``."""
        raise NotImplementedError

    def locate_row(self, row: int) -> tuple[str, int]:
        """Row `row` of this source for messages: (what holds it, its row there)."""
        return self.name, self.first_row + row

    def close(self) -> None:
        """Release the file handle (a later read opens it again)."""

    def _validate(self) -> None:
        check_numeric_dtype(self.dtype, self.name)
        if len(self.shape) == 0:
            raise DataError(f"{self.name} is a scalar; it needs at least one (row) axis")
        if self.shape[0] == 0:
            raise DataError(f"{self.name} has zero rows; there is nothing to read")
        if elements(self.shape[1:]) == 0:
            raise DataError(f"{self.name} has shape {self.shape}: its rows hold no elements, so there is "
                            "nothing to compute; check how the array was saved")

    def _current_identity(self, file: Optional[str] = None) -> tuple:
        """The identity of `file` (default: the source's) now, laid out as :func:`_identity`'s."""
        return _identity(os.stat(file or self.path))

    def _check_current(self, file: Optional[str] = None) -> None:
        """Refuse to go on if `file` (default: the source's) is no longer the one first opened."""
        self._check_identity(self._current_identity(file), file)

    def _check_unchanged(self, info: os.stat_result, file: Optional[str] = None) -> None:
        self._check_identity(_identity(info), file)

    def _check_identity(self, now: tuple, file: Optional[str] = None) -> None:
        if now != self._identity:
            before, after = self._identity[2], now[2]
            size = f" (its size went from {before} to {after} bytes)" if after != before else ""
            raise DataError(f"{file or self.path} changed while it was read{size}; nothing was written: "
                            "run again once no other program writes to it")


def _pread_exact(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes at `offset`; return the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


class NpySource(ArraySource):
    """A `.npy` file read with ``pread`` at the row's byte offset, never mapped.

    Plain reads into a reused buffer keep memory bounded by the block (a
    memory map would count every page touched as resident) and run at the
    page-cache copy speed; a file that shrinks under a map kills the process
    (SIGBUS), a short read is an error. A Fortran-order file is read as one
    strip per column.
    """

    def __init__(self, path: str) -> None:
        self.path = self.name = path
        self._fd: Optional[int] = None
        self._strips: Optional[np.ndarray] = None  # Fortran order: the block's columns
        self._staging: Optional[np.ndarray] = None  # a block in the file's dtype, when the stream's differs
        with open(path, "rb") as f:
            self._read_header(f)
        self._validate()

    def _read_header(self, f) -> None:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError, SyntaxError, tokenize.TokenError) as error:
            # numpy parses an old-style header with tokenize, whose error is none of the others
            raise DataError(f"{self.path} is not a readable .npy file ({error})") from None
        if any(n < 0 for n in shape):
            raise DataError(f"{self.path} declares the shape {tuple(shape)}, with a negative size")
        self.shape, self.dtype, self._fortran = tuple(int(n) for n in shape), np.dtype(dtype), fortran_order
        if self.dtype.hasobject:
            raise DataError(
                f"{self.path} holds Python objects; they are never loaded (it would need "
                "unpickling); save numeric arrays instead"
            )
        self._offset = f.tell()
        # Python integers: a declared (1, 2**32, 2**32) must not wrap to 0 as numpy's int64 prod would
        self._row_bytes = elements(self.shape[1:]) * self.dtype.itemsize
        expected = self._offset + self._row_bytes * (self.shape[0] if self.shape else 1)
        self._identity = self._opened_identity(f)
        if self._identity[2] < expected:
            raise DataError(
                f"{self.path} is truncated: its header promises {expected} bytes, the file has "
                f"{self._identity[2]}; re-create or re-copy it"
            )

    def _opened_identity(self, f) -> tuple:
        """The identity (see :func:`_identity`) of the file `f` whose header was read."""
        return _identity(os.fstat(f.fileno()))

    def _current_identity(self, file: Optional[str] = None) -> tuple:
        return _identity(os.fstat(self._handle()))  # the file opened, even if its name now holds another

    def _pread(self, view: memoryview, offset: int) -> int:
        """Read ``len(view)`` bytes at `offset`; return the bytes read (fewer only at the end)."""
        return _pread_exact(self._handle(), view, offset)

    def _handle(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as error:
                raise DataError(f"{self.path} cannot be opened again ({error.strerror}); it was removed or "
                                "replaced while the run went on") from None
        return self._fd

    def read_into(self, start: int, out: np.ndarray) -> None:
        rows = out.shape[0]
        columns = elements(self.row_shape)
        if self._fortran and columns > 1:
            got = self._read_columns(start, out)
        else:
            target = out if out.dtype == self.dtype else self._staged(out.shape)
            view = memoryview(target.reshape(-1).view(np.uint8))
            got = self._pread(view, self._offset + start * self._row_bytes) == len(view)
            if got and target is not out:
                out[...] = target
        self._check_current()
        if not got:
            raise DataError(f"{self.path} ended early, before row {start + rows}; it was cut while being read")

    def _staged(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._staging is None or self._staging.shape != shape:
            self._staging = np.empty(shape, self.dtype)
        return self._staging

    def _read_columns(self, start: int, out: np.ndarray) -> bool:
        """Rows of a Fortran-order file: column c's rows are contiguous at c * rows."""
        rows, columns, item = out.shape[0], elements(self.row_shape), self.dtype.itemsize
        if self._strips is None or self._strips.shape != (columns, rows):
            self._strips = np.empty((columns, rows), self.dtype)
        raw = self._strips.view(np.uint8).reshape(columns, rows * item)
        for column in range(columns):
            position = self._offset + (column * self.shape[0] + start) * item
            if self._pread(memoryview(raw[column]), position) != rows * item:
                return False
        # the strips are the transposed block: axes reversed, rows last
        out[...] = self._strips.reshape(self.row_shape[::-1] + (rows,)).T
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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

    def read_into(self, start: int, out: np.ndarray) -> None:
        if self._handles is None:
            self._handles = hdf5_policy.open_dataset(self._located, cache=self._cache)
        file, dataset = self._handles
        try:
            dataset.read_direct(out, source_sel=np.s_[start : start + out.shape[0]])
        except (OSError, RuntimeError, ValueError) as error:
            raise DataError(
                f"{self.name}: rows {start}..{start + out.shape[0] - 1} cannot be read ({error}); "
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


def open_source(spec: str, dataset: Optional[str] = None, *, allow_external: bool = False) -> ArraySource:
    """Open an input spec for reading by rows: ``file.npy``, ``file.h5[:NAME]``, an
    HDF5 collection (``file.h5:/group``, ``file.h5:/train/*``), a Kaldi ``scp:`` /
    ``ark:``, ``store.zarr[:PATH]``, ``file.npz[:NAME]``, ``file.safetensors[:NAME]``,
    ``file.parquet:COLUMN`` or ``file.arrow:COLUMN``; or a URL (``s3://``, ``gs://``,
    ``http(s)://``) of a `.npy`, HDF5, Zarr, Parquet or Arrow object (see :mod:`normstats.specs`).

    `.npy` and HDF5 are told apart by the file's content. HDF5 data reached
    through external links, virtual datasets or external storage outside the
    file's folder is refused unless `allow_external`.

    Raises
    ------
    UsageError
        The path does not exist, is a directory, a pipe or a device, names
        no dataset, is a URL of an object that does not exist or cannot be
        reached, or needs an optional package not installed.
    DataError
        The file is not of its kind, is truncated, or holds no numeric array.
    """
    import h5py

    parsed = parse_spec(spec, dataset)
    path, name = parsed.path, parsed.name
    if is_url(path):
        from .readers.remote_sources import open_remote

        return open_remote(parsed)
    if parsed.kind in KALDI:
        from .readers.kaldi import KaldiSource

        _check_input_path(path)
        return KaldiSource(path, parsed.kind)
    if parsed.kind == "zarr":
        from .readers.zarr_array import ZarrSource

        if not os.path.exists(path):
            raise UsageError(f"input {path!r} does not exist")
        return ZarrSource(path, name)
    _check_input_path(path)
    if parsed.kind == "npz":
        from .readers.npz import open_npz

        return open_npz(path, name)
    if parsed.kind == "safetensors":
        from .readers.safetensors_tensor import open_safetensors

        return open_safetensors(path, name)
    if parsed.kind in ("parquet", "arrow"):
        from .readers.arrow_column import ArrowColumn

        return ArrowColumn(path, name, parsed.kind)
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic == NPY_MAGIC:
        if name is not None:
            raise UsageError(f"{path} is a .npy file; it has no dataset {name!r}")
        return NpySource(path)
    if h5py.is_hdf5(path):
        from .readers.h5collection import H5Collection, is_collection

        if name is not None and is_collection(path, name, allow_external):
            return H5Collection(path, name, allow_external=allow_external)
        return H5Source(path, name, allow_external=allow_external)
    from .readers.kaldi import KaldiSource, looks_like_ark

    if name is None and looks_like_ark(path):  # a Kaldi archive under another extension
        return KaldiSource(path, "ark")
    raise DataError(f"{path} is neither a .npy nor an HDF5 file; name other formats by their extension "
                    "(.npz, .safetensors, .parquet, .arrow, .zarr) or kind (scp:, ark:)")


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


def block_rows_for(
    row_bytes: int, batch_size: Optional[int], target: int = BLOCK_BYTES, rows: Optional[int] = None
) -> int:
    """Rows per read block: `rows`, or about `target` bytes; then rounded down
    to a whole number of batches (at least one batch)."""
    rows = rows or max(1, target // max(row_bytes, 1))
    if batch_size:
        rows = max(batch_size, rows - rows % batch_size)
    return rows


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
        if not prefetch:
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
    """Open every shard in `specs` (closing those opened if one fails)."""
    return _stream_of(open_source(spec, dataset, allow_external=allow_external) for spec in specs)


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
