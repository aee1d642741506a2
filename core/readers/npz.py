"""`.npz` members as inputs: ``file.npz:NAME`` (or ``file.npz`` holding one array).

An uncompressed (stored) member is a `.npy` at a byte offset of the zip:
read with ``pread`` there, like a `.npy` file. A compressed one is inflated
as a stream, block after block (never whole), within the expansion cap of
:mod:`normstats.limits`.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Any, Optional

import numpy as np

from ..archives import _npy_header
from ..errors import DataError, NormstatsError, UsageError
from ..limits import check_expansion, elements
from .base import ArraySource, _identity
from .raw import RawArraySource

LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
SKIP_BYTES = 8 << 20  # what a compressed member is skipped by, at a time


def open_npz(path: str, name: Optional[str]) -> ArraySource:
    """The member `name` of the `.npz` at `path` (the only one if None)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{path} is not a readable .npz file ({error})") from None
    with archive:
        members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i
                   for i in archive.infolist() if not i.is_dir()}
        if name is None:
            if len(members) != 1:
                raise UsageError(f"{path} holds {len(members)} arrays ({', '.join(members) or 'none'}); "
                                 f"name one as {path}:NAME")
            name = next(iter(members))
        if name not in members:
            raise UsageError(f"{path} has no array {name!r}; it has: {', '.join(members) or 'none'}")
        info = members[name]
        display = f"{path}:{name}"
        try:
            with archive.open(info) as member:
                shape, fortran, dtype, header = _npy_header(member, display)
        except NormstatsError as error:
            raise DataError(str(error)) from None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise DataError(f"{display} cannot be read ({error}); the file is damaged") from None
    declared = elements(shape) * dtype.itemsize
    if header + declared > info.file_size:
        raise DataError(f"{display} declares {declared} bytes of data but the member holds "
                        f"{max(info.file_size - header, 0)}; the file is damaged")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(LOCAL_HEADER)
        if len(local) < LOCAL_HEADER or local[:4] != b"PK\x03\x04":
            raise DataError(f"{display}: the zip's local header is damaged")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        start = info.header_offset + LOCAL_HEADER + name_length + extra_length + header
        return RawArraySource(path, display, name, start, shape, dtype, fortran=fortran)
    check_expansion(declared, info.compress_size, display)
    if fortran and len(shape) > 1:
        raise DataError(f"{display} is a compressed Fortran-order array, which cannot be streamed by rows; "
                        "save it in C order or uncompressed (np.savez)")
    return CompressedMember(path, name, shape, dtype, header)


class CompressedMember(ArraySource):
    """A deflated `.npz` member, inflated as a stream (sequential reads are the rule:
    a read before the stream's position starts it over)."""

    def __init__(self, path: str, member: str, shape: tuple[int, ...], dtype: np.dtype, header: int) -> None:
        self.path, self.dataset, self.name = path, member, f"{path}:{member}"
        self.shape, self.dtype = shape, np.dtype(dtype)
        self._header = header
        self._row_bytes = elements(shape[1:]) * self.dtype.itemsize
        self._identity = _identity(os.stat(path))
        self._stream: Optional[tuple[Any, Any, int]] = None  # (zip, member, row at its position)
        self._staging: Optional[np.ndarray] = None
        self._validate()

    def _at(self, row: int) -> Any:
        if self._stream is None or self._stream[2] > row:
            self.close()
            archive = zipfile.ZipFile(self.path)
            member = archive.open(self.dataset + ".npy" if self.dataset + ".npy" in archive.namelist()
                                  else self.dataset)
            member.read(self._header)
            self._stream = (archive, member, 0)
        archive, member, position = self._stream
        skip = (row - position) * self._row_bytes
        while skip:
            got = len(member.read(min(skip, SKIP_BYTES)))
            if not got:
                raise DataError(f"{self.name} ends early, before row {row}; the file is damaged")
            skip -= got
        self._stream = (archive, member, row)
        return member

    def read_into(self, start: int, out: np.ndarray) -> None:
        try:
            member = self._at(start)
            target = out if out.dtype == self.dtype else self._staged(out.shape)
            view, done = memoryview(target.reshape(-1).view(np.uint8)), 0
            while done < len(view):
                got = member.readinto(view[done:])
                if not got:
                    raise DataError(f"{self.name} ends early, before row {start + out.shape[0]}; the file "
                                    "is damaged")
                done += got
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise DataError(f"{self.name}: rows from {start} cannot be read ({error}); the file is damaged") from None
        if target is not out:
            out[...] = target
        self._stream = self._stream[:2] + (start + out.shape[0],)
        self._check_unchanged(os.stat(self.path))

    def _staged(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._staging is None or self._staging.shape != shape:
            self._staging = np.empty(shape, self.dtype)
        return self._staging

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream[0].close()
            self._stream = None
