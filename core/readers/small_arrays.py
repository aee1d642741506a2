"""Small arrays read whole: gamma, beta, initial centers (``.npy``, ``.npz``,
``.safetensors``, ``file.h5:NAME``)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import UsageError
from ..limits import check_fits_memory, elements
from ..specs import split_spec
from ..writers.base import _extension, require_file
from ..writers.safetensors_file import read_safetensors, safetensors_index
from ..writers.stats_npz import open_npz
from .api import open_source


def read_array(spec: str, *, allow_external: bool = False) -> np.ndarray:
    """Read a small array (gamma, beta, initial centers) from `.npy`, `.npz` or
    `.safetensors` (``file:NAME``, or the file's only array) or ``file.h5:NAME``;
    never unpickles. Its declared size is checked against the file and the
    memory at hand first; HDF5 data obeys the outside-data policy."""
    path, name = split_spec(spec)
    if _extension(path) in (".npz", ".safetensors"):
        require_file(path, "file")
        if _extension(path) == ".safetensors":
            key = _array_name(path, safetensors_index(path)[0], name)
            return read_safetensors(path, [key])[0][key]
        with open_npz(path) as archive:
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
