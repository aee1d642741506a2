"""Stats files: written and read in the format of their extension (`.npz`,
`.h5`, `.safetensors`, `.json`), each format in its own module."""

from __future__ import annotations

import json
import zipfile
from typing import Optional

import numpy as np

from ..errors import NormstatsError, StatsFileError, UsageError
from ..readers.npy import NPY_MAGIC
from ..stats import BATCHNORM, CENTERS, Stats, check_stats
from ..stats_meta import check_arrays, check_meta
from . import stats_h5
from .atomic import atomic_path, held_signals
from .base import _extension, _reason, require_file
from .safetensors_file import SAFETENSORS_META_KEY, _read_stats_safetensors, write_safetensors
from .stats_json import _read_stats_json, _write_stats_json
from .stats_npz import _read_stats_npz


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
            stats_h5._write_stats_h5(arrays, meta, temporary)


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
            arrays, meta = stats_h5._read_stats_h5(path, allow_external)
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
