"""Safetensors tensors as inputs: ``file.safetensors:NAME`` (or a file with one tensor).

A tensor is stored raw, little-endian and C-ordered at the offsets its JSON
header declares (checked first by :func:`normstats.archives.check_safetensors_header`);
it is read with ``pread`` there, block by block.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..archives import check_safetensors_header
from ..errors import DataError, NormstatsError, UsageError
from .base import ArraySource
from .raw import RawArraySource

DTYPES = {"U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4", "I32": "<i4",
          "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}


def open_safetensors(path: str, name: Optional[str]) -> ArraySource:
    try:
        header = check_safetensors_header(path, names=[])
    except NormstatsError as error:
        raise DataError(str(error).replace("stats file ", "")) from None
    tensors = [key for key in header if key != "__metadata__"]
    if name is None:
        if len(tensors) != 1:
            raise UsageError(f"{path} holds {len(tensors)} tensors ({', '.join(tensors) or 'none'}); "
                             f"name one as {path}:NAME")
        name = tensors[0]
    if name not in tensors:
        raise UsageError(f"{path} has no tensor {name!r}; it has: {', '.join(tensors) or 'none'}")
    entry = header[name]
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise DataError(f"{path}:{name} holds {entry['dtype']} values, which numpy does not read; save it as "
                        "F16, F32 or F64")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    start = 8 + length + entry["data_offsets"][0]
    return RawArraySource(path, f"{path}:{name}", name, start, tuple(entry["shape"]), np.dtype(dtype))
