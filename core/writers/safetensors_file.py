"""`.safetensors` files: tensors plus string metadata in the header (stats
files, exports), and reading their tensors without running code from the file."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np

from ..archives import check_safetensors_header
from ..errors import StatsFileError
from .base import _reason


# A `.safetensors` stats file keeps its metadata, as JSON, under this key of the
# header's __metadata__ (whose values must be strings).
SAFETENSORS_META_KEY = "normstats_meta"


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


def _read_stats_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, header = read_safetensors(path)
    if SAFETENSORS_META_KEY not in header:
        raise StatsFileError(
            f"{path} has no normstats metadata; it was not written by normstats (a PyTorch "
            "state dict of a BatchNorm layer is converted with 'normstats import')"
        )
    return arrays, json.loads(header[SAFETENSORS_META_KEY])
