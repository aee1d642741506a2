"""`.npz` stats files: arrays plus the metadata as the JSON string array ``meta``."""

from __future__ import annotations

import contextlib
import json
import zipfile
from typing import Any, Iterator

import numpy as np

from ..archives import NpzMembers
from ..errors import StatsFileError
from ..readers.npy import NPY_MAGIC
from .base import _reason


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[NpzMembers]:
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
    with open_npz(path) as archive:
        if "meta" not in archive.files:
            raise StatsFileError(f"{path} has no 'meta' entry; it was not written by normstats")
        arrays = {name: archive[name] for name in archive.files if name != "meta"}
        meta = archive["meta"]
    if meta.dtype.kind != "U" or meta.ndim != 0:
        raise StatsFileError(f"stats file {path!r}: key 'meta' is not a JSON string")
    return arrays, json.loads(str(meta))
