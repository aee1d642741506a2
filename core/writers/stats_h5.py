"""HDF5 stats files: arrays as datasets, the metadata as file attributes."""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from .. import hdf5_policy
from ..errors import StatsFileError
from ..limits import check_expansion, check_fits_memory, elements
from .rows import _layout


def _write_stats_h5(arrays: dict[str, np.ndarray], meta: dict[str, Any], path: str) -> None:
    # A 0-d statistic has no place of its own in the file (HDF5 keeps it in the dataset's
    # header), so it is given to HDF5 with the metadata; the others are written after it.
    scalars = {name: a for name, a in arrays.items() if a.ndim == 0}
    regions = _layout(path, ".h5", {name: (a.shape, a.dtype) for name, a in arrays.items() if a.ndim},
                      meta, values=scalars)
    for name, region in regions.items():
        region.write(0, arrays[name])


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
