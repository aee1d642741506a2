"""Opening an input spec: the one place that picks the reader of a spec's kind."""

from __future__ import annotations

import os
from typing import Optional

from ..errors import DataError, UsageError
from ..file_signatures import is_hdf5
from ..limits import require_regular_file
from ..specs import KALDI, parse_spec
from .base import ArraySource
from .h5dataset import H5Source
from .npy import NPY_MAGIC, NpySource
from .remote import is_url


def _check_input_path(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"input file {path!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"input {path!r} is a directory (not a Zarr store); give the file inside it")
    require_regular_file(path, "input")
    if not os.access(path, os.R_OK):
        raise UsageError(f"input file {path!r} is not readable")


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
    parsed = parse_spec(spec, dataset)
    path, name = parsed.path, parsed.name
    if is_url(path):
        from .remote_sources import open_remote

        return open_remote(parsed)
    if parsed.kind in KALDI:
        from .kaldi import KaldiSource

        _check_input_path(path)
        return KaldiSource(path, parsed.kind)
    if parsed.kind == "zarr":
        from .zarr_array import ZarrSource

        if not os.path.exists(path):
            raise UsageError(f"input {path!r} does not exist")
        return ZarrSource(path, name)
    _check_input_path(path)
    if parsed.kind == "npz":
        from .npz import open_npz

        return open_npz(path, name)
    if parsed.kind == "safetensors":
        from .safetensors_tensor import open_safetensors

        return open_safetensors(path, name)
    if parsed.kind in ("parquet", "arrow"):
        from .arrow_column import ArrowColumn

        return ArrowColumn(path, name, parsed.kind)
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic == NPY_MAGIC:
        if name is not None:
            raise UsageError(f"{path} is a .npy file; it has no dataset {name!r}")
        return NpySource(path)
    if is_hdf5(path):
        from .h5collection import H5Collection, is_collection

        if name is not None and is_collection(path, name, allow_external):
            return H5Collection(path, name, allow_external=allow_external)
        return H5Source(path, name, allow_external=allow_external)
    from .kaldi import KaldiSource, looks_like_ark

    if name is None and looks_like_ark(path):  # a Kaldi archive under another extension
        return KaldiSource(path, "ark")
    raise DataError(f"{path} is neither a .npy nor an HDF5 file; name other formats by their extension "
                    "(.npz, .safetensors, .parquet, .arrow, .zarr) or kind (scp:, ark:)")
