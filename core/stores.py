"""Stats files (`.npz`, `.h5`, `.safetensors`, `.json`), array outputs, files
for other toolkits, and atomic writes.

Nothing here computes: stats go to disk as the state objects made them. Every
output is written under a temporary name in its target folder and renamed
into place only when complete, so a failed or interrupted run leaves either
no file or the previous one, never a partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import struct
import tempfile
import time
import zipfile
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from . import hdf5_policy
from .archives import NpzMembers, check_safetensors_header
from .errors import DataError, NormstatsError, StatsFileError, UsageError
from .limits import JSON_MAX_BYTES, check_expansion, check_fits_memory, elements, require_regular_file
from .sources import NPY_MAGIC, split_spec
from .stats import BATCHNORM, CENTERS, Stats, check_stats
from .stats_meta import check_arrays, check_meta

STATS_FORMATS = (".npz", ".h5", ".hdf5", ".safetensors", ".json")
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
    # Ctrl-C / SIGTERM are held while the temporary is created: one landing between its
    # creation and the guard below would strand it. Held signals arrive inside the guard.
    held = _hold_signals()
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    except BaseException:
        _release_signals(held)
        raise
    try:  # from here on, any exit (Ctrl-C included) removes the temporary
        _release_signals(held)
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


def _hold_signals() -> Optional[set]:
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _release_signals(previous: Optional[set]) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting it back and forth mid-run could be interrupted


# --- stats files -------------------------------------------------------------

# A `.safetensors` stats file keeps its metadata, as JSON, under this key of the
# header's __metadata__ (whose values must be strings).
SAFETENSORS_META_KEY = "normstats_meta"
# A `.json` stats file is {"format": JSON_FORMAT, "version": 1, "meta": {...},
# "arrays": {name: {"dtype": ..., "shape": [...], "data": nested lists}}}.
JSON_FORMAT = "normstats-stats"
JSON_VERSION = 1
# JSON has no NaN or infinity (Python's json writes bare NaN, which other parsers
# reject), so non-finite array values are written as these strings.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
JSON_DTYPES = frozenset(
    np.dtype(name).name
    for name in ("bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "uint16", "uint32", "uint64")
)
FORMAT_NAMES = ".npz, HDF5, .safetensors or .json"


def write_stats(stats: Stats, path: str) -> None:
    """Write `stats` atomically, in the format of the extension of `path`.

    ``.npz`` (metadata as the JSON string array ``meta``), ``.safetensors``
    (metadata as JSON under ``normstats_meta`` in the header), ``.json``
    (arrays as nested lists with dtype and shape, non-finite values as the
    strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``), else HDF5
    (metadata as attributes). Every format holds the same arrays and metadata.
    """
    meta = dict(stats.meta, kind=stats.kind)
    arrays = {name: np.asarray(value) for name, value in stats.arrays.items()}
    extension = _extension(path)
    with atomic_path(path) as temporary:
        if extension == ".npz":
            with open(temporary, "wb") as f:
                np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        elif extension == ".safetensors":
            write_safetensors(arrays, temporary, {SAFETENSORS_META_KEY: json.dumps(meta, sort_keys=True)})
        elif extension == ".json":
            _write_stats_json(arrays, meta, temporary)
        else:
            _write_stats_h5(arrays, meta, temporary)


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


def _write_stats_json(arrays: dict[str, np.ndarray], meta: dict[str, Any], path: str) -> None:
    # allow_nan=False: strict JSON that any parser reads. One line per part and
    # per array, so that a person can read the file and diff two of them.
    def dump(value: Any) -> str:
        return json.dumps(value, allow_nan=False, sort_keys=True)

    entries = [f"  {dump(name)}: " + dump({"dtype": a.dtype.name, "shape": list(a.shape), "data": _json_values(a)})
               for name, a in arrays.items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'{{"format": {dump(JSON_FORMAT)}, "version": {JSON_VERSION},\n "meta": {dump(meta)},\n'
                f' "arrays": {{\n' + ",\n".join(entries) + "}}\n")


def _json_values(array: np.ndarray) -> Any:
    """`array` as nested lists; non-finite floats as their NON_FINITE names."""
    values = array.tolist()
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return values

    def encode(value: Any) -> Any:
        if isinstance(value, list):
            return [encode(v) for v in value]
        if math.isnan(value):
            return "NaN"
        return value if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")

    return encode(values)


def read_stats(path: str, *, allow_external: bool = False) -> Stats:
    """Read a stats or centers file written by :func:`write_stats`.

    The format is recognized by content (HDF5, zip archive, safetensors header,
    JSON), else by extension. Nothing is ever unpickled: `.npz` files are
    loaded with ``allow_pickle=False``, and safetensors and JSON cannot hold
    Python objects. Every declared size is checked before anything is
    allocated, HDF5 arrays obey the outside-data policy
    (:mod:`normstats.hdf5_policy`; `allow_external` lifts it), and every
    metadata key normstats uses is checked for its type.

    Raises
    ------
    UsageError
        The file does not exist, or is a pipe or device; an HDF5 array comes
        from outside the file's folder.
    StatsFileError
        It is not a normstats stats file, is damaged, or holds a value of the
        wrong type (the message names the key).
    """
    require_file(path, "stats file")
    try:
        found = _stats_format(path)
        if found == ".h5":
            arrays, meta = _read_stats_h5(path, allow_external)
        else:
            reader = {".npz": _read_stats_npz, ".json": _read_stats_json,
                      ".safetensors": _read_stats_safetensors}[found]
            arrays, meta = reader(path)
        meta = check_meta(meta, path)
        arrays = check_arrays(arrays, path)
    except (StatsFileError, UsageError):
        raise
    except NormstatsError as error:  # a damaged HDF5 file, a declared size beyond the file
        raise StatsFileError(str(error)) from None
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, OverflowError, TypeError,
            zipfile.BadZipFile) as error:
        raise StatsFileError(
            f"{path} is not a readable normstats stats file ({FORMAT_NAMES}): "
            f"{_reason(error)}; re-create it with fit-bn or fit-centers"
        ) from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in (BATCHNORM, CENTERS) or "mode" not in meta:
        raise StatsFileError(f"{path} is not a normstats stats file (no kind/mode metadata)")
    return check_stats(Stats(kind, arrays, meta, source=path))


def require_file(path: str, what: str) -> None:
    """Raise UsageError unless `path` is an existing regular file (called `what`
    in the message): a pipe or device is refused before it is opened."""
    require_regular_file(path, what)


def _stats_format(path: str) -> str:
    """The stats format of the file at `path`: by its first bytes, else its extension."""
    import h5py

    if h5py.is_hdf5(path):
        return ".h5"
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith((b"PK", NPY_MAGIC)):
        return ".npz"  # a zip archive (or a lone .npy, which the .npz reader names)
    # safetensors: a little-endian u64 header length, then the JSON header. Text
    # (a JSON file) read as that length is beyond 2**56, never a plausible header.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 40:
        return ".safetensors"
    if head.lstrip()[:1] == b"{":
        return ".json"
    extension = _extension(path)
    return extension if extension in (".safetensors", ".json") else ".npz"


def _reason(error: Exception) -> str:
    """Why a stats file failed to load, without numpy's advice to unpickle."""
    text = str(error)
    if "pickle" in text:
        return "it is not a zip archive of plain arrays (normstats never unpickles)"
    return text or type(error).__name__


