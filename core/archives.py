"""Readers of small whole-file formats that check every declared size first:
`.npz` members (a zip of `.npy` files) and `.safetensors` headers.

``np.load`` of an `.npz` member allocates what its header declares and
inflates what its deflate stream holds: a 2 KB member can declare 10**12
elements, a 2 MB one inflate to gigabytes. Here a member's `.npy` header is
read first, its declared size compared with the zip's record of the member,
the compression ratio and the memory at hand, and then exactly the declared
bytes are read, no more. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tokenize
import zipfile
from typing import Any, Optional

import numpy as np

from .errors import StatsFileError
from .limits import check_expansion, check_fits_memory, elements

SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors format's own cap on its JSON header
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
                        "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


class NpzMembers:
    """The arrays of an open `.npz` archive, each read within its declared size.

    Parameters
    ----------
    archive : zipfile.ZipFile
    path : str
        For messages.
    """

    def __init__(self, archive: zipfile.ZipFile, path: str) -> None:
        self._archive, self.path = archive, path
        self._members = {(info.filename[:-4] if info.filename.endswith(".npy") else info.filename): info
                         for info in archive.infolist() if not info.is_dir()}
        self.files = list(self._members)
        self._taken = 0  # bytes of the members read so far: all of them must fit together

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._members[name]
        where = f"{self.path}: key {name!r}"
        if not info.filename.endswith(".npy"):
            raise StatsFileError(f"{where} is not a .npy array ({info.filename})")
        with self._archive.open(info) as member:
            shape, fortran, dtype, header = _npy_header(member, where)
            declared = elements(shape) * dtype.itemsize
            if header + declared > info.file_size:
                raise StatsFileError(f"{where} declares {declared} bytes of data but the member holds "
                                     f"{max(info.file_size - header, 0)}; the file is damaged")
            if info.compress_type != zipfile.ZIP_STORED:
                check_expansion(declared, info.compress_size, where)
            check_fits_memory(self._taken + declared, where)
            data = bytearray(declared)
            view, done = memoryview(data), 0
            while done < declared:  # never more than declared, whatever the stream inflates to
                got = member.readinto(view[done:])
                if not got:
                    raise StatsFileError(f"{where} ends after {done} of its {declared} bytes; the file is damaged")
                done += got
        self._taken += declared
        array = np.frombuffer(data, dtype=dtype) if declared else np.empty(0, dtype)
        return array.reshape(shape, order="F" if fortran else "C")


def _npy_header(member: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header bytes) of the `.npy` stream `member`."""
    try:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(member)
    except (ValueError, OSError, SyntaxError, tokenize.TokenError, EOFError) as error:
        raise StatsFileError(f"{where} is not a readable .npy array ({error})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise StatsFileError(f"{where} holds Python objects; they are never loaded (normstats never unpickles)")
    if any(int(n) < 0 for n in shape):
        raise StatsFileError(f"{where} declares the shape {tuple(shape)}, with a negative size")
    # the header length: the stream's position (ZipExtFile.tell counts uncompressed bytes)
    return tuple(int(n) for n in shape), bool(fortran), dtype, member.tell()


def check_safetensors_header(path: str, names: Optional[list[str]] = None) -> dict[str, Any]:
    """The JSON header of a `.safetensors` file, every tensor's declared size checked.

    Each tensor's ``data_offsets`` must lie within the file's data and match
    its dtype and shape (Python integers, so no shape wraps); the header may
    not exceed the format's 100 MB cap. The tensors in `names` (default all)
    must fit in memory.

    Raises
    ------
    StatsFileError
        Naming the key whose entry is wrong.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StatsFileError(f"{path} is not a readable .safetensors file: it has {size} bytes, no header")
        length = int.from_bytes(head, "little")
        if length > min(SAFETENSORS_HEADER_LIMIT, size - 8):
            raise StatsFileError(f"{path} is not a readable .safetensors file: its header declares {length} "
                                 f"bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as error:
            raise StatsFileError(f"{path} is not a readable .safetensors file: its header is not JSON "
                                 f"({error})") from None
    if not isinstance(header, dict):
        raise StatsFileError(f"{path} is not a readable .safetensors file: its header is not an object")
    data_bytes = size - 8 - length
    wanted = 0
    for key, entry in header.items():
        where = f"{path}: key {key!r}"
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise StatsFileError(f"{where} must map names to strings")
            continue
        if not isinstance(entry, dict):
            raise StatsFileError(f"{where} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise StatsFileError(f"{where} has shape {shape!r}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise StatsFileError(f"{where} has data_offsets {offsets!r}, not within the file's "
                                 f"{data_bytes} data bytes; the file is damaged")
        if not isinstance(dtype, str):
            raise StatsFileError(f"{where} has dtype {dtype!r}; expected a safetensors dtype name")
        itemsize = SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and elements(shape) * itemsize != offsets[1] - offsets[0]:
            raise StatsFileError(f"{where} declares {dtype} of shape {tuple(shape)} in "
                                 f"{offsets[1] - offsets[0]} bytes; the file is damaged")
        if names is None or key in names:
            wanted += offsets[1] - offsets[0]
    check_fits_memory(wanted, path)
    return header
