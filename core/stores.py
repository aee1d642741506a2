"""Stats files (`.npz`, `.h5`), array outputs, and atomic writes.

Nothing here computes: stats go to disk as the state objects made them. Every
output is written under a temporary name in its target folder and renamed
into place only when complete, so a failed or interrupted run leaves either
no file or the previous one, never a partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import zipfile
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .errors import DataError, StatsFileError, UsageError
from .sources import NPY_MAGIC, split_spec
from .stats import BATCHNORM, CENTERS, Stats, check_stats

STATS_FORMATS = (".npz", ".h5", ".hdf5")
ARRAY_FORMATS = (".npy", ".h5", ".hdf5")
# assign writes labels and distances together: HDF5 only, since a zip (.npz) can have one
# member open for writing at a time, and two .npy files could not be renamed into place at once
ASSIGN_FORMATS = (".h5", ".hdf5")
H5_CHUNK_BYTES = 1 << 20


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def check_output(path: str, *, force: bool, inputs: Sequence[str] = (), formats: Sequence[str]) -> None:
    """Refuse an output path before any work is done.

    Raises
    ------
    UsageError
        Unknown extension, missing or unwritable folder, an existing file
        without `force`, a directory, or the path of one of the `inputs`.
    """
    path, dataset = split_output(path)
    if dataset is not None and formats is not ARRAY_FORMATS:  # only a single array has one name
        what = "a stats file" if formats is STATS_FORMATS else "this output"
        raise UsageError(f"output {path}:{dataset}: {what} takes no dataset name; write {path}")
    if _extension(path) not in formats:
        raise UsageError(
            f"output {path!r} must end in one of {', '.join(formats)} (the format follows the extension)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise UsageError(f"output {path!r} is a directory")
    for spec in inputs:
        input_path = split_spec(spec)[0]
        if os.path.exists(input_path) and os.path.exists(path) and os.path.samefile(input_path, path):
            raise UsageError(f"output {path!r} is also an input; choose another output path")
    if os.path.exists(path) and not force:
        raise UsageError(f"output {path!r} exists; pass --force to overwrite it")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it to `path` on success.

    On any exception (including KeyboardInterrupt) the temporary is removed
    and `path` is left as it was.
    """
    folder, base = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    try:  # from here on, any exit (Ctrl-C included) removes the temporary
        os.close(handle)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs follow the umask
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting it back and forth mid-run could be interrupted


# --- stats files -------------------------------------------------------------


def write_stats(stats: Stats, path: str) -> None:
    """Write `stats` atomically as `.npz` or HDF5 (by the extension of `path`)."""
    meta = dict(stats.meta, kind=stats.kind)
    with atomic_path(path) as temporary:
        if _extension(path) == ".npz":
            arrays = {name: np.asarray(value) for name, value in stats.arrays.items()}
            with open(temporary, "wb") as f:
                np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        else:
            _write_stats_h5(stats.arrays, meta, temporary)


def _write_stats_h5(arrays: dict[str, np.ndarray], meta: dict[str, Any], path: str) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=np.asarray(value))
        write_attrs(f, meta)


def write_attrs(target: Any, meta: dict[str, Any]) -> None:
    """Store `meta` as HDF5 attributes of `target` (a file, group or dataset)."""
    for key, value in meta.items():
        # Scalars stay readable attributes; lists and None are stored as JSON.
        if isinstance(value, (str, bool, int, float)):
            target.attrs[key] = value
        else:
            target.attrs[key] = "json:" + json.dumps(value)


def read_stats(path: str) -> Stats:
    """Read a stats or centers file written by :func:`write_stats`.

    `.npz` files are loaded with ``allow_pickle=False``: an archive holding
    pickled objects is refused, never loaded.

    Raises
    ------
    UsageError
        The file does not exist.
    StatsFileError
        It is not a normstats stats file or is damaged.
    """
    if not os.path.exists(path):
        raise UsageError(f"stats file {path!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"stats file {path!r} is a directory")
    import h5py

    try:
        if h5py.is_hdf5(path):
            arrays, meta = _read_stats_h5(path)
        else:
            arrays, meta = _read_stats_npz(path)
    except StatsFileError:
        raise
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile) as error:
        raise StatsFileError(
            f"{path} is not a readable normstats stats file (.npz or HDF5): "
            f"{_reason(error)}; re-create it with fit-bn or fit-centers"
        ) from None
    kind = meta.get("kind")
    if kind not in (BATCHNORM, CENTERS) or "mode" not in meta:
        raise StatsFileError(f"{path} is not a normstats stats file (no kind/mode metadata)")
    return check_stats(Stats(kind, arrays, meta, source=path))


