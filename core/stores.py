"""Stats files (`.npz`, `.h5`, `.safetensors`, `.json`), array outputs, files
for other toolkits, and atomic writes.

Nothing here computes: stats go to disk as the state objects made them. Every
output is written under a temporary name in its target folder and renamed
into place only when complete, so a failed or interrupted run leaves either
no file or the previous one, never a partial file.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import signal
import stat
import struct
import time
import zipfile
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from . import hdf5_policy
from .archives import NpzMembers, check_safetensors_header
from .errors import DataError, NormstatsError, OutputError, StatsFileError, UsageError
from .file_signatures import is_hdf5
from .limits import JSON_MAX_BYTES, check_expansion, check_fits_memory, elements, require_regular_file
from .sources import NPY_MAGIC, split_spec
from .stats import BATCHNORM, CENTERS, Stats, check_stats
from .stats_meta import check_arrays, check_meta

STATS_FORMATS = (".npz", ".h5", ".hdf5", ".safetensors", ".json")
ARRAY_FORMATS = (".npy", ".h5", ".hdf5")
# assign writes labels and distances together: HDF5 only, since a zip (.npz) can have one
# member open for writing at a time, and two .npy files could not be renamed into place at once
ASSIGN_FORMATS = (".h5", ".hdf5")
# Every extension an output may have: a name after one of them (`out.h5:NAME`) is a dataset.
KNOWN_OUTPUTS = tuple(dict.fromkeys(STATS_FORMATS + ARRAY_FORMATS + (".png", ".cmvn", ".mat", ".ark")))


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def check_output(path: str, *, force: bool, formats: Sequence[str]) -> None:
    """Refuse an output path before any work is done.

    (Whether it is also an input, or another output, is the business of
    :class:`normstats.files.CommandFiles`, which calls this for each output.)

    Raises
    ------
    UsageError
        Unknown extension, missing or unwritable folder, a name too long for
        its temporary, an existing file (or link) without `force`, or a directory.
    """
    path, dataset = split_output(path)
    if dataset is not None and (formats is not ARRAY_FORMATS or _extension(path) == ".npy"):
        what = {".npy": "a .npy file holds one unnamed array"}.get(_extension(path)) or \
            ("a stats file takes no dataset name" if formats is STATS_FORMATS else "this output takes no dataset name")
        raise UsageError(f"output {path}:{dataset}: {what}; write {path}")
    if _extension(path) not in formats:
        raise UsageError(
            f"output {path!r} must end in one of {', '.join(formats)} (the format follows the extension)"
        )
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise UsageError(f"output {path!r} is a directory")
    kind = _special_kind(path)
    if kind:  # --force replaces a file, never a FIFO, socket or device that has the name
        raise UsageError(f"output {path!r} is {kind}, not a file; write to another path")
    _check_name_length(folder, base)
    if os.path.lexists(path) and not force:
        raise UsageError(f"output {path!r} exists; pass --force to overwrite it")


def _check_name_length(folder: str, base: str) -> None:
    """The output's temporary must be a legal name in `folder`, or the work would be lost at the end."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    longest = len(os.fsencode(_temporary_name(base, "x" * TAG_CHARS)))
    if longest > name_max:
        room = name_max - (longest - len(os.fsencode(base)))
        raise UsageError(
            f"output name {base!r} is too long: its temporary needs {longest} bytes, and names in "
            f"{folder} have at most {name_max}; choose a name of at most {room} bytes"
        )


# --- atomic placement -------------------------------------------------------------

# Temporaries are ".<output name>.<pid of the writer>.<random tag>.tmp" beside the output, so a
# later run can tell those of dead writers (SIGKILL, power loss) and remove them.
TAG_CHARS = 8
TEMPORARY = re.compile(r"\A\.(?P<base>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{%d}\.tmp\Z" % TAG_CHARS, re.DOTALL)
# The errors that mean "no room": disk full, quota, file-size limit (RLIMIT_FSIZE, the
# filesystem's largest file).
NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the filesystem's largest file"}
_RUN_STARTED = time.time()  # temporaries older than this, of dead writers, are stale
_swept: set[str] = set()
_REPLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("normstats_replace", default=True)


@contextlib.contextmanager
def overwriting(allowed: bool) -> Iterator[None]:
    """Within this block, outputs placed by :func:`atomic_path` (without an
    explicit `replace`) replace a file at their path only if `allowed`.

    Outside any such block they do (the library's default). The CLI sets it
    from ``--force``: without it, an output that appeared while the run
    worked is never replaced.
    """
    token = _REPLACE.set(bool(allowed))
    try:
        yield
    finally:
        _REPLACE.reset(token)


def _temporary_name(base: str, tag: str) -> str:
    return f".{base}.{os.getpid()}.{tag}.tmp"