@contextlib.contextmanager
def _npz(path: str) -> Iterator[NpzMembers]:
    """An `.npz` archive whose members are read within their declared sizes,
    never unpickled; a damaged one is a StatsFileError."""
    with open(path, "rb") as f:
        try:
            archive = zipfile.ZipFile(f)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise StatsFileError(f"{path} is not a readable .npz archive: {_reason(error)}") from None
        with archive:
            yield NpzMembers(archive, path)


def _read_stats_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise StatsFileError(f"{path} is a single .npy array, not a normstats stats file")
    with _npz(path) as archive:
        if "meta" not in archive.files:
            raise StatsFileError(f"{path} has no 'meta' entry; it was not written by normstats")
        arrays = {name: archive[name] for name in archive.files if name != "meta"}
        meta = archive["meta"]
    if meta.dtype.kind != "U" or meta.ndim != 0:
        raise StatsFileError(f"stats file {path!r}: key 'meta' is not a JSON string")
    return arrays, json.loads(str(meta))


def _read_stats_h5(path: str, allow_external: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with hdf5_policy.open_file(path) as f:
        names = list(f)  # link names only: nothing is followed here
        arrays, taken = {}, 0
        for name in names:
            array = _h5_stats_array(path, name, allow_external)
            if array is not None:
                arrays[name] = array
                taken += array.nbytes
                check_fits_memory(taken, f"stats file {path!r}")
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


def _h5_stats_array(path: str, name: str, allow_external: bool) -> Optional[np.ndarray]:
    """The array `name` of an HDF5 stats file (None for a group), its size checked first."""
    where = f"stats file {path!r}: key {name!r}"
    located = hdf5_policy.locate(path, name, allow_external=allow_external, display=where)
    if not located.is_dataset:
        return None
    file, dataset = hdf5_policy.open_dataset(located)
    with file:
        if dataset.shape is None:
            raise StatsFileError(f"{where} is an empty dataset (no shape)")
        if dataset.dtype.kind not in "biuf":
            raise StatsFileError(f"{where}: holds {dataset.dtype} values, not numbers")
        declared = elements(dataset.shape) * dataset.dtype.itemsize
        if dataset.id.get_create_plist().get_nfilters():
            check_expansion(declared, dataset.id.get_storage_size(), where)
        check_fits_memory(declared, where)
        return np.asarray(dataset[()])


def _read_stats_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, header = read_safetensors(path)
    if SAFETENSORS_META_KEY not in header:
        raise StatsFileError(
            f"{path} has no normstats metadata; it was not written by normstats (a PyTorch "
            "state dict of a BatchNorm layer is converted with 'normstats import')"
        )
    return arrays, json.loads(header[SAFETENSORS_META_KEY])


def _read_stats_json(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > JSON_MAX_BYTES:
            raise StatsFileError(f"{path} is a {size}-byte JSON stats file, beyond the {JSON_MAX_BYTES} bytes "
                                 "normstats parses; write large statistics as .npz or .h5")
        document = json.loads(f.read())
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise StatsFileError(f'{path} is JSON but not a normstats stats file (no "format": "{JSON_FORMAT}")')
    if document.get("version") != JSON_VERSION:
        raise StatsFileError(
            f"{path} is a normstats JSON file of version {document.get('version')!r}; "
            f"this normstats reads version {JSON_VERSION}"
        )
    meta, entries = document.get("meta"), document.get("arrays")
    if not isinstance(meta, dict) or not isinstance(entries, dict):
        raise StatsFileError(f'{path} lacks the "meta" and "arrays" objects of a normstats JSON file')
    return {name: _json_array(entry, f"{path}: array {name!r}") for name, entry in entries.items()}, meta


def _json_array(entry: Any, where: str) -> np.ndarray:
    """Decode one ``{"dtype", "shape", "data"}`` entry, checking every part."""
    if not isinstance(entry, dict):
        raise StatsFileError(f"{where} is not an object with dtype, shape and data")
    name, shape, data = entry.get("dtype"), entry.get("shape"), entry.get("data")
    if name not in JSON_DTYPES:
        raise StatsFileError(f"{where} has dtype {name!r}; expected one of {', '.join(sorted(JSON_DTYPES))}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise StatsFileError(f"{where} has shape {shape!r}; expected a list of non-negative integers")
    level = [data]
    for size in shape:  # level by level, without recursion
        if not all(isinstance(node, list) and len(node) == size for node in level):
            raise StatsFileError(f"{where}: its data do not have the shape {tuple(shape)}")
        level = [item for node in level for item in node]
    dtype = np.dtype(name)
    if dtype.kind == "f":
        level = [NON_FINITE.get(v, v) if isinstance(v, str) else v for v in level]
        scalar = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in level)
    elif dtype.kind == "b":
        scalar = all(isinstance(v, bool) for v in level)
    else:
        scalar = all(isinstance(v, int) and not isinstance(v, bool) for v in level)
    if not scalar:
        raise StatsFileError(f"{where} holds values that are not {name} numbers")
    try:
        return np.array(level, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as error:
        raise StatsFileError(f"{where} holds values that do not fit {name} ({error})") from None


# --- safetensors -----------------------------------------------------------------


def write_safetensors(arrays: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    """Write `arrays` as tensors and `metadata` (strings) to `path` (not atomically:
    callers write into :func:`atomic_path`'s temporary)."""
    from safetensors.numpy import save_file

    # order="C", not ascontiguousarray: that would turn a 0-d statistic into shape (1,)
    save_file({name: np.asarray(a, order="C") for name, a in arrays.items()}, path, metadata=metadata)


def read_safetensors(path: str, names: Optional[Sequence[str]] = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors `names` (default: all) of a `.safetensors` file, and its metadata.

    The format holds only a JSON header and raw numbers, so reading it runs no
    code from the file; only the tensors asked for are read.

    Raises
    ------
    StatsFileError
        The file is damaged, is not safetensors, lacks one of `names`, or holds
        a dtype numpy has no type for (bfloat16).
    """
    from safetensors import SafetensorError, safe_open

    check_safetensors_header(path, None if names is None else list(names))
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            available = list(f.keys())
            missing = [name for name in names or () if name not in available]
            if missing:
                raise StatsFileError(f"{path} has no tensor {missing[0]!r}")
            arrays = {name: f.get_tensor(name) for name in (available if names is None else names)}
    except (SafetensorError, TypeError, ValueError, OSError) as error:
        if "bfloat16" in str(error):
            raise _bfloat16(path) from None
        raise StatsFileError(f"{path} is not a readable .safetensors file: {_reason(error)}") from None
    if any(array.dtype.name == "bfloat16" for array in arrays.values()):  # loadable once ml_dtypes is
        raise _bfloat16(path)
    return arrays, metadata


def _bfloat16(path: str) -> StatsFileError:
    return StatsFileError(
        f"{path} holds bfloat16 tensors, which numpy has no type for: save them as float32 "
        "(e.g. {k: v.float() for k, v in state_dict.items()})"
    )


def safetensors_index(path: str) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a `.safetensors` file, without reading tensors."""
    from safetensors import SafetensorError, safe_open

    check_safetensors_header(path, [])
    try:
        with safe_open(path, framework="np") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, TypeError, ValueError, OSError) as error:
        raise StatsFileError(f"{path} is not a readable .safetensors file: {_reason(error)}") from None


# --- files for other toolkits (normstats export) ---------------------------------

EXPORT_CONTAINERS = ("safetensors", "npz", "kaldi-matrix", "kaldi-ark")


def write_export(container: str, arrays: dict[str, np.ndarray], metadata: dict[str, str], path: str) -> None:
    """Write arrays in another toolkit's layout to `path`, atomically.

    Parameters
    ----------
    container : {'safetensors', 'npz', 'kaldi-matrix', 'kaldi-ark'}
        ``safetensors``: tensors plus `metadata` in the header; ``npz``: plain
        arrays, nothing else (tools such as ESPnet's aggregate_stats_dirs.py
        sum every entry); ``kaldi-matrix``: the one array of `arrays` as a
        Kaldi binary matrix; ``kaldi-ark``: each array under its key in a
        binary Kaldi archive.
    """
    if container not in EXPORT_CONTAINERS:
        raise UsageError(f"unknown export container {container!r}")
    with atomic_path(path) as temporary:
        if container == "safetensors":
            write_safetensors(arrays, temporary, metadata)
        elif container == "npz":
            with open(temporary, "wb") as f:
                np.savez(f, **arrays)
        else:
            with open(temporary, "wb") as f:
                for key, matrix in arrays.items():
                    if container == "kaldi-ark":
                        f.write(key.encode() + b" ")  # an archive entry: "key " then the object
                    f.write(kaldi_binary_matrix(matrix))


def kaldi_binary_matrix(matrix: np.ndarray) -> bytes:
    """`matrix` in Kaldi's binary ``Matrix<double>`` format, as ``copy-matrix`` reads it.

    Kaldi's layout (matrix/kaldi-matrix.cc ``MatrixBase::Write`` after
    ``Output::Open``'s binary header): ``\\0B`` (binary mode), the token
    ``DM `` (double matrix), then rows and columns each as a size byte 4 and a
    little-endian int32, then the values row by row as little-endian float64.
    """
    matrix = np.asarray(matrix, dtype="<f8")
    rows, cols = matrix.shape
    return (b"\0B" + b"DM " + b"\x04" + struct.pack("<i", rows) + b"\x04" + struct.pack("<i", cols)
            + np.ascontiguousarray(matrix).tobytes())


def read_array(spec: str, *, allow_external: bool = False) -> np.ndarray:
    """Read a small array (gamma, beta, initial centers) from `.npy`, `.npz` or
    `.safetensors` (``file:NAME``, or the file's only array) or ``file.h5:NAME``;
    never unpickles. Its declared size is checked against the file and the
    memory at hand first; HDF5 data obeys the outside-data policy."""
    from .sources import open_source

    path, name = split_spec(spec)
    if _extension(path) in (".npz", ".safetensors"):
        require_file(path, "file")
        if _extension(path) == ".safetensors":
            key = _array_name(path, safetensors_index(path)[0], name)
            return read_safetensors(path, [key])[0][key]
        with _npz(path) as archive:
            return archive[_array_name(path, [n for n in archive.files if n != "meta"], name)]
    source = open_source(spec, allow_external=allow_external)
    try:
        check_fits_memory(elements(source.shape) * source.dtype.itemsize, source.name)
        out = np.empty(source.shape, dtype=source.dtype)
        source.read_into(0, out)
        return out
    finally:
        source.close()


def _array_name(path: str, names: Sequence[str], name: Optional[str]) -> str:
    """`name` if the archive at `path` holds it, else its only array."""
    if name is None and len(names) != 1:
        raise UsageError(f"{path} holds {', '.join(names)}; name one as {path}:NAME")
    if name is not None and name not in names:
        raise UsageError(f"{path} has no array {name!r}; it has: {', '.join(names)}")
    return name or names[0]


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


def _write_npy_header(f: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The `.npy` header of a C-order array; its data follows at ``f.tell()``."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)


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
            _write_npy_header(f, self.shape, self.dtype)
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


@dataclasses.dataclass(frozen=True)
class RowRegion:
    """The data area of an output file: rows live at ``offset + row * row_bytes``.

    Plain data, so it pickles to workers, which write disjoint rows in place
    (on the same machine, or on storage every worker mounts at this path).
    """

    path: str
    offset: int
    row_bytes: int
    dtype: str

    def write(self, row: int, block: np.ndarray) -> None:
        """Write `block` as rows ``row:row + len(block)``."""
        data = memoryview(np.ascontiguousarray(block, dtype=self.dtype)).cast("B")
        position = self.offset + row * self.row_bytes
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while data:  # pwrite may write less than asked
                written = os.pwrite(fd, data, position)
                data, position = data[written:], position + written
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Flush this process's writes to the storage."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def preallocated_output(path: str, shape: tuple[int, ...], dtype: np.dtype,
                        dataset: str = "data") -> Iterator[RowRegion]:
    """An output `.npy` or HDF5 file whose data area exists before any row is written.

    Yields the :class:`RowRegion` of a temporary file beside `path` that
    other processes fill in any order; on a clean exit the file is renamed
    into place, on an exception it is removed. The HDF5 dataset is contiguous
    and allocated at creation, so rows are raw bytes at a fixed offset and
    writers never touch HDF5 metadata (no lock, no parallel HDF5 needed).
    """
    path, name = split_output(path)
    shape, dtype = tuple(shape), np.dtype(dtype).newbyteorder("=")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with atomic_path(path) as temporary:
        if _extension(path) == ".npy":
            with open(temporary, "wb") as f:
                _write_npy_header(f, shape, dtype)
                offset = f.tell()
                f.truncate(offset + shape[0] * row_bytes)
        else:
            import h5py

            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            with h5py.File(temporary, "w") as f:
                offset = f.create_dataset(name or dataset, shape=shape, dtype=dtype, dcpl=dcpl).id.get_offset()
        yield RowRegion(temporary, int(offset), row_bytes, dtype.str)


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