def _reason(error: Exception) -> str:
    """Why a stats file failed to load, without numpy's advice to unpickle."""
    text = str(error)
    if "pickle" in text:
        return "it is not a zip archive of plain arrays (normstats never unpickles)"
    return text or type(error).__name__


@contextlib.contextmanager
def _npz(path: str) -> Iterator[Any]:
    """An `.npz` archive opened without pickles; a damaged one is a StatsFileError
    (np.load given a path leaks its handle then, so it gets ours)."""
    with open(path, "rb") as f:
        try:
            archive = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise StatsFileError(f"{path} is not a readable .npz archive: {_reason(error)}") from None
        with archive:
            yield archive


def _read_stats_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise StatsFileError(f"{path} is a single .npy array, not a normstats stats file")
    with _npz(path) as archive:
        if "meta" not in archive.files:
            raise StatsFileError(f"{path} has no 'meta' entry; it was not written by normstats")
        arrays = {name: archive[name] for name in archive.files if name != "meta"}
        meta = json.loads(str(archive["meta"]))
    return arrays, meta


def _read_stats_h5(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import h5py

    with h5py.File(path, "r") as f:
        arrays = {name: np.asarray(f[name][()]) for name in f if isinstance(f[name], h5py.Dataset)}
        meta = {}
        for key, value in f.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value.startswith("json:"):
                value = json.loads(value[5:])
            elif isinstance(value, np.generic):
                value = value.item()
            meta[key] = value
    return arrays, meta


def read_array(spec: str) -> np.ndarray:
    """Read a small array (gamma, beta, initial centers) from `.npy`, `.npz`
    (one array) or ``file.h5:NAME``; never unpickles."""
    from .sources import open_source

    path, name = split_spec(spec)
    if _extension(path) == ".npz":
        if not os.path.exists(path):
            raise UsageError(f"file {path!r} does not exist")
        with _npz(path) as archive:
            names = [n for n in archive.files if n != "meta"]
            if name is None and len(names) != 1:
                raise UsageError(f"{path} holds {', '.join(names)}; name one as {path}:NAME")
            key = name or names[0]
            if key not in archive.files:
                raise UsageError(f"{path} has no array {key!r}; it has: {', '.join(names)}")
            return archive[key]
    source = open_source(spec)
    try:
        out = np.empty(source.shape, dtype=source.dtype)
        source.read_into(0, out)
        return out
    finally:
        source.close()


# --- array outputs (apply) ----------------------------------------------------


class _RowsWriter:
    """Rows written block by block into a temporary beside `path`, renamed
    into place on a clean exit of the ``with`` block (removed on an exception).

    Subclasses open their format in :meth:`_open` and write in ``write``,
    adding the rows written to ``_rows_written``.
    """

    def __init__(self, path: str, rows: int) -> None:
        self.path, self.rows = path, int(rows)
        self._context: Optional[contextlib.AbstractContextManager] = None
        self._rows_written = 0

    def _open(self, temporary: str) -> Any:
        """Open `temporary` for writing; return the handle to close at the end."""
        raise NotImplementedError

    def __enter__(self) -> "_RowsWriter":
        self._context = atomic_path(self.path)
        temporary = self._context.__enter__()
        try:
            self._file = self._open(temporary)
        except BaseException as error:
            self._context.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None and self._rows_written != self.rows:
            exc = RuntimeError(f"wrote {self._rows_written} of {self.rows} rows")
            self._context.__exit__(RuntimeError, exc, None)
            raise exc
        self._context.__exit__(exc_type, exc, tb)


def _rows_dataset(file: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """An HDF5 dataset of `shape`, chunked by about H5_CHUNK_BYTES of whole rows."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
    chunk_rows = max(1, min(shape[0], H5_CHUNK_BYTES // row_bytes))
    return file.create_dataset(name, shape=shape, dtype=dtype, chunks=(chunk_rows,) + tuple(shape[1:]))


def _write_rows(dataset: Any, start: int, block: np.ndarray) -> None:
    dataset.write_direct(np.ascontiguousarray(block, dtype=dataset.dtype),
                         dest_sel=np.s_[start : start + block.shape[0]])


class ArrayWriter(_RowsWriter):
    """Writes an array of known shape block by block to `.npy` or an HDF5 dataset.

    Use as a context manager: on a clean exit the file is renamed into place,
    on an exception the temporary is removed.

    Parameters
    ----------
    path : str
        ``out.npy``, ``out.h5`` or ``out.h5:NAME``.
    shape : tuple of int
        Shape of the whole output.
    dtype : numpy dtype
    dataset : str
        Dataset name in an HDF5 output when `path` names none.
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, dataset: str = "data") -> None:
        path, name = split_output(path)
        super().__init__(path, shape[0])
        self.dataset = name or dataset
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def _open(self, temporary: str) -> Any:
        if _extension(self.path) == ".npy":
            self._dataset = None
            f = open(temporary, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype),
                      "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_1_0(f, header)
            return f
        import h5py

        f = h5py.File(temporary, "w")
        self._dataset = _rows_dataset(f, self.dataset, self.shape, self.dtype)
        return f

    def write(self, block: np.ndarray) -> None:
        """Append the next rows."""
        if self._dataset is None:
            self._file.write(np.ascontiguousarray(block, dtype=self.dtype).data)
        else:
            _write_rows(self._dataset, self._rows_written, block)
        self._rows_written += block.shape[0]


class DatasetsWriter(_RowsWriter):
    """Writes several HDF5 datasets with the same rows, block by block, atomically.

    Parameters
    ----------
    path : str
        The HDF5 file to write.
    arrays : dict of str to (shape, dtype)
        The datasets; every shape starts with the same number of rows.
    attrs : dict, optional
        File attributes (metadata), stored as by :func:`write_attrs`.
    """

    def __init__(self, path: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
                 attrs: Optional[dict[str, Any]] = None) -> None:
        rows = {shape[0] for shape, _ in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"datasets with different numbers of rows: {sorted(rows)}")
        super().__init__(path, rows.pop())
        self.arrays, self.attrs = dict(arrays), dict(attrs or {})

    def _open(self, temporary: str) -> Any:
        import h5py

        f = h5py.File(temporary, "w")
        self._datasets = {name: _rows_dataset(f, name, tuple(shape), dtype)
                          for name, (shape, dtype) in self.arrays.items()}
        write_attrs(f, self.attrs)
        return f

    def write(self, **blocks: np.ndarray) -> None:
        """Append the next rows of every dataset (one keyword each)."""
        if set(blocks) != set(self._datasets):
            raise ValueError(f"write needs {sorted(self._datasets)}, got {sorted(blocks)}")
        rows = {block.shape[0] for block in blocks.values()}
        if len(rows) != 1:
            raise ValueError("blocks with different numbers of rows")
        for name, block in blocks.items():
            _write_rows(self._datasets[name], self._rows_written, block)
        self._rows_written += rows.pop()


def split_output(spec: str) -> tuple[str, Optional[str]]:
    """Split an output ``file.h5:NAME`` into path and dataset name."""
    root, ext = os.path.splitext(spec)
    if ":" in ext:
        ext, _, name = ext.partition(":")
        return root + ext, name
    return spec, None


# --- checkpoints ----------------------------------------------------------------


class Checkpointer:
    """Saves a running fit's state to `path`, atomically, at most every `every` seconds.

    The checkpoint is an ordinary stats file whose metadata also records how
    many rows of which inputs it covers (``meta['checkpoint']``), so a later
    run can resume from it (:func:`normstats.pipeline.resume_row`).
    """

    def __init__(self, path: str, every: float, *, sources: Sequence[str], rows_total: int) -> None:
        self.path, self.every = path, float(every)
        self._info = {"sources": list(sources), "rows_total": int(rows_total)}
        self._last = time.monotonic()

    def __call__(self, state: Any, rows_done: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every or rows_done >= self._info["rows_total"]:
            return
        try:
            stats = state.result()
        except DataError:  # too few rows so far for a result; the next block may do
            return
        stats.meta["checkpoint"] = dict(self._info, rows_done=int(rows_done))
        write_stats(stats, self.path)
        self._last = now

    def remove(self) -> None:
        """Delete the checkpoint once the fit it protects is written."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