@contextlib.contextmanager
def atomic_path(path: str, *, replace: Optional[bool] = None) -> Iterator[str]:
    """Yield a temporary path beside `path`; place it at `path` on success.

    On any exception (including KeyboardInterrupt) the temporary is removed
    and `path` is left as it was. A refusal of the system to store the bytes
    (disk full, file-size limit) becomes one :class:`OutputError`.

    Parameters
    ----------
    replace : bool, optional
        Whether a file at `path` may be replaced. If not, the temporary is
        linked into place (or renamed with ``RENAME_NOREPLACE``), so a file
        that appeared meanwhile is kept and the run fails. Default: as
        :func:`overwriting` says (outside it: replace).
    """
    replace = _REPLACE.get() if replace is None else replace
    folder, base = os.path.split(os.path.abspath(path))
    sweep_temporaries(folder)
    # Ctrl-C / SIGTERM are held while the temporary is created: one landing between its
    # creation and the guard below would strand it. Held signals arrive inside the guard.
    with held_signals():
        temporary = _create_temporary(folder, base)
    try:  # from here on, any exit (Ctrl-C included) removes the temporary
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        with held_signals():  # placed and cleaned up as one step
            _place(temporary, path, replace)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError) and (error.errno in NO_ROOM or error.filename == temporary):
            raise _refused(path, error) from None
        raise
    _sync_folder(folder)


def _special_kind(path: str) -> Optional[str]:
    """What `path` is if it exists as neither a regular file nor a link (None otherwise)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return None


def _refused(path: str, error: OSError) -> OutputError:
    """The system refused to store `path`'s bytes (its temporary is gone already)."""
    kept = f"the previous {path} is intact" if os.path.lexists(path) else "no output was left"
    if error.errno in NO_ROOM:
        return OutputError(f"cannot write {path}: {NO_ROOM[error.errno]} ({os.strerror(error.errno)}); "
                           f"{kept}; free space or write elsewhere")
    return OutputError(f"cannot write {path}: {error.strerror or error}; {kept}")


def _create_temporary(folder: str, base: str) -> str:
    """Create an empty temporary (mode 0666 less the umask, like any new file)."""
    while True:
        temporary = os.path.join(folder, _temporary_name(base, secrets.token_hex(TAG_CHARS // 2)))
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return temporary
        except FileExistsError:  # the same tag twice: draw another
            continue


def _place(temporary: str, path: str, replace: bool) -> None:
    if replace:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # fails if `path` exists, whatever it is (a dangling link too)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        _rename_noreplace(temporary, path)  # a filesystem without hard links (FAT, some FUSE)
        return
    os.unlink(temporary)


def _rename_noreplace(temporary: str, path: str) -> None:
    """``renameat2(RENAME_NOREPLACE)`` (Linux >= 3.15); where neither it nor links exist,
    a rename after a last look, which narrows the window to that instant."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(temporary), at_fdcwd, os.fsencode(path), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise _appeared(path)
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), path)
    if os.path.lexists(path):
        raise _appeared(path)
    os.rename(temporary, path)


def _appeared(path: str) -> UsageError:
    return UsageError(f"output {path!r} was created by someone else while this run worked; it was kept "
                      "and nothing was written; pass --force to overwrite it")


def _sync_folder(folder: str) -> None:
    """Make the rename durable (best effort: not every system can fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_temporaries(folder: str) -> list[str]:
    """Remove the temporaries that dead writers left in `folder`; return their names.

    Only names of this module's pattern count, only regular files written
    before this process started, and only of a pid that no longer runs on
    this machine. Each folder is swept once per process.
    """
    if folder in _swept:
        return []
    _swept.add(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMPORARY.match(entry.name)
        if not match or _alive(int(match["pid"])):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_mtime < _RUN_STARTED:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's live process, or not a pid
        return True
    return True


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the block; a signal that came meanwhile arrives at its end."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


def write_stats(stats: Stats, path: str, *, replace: Optional[bool] = None) -> None:
    """Write `stats` atomically, in the format of the extension of `path`.

    ``.npz`` (metadata as the JSON string array ``meta``), ``.safetensors``
    (metadata as JSON under ``normstats_meta`` in the header), ``.json``
    (arrays as nested lists with dtype and shape, non-finite values as the
    strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``), else HDF5
    (metadata as attributes). Every format holds the same arrays and metadata.
    `replace`: whether a file at `path` may be replaced (see :func:`atomic_path`).
    """
    meta = dict(stats.meta, kind=stats.kind)
    arrays = {name: np.asarray(value) for name, value in stats.arrays.items()}
    extension = _extension(path)
    # Ctrl-C is held while a format library serializes: one raised inside its cleanup (zipfile,
    # HDF5) would be replaced by that library's own error. A stats file takes well under a
    # second; the held signal then lands in atomic_path, which removes the temporary.
    with atomic_path(path, replace=replace) as temporary, held_signals():
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
    # A 0-d statistic has no place of its own in the file (HDF5 keeps it in the dataset's
    # header), so it is given to HDF5 with the metadata; the others are written after it.
    scalars = {name: a for name, a in arrays.items() if a.ndim == 0}
    regions = _layout(path, ".h5", {name: (a.shape, a.dtype) for name, a in arrays.items() if a.ndim},
                      meta, values=scalars)
    for name, region in regions.items():
        region.write(0, arrays[name])


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
    if is_hdf5(path):
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


def npz_names(path: str) -> list[str]:
    """The arrays an `.npz` archive holds (member names without ``.npy``)."""
    require_file(path, "file")
    with _npz(path) as archive:
        return list(archive.files)


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
    from safetensors.numpy import save

    # order="C", not ascontiguousarray: that would turn a 0-d statistic into shape (1,).
    # Serialized here and written by Python, so a full disk is an OSError like any other.
    data = save({name: np.asarray(a, order="C") for name, a in arrays.items()}, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)


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
    with atomic_path(path) as temporary, held_signals():  # as in write_stats
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


# --- array outputs (apply, assign) ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowRegion:
    """The data area of an output file: rows live at ``offset + row * row_bytes``.

    Plain data, so it pickles to workers, which write disjoint rows in place
    (on the same machine, or on storage every worker mounts at this path).
    Rows are written with plain ``pwrite``: a full disk is an ordinary
    OSError, never an error inside the HDF5 library (whose file object may
    crash the process if closed after a failed write).
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


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize


def _layout(temporary: str, extension: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
            attrs: Optional[dict[str, Any]] = None,
            values: Optional[dict[str, np.ndarray]] = None) -> dict[str, RowRegion]:
    """Create `temporary` as a `.npy` (one array) or HDF5 file whose data areas
    exist, unwritten, before any value is; return where each array's rows go.

    The HDF5 datasets are contiguous and allocated at creation, so their
    values are raw bytes at fixed offsets: the HDF5 library writes only the
    metadata, here, and no value but the few small `values` (datasets
    written whole, with the metadata) -- no lock, no parallel HDF5 needed.
    """
    shapes = {name: (tuple(int(n) for n in shape), np.dtype(dtype).newbyteorder("="))
              for name, (shape, dtype) in arrays.items()}

    def region(name: str, offset: Optional[int]) -> RowRegion:
        shape, dtype = shapes[name]
        if offset is None and _nbytes(shape, dtype):
            raise RuntimeError(f"HDF5 gave dataset {name!r} no place in {temporary}")
        row_bytes = _nbytes(shape[1:], dtype) if shape else dtype.itemsize
        return RowRegion(temporary, int(offset or 0), row_bytes, dtype.str)

    if extension == ".npy":
        (name, (shape, dtype)), = shapes.items()
        with open(temporary, "wb") as f:
            _write_npy_header(f, shape, dtype)
            offset = f.tell()
            f.truncate(offset + _nbytes(shape, dtype))
        return {name: region(name, offset)}
    values = values or {}
    metadata = len(json.dumps(attrs or {}, default=str)) + 256 * (len(shapes) + len(values))
    _check_file_size(temporary, sum(_nbytes(*v) for v in shapes.values()) + 2 * metadata + (16 << 10))
    offsets = _h5_skeleton(temporary, shapes, attrs or {}, values)
    return {name: region(name, offsets[name]) for name in shapes}


def _h5_skeleton(path: str, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], attrs: dict[str, Any],
                 values: dict[str, np.ndarray]) -> dict[str, Optional[int]]:
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    try:
        with h5py.File(path, "w") as f:
            offsets = {name: f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl).id.get_offset()
                       for name, (shape, dtype) in shapes.items()}
            for name, value in values.items():
                f.create_dataset(name, data=value)
            write_attrs(f, attrs)
    except (OSError, RuntimeError) as error:  # HDF5 reports a failed write as either
        code = getattr(error, "errno", None) or _h5_errno(str(error))
        raise OSError(code or errno.EIO, str(error).split("\n")[0], path) from None
    return offsets


def _h5_errno(message: str) -> Optional[int]:
    match = re.search(r"errno = (\d+)", message)
    return int(match[1]) if match else None


def _check_file_size(path: str, size: int) -> None:
    """Refuse, as the system would, a file beyond the file-size limit, before the HDF5
    library meets the limit while it closes the file (an error it does not recover from)."""
    try:
        import resource
    except ImportError:  # Windows
        return
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size > limit:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path)


class _RowsWriter:
    """Rows written block by block into a temporary beside `path`, placed at
    `path` on a clean exit of the ``with`` block (removed on an exception).

    Subclasses say which arrays the file holds (``_arrays``) and its
    attributes (``_attrs``); ``_put`` writes the next rows of each.
    """

    def __init__(self, path: str, rows: int) -> None:
        self.path, self.rows = path, int(rows)
        self._context: Optional[contextlib.AbstractContextManager] = None
        self._rows_written = 0
        self._arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._attrs: dict[str, Any] = {}

    def __enter__(self) -> "_RowsWriter":
        self._context = atomic_path(self.path)
        temporary = self._context.__enter__()
        try:
            self._regions = _layout(temporary, _extension(self.path), self._arrays, self._attrs)
        except BaseException as error:
            if not self._context.__exit__(type(error), error, error.__traceback__):
                raise
        return self

    def _put(self, blocks: dict[str, np.ndarray]) -> None:
        rows = {block.shape[0] for block in blocks.values()}
        if len(rows) != 1:
            raise ValueError("blocks with different numbers of rows")
        for name, block in blocks.items():
            self._regions[name].write(self._rows_written, block)
        self._rows_written += rows.pop()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._rows_written != self.rows:
            exc = RuntimeError(f"wrote {self._rows_written} of {self.rows} rows")
            self._context.__exit__(RuntimeError, exc, None)
            raise exc
        self._context.__exit__(exc_type, exc, tb)


def _write_npy_header(f: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The `.npy` header of a C-order array; its data follows at ``f.tell()``."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)


class ArrayWriter(_RowsWriter):
    """Writes an array of known shape block by block to `.npy` or an HDF5 dataset.

    Use as a context manager: on a clean exit the file is placed at `path`,
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
        self._arrays = {self.dataset: (self.shape, self.dtype)}

    def write(self, block: np.ndarray) -> None:
        """Append the next rows."""
        self._put({self.dataset: block})


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
        self._arrays, self._attrs = dict(arrays), dict(attrs or {})

    def write(self, **blocks: np.ndarray) -> None:
        """Append the next rows of every dataset (one keyword each)."""
        if set(blocks) != set(self._arrays):
            raise ValueError(f"write needs {sorted(self._arrays)}, got {sorted(blocks)}")
        self._put(blocks)


@contextlib.contextmanager
def preallocated_output(path: str, shape: tuple[int, ...], dtype: np.dtype,
                        dataset: str = "data") -> Iterator[RowRegion]:
    """An output `.npy` or HDF5 file whose data area exists before any row is written.

    Yields the :class:`RowRegion` of a temporary file beside `path` that
    other processes fill in any order; on a clean exit the file is placed at
    `path`, on an exception it is removed.
    """
    path, name = split_output(path)
    with atomic_path(path) as temporary:
        regions = _layout(temporary, _extension(path), {name or dataset: (tuple(shape), dtype)})
        yield next(iter(regions.values()))


def split_output(spec: str) -> tuple[str, Optional[str]]:
    """Split an output ``file.h5:NAME`` (NAME may hold ``/``: ``file.h5:train/x``) into
    path and dataset name; a spec whose own extension is known is a plain path.

    >>> split_output("out.h5:train/x"), split_output("out.npy")
    (('out.h5', 'train/x'), ('out.npy', None))
    """
    if _extension(spec) in KNOWN_OUTPUTS:
        return spec, None
    cuts = [spec.lower().rfind(ext + ":") for ext in KNOWN_OUTPUTS]
    cut = max(cuts)
    if cut < 0:
        return spec, None
    end = cut + len(KNOWN_OUTPUTS[cuts.index(cut)])
    return spec[:end], spec[end + 1:].lstrip("/") or None


# --- checkpoints ----------------------------------------------------------------


class Checkpointer:
    """Saves a running fit's state to `path`, atomically, at most every `every` seconds.

    The checkpoint is an ordinary stats file whose metadata also records how
    many rows of which inputs it covers (``meta['checkpoint']``: the shard
    names, and each input file's absolute path, dataset, size and
    modification time), so a later run can resume from it over the same
    files only (:func:`normstats.pipeline.resume_row`).
    """

    def __init__(self, path: str, every: float, *, sources: Sequence[str], rows_total: int,
                 inputs: Sequence[dict] = ()) -> None:
        self.path, self.every = path, float(every)
        self._info = {"sources": list(sources), "rows_total": int(rows_total), "inputs": list(inputs)}
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
        write_stats(stats, self.path, replace=True)  # its own file, replaced at each save
        self._last = now

    def remove(self) -> None:
        """Delete the checkpoint once the fit it protects is written."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
