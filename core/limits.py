"""Sizes that files declare, checked before anything is allocated or read.

A header is a claim: a 128-byte `.npy` can declare 2**64 elements, a 2 KB zip
member 10**12, a 10 KB HDF5 file a dataset of a terabyte. Every reader asks
here first, with shapes multiplied out in Python integers (which never wrap,
unlike numpy's int64 ``prod``), and compares the claim with the bytes that
really exist and with the memory the machine has.
"""

from __future__ import annotations

import math
import os
import stat
from typing import Optional, Sequence

from .errors import DataError, UsageError

# A compressed member (npz deflate, HDF5 filters) may expand at most this much; past it, it
# is a decompression bomb rather than data (random floats compress ~1.1x, sparse ones ~10x).
EXPANSION_LIMIT = 100
# ... unless what it expands to is small anyway.
EXPANSION_FLOOR = 64 << 20
# Part of the available memory that one file read whole (stats, gamma, centers) may take.
MEMORY_SHARE = 0.5
JSON_MAX_BYTES = 256 << 20  # parsed, JSON numbers take ~10x their text (Python objects): past this, .npz


def elements(shape: Sequence[int]) -> int:
    """The number of elements of `shape`, exactly (Python integers never wrap)."""
    return math.prod(int(n) for n in shape)


def available_memory() -> int:
    """Bytes of memory available to this process now (Linux MemAvailable, else all RAM)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def check_fits_memory(nbytes: int, what: str) -> None:
    """Refuse to read `nbytes` whole when they exceed the memory share at hand.

    Raises
    ------
    DataError
        Naming `what`, the figure and the memory available.
    """
    limit = int(available_memory() * MEMORY_SHARE)
    if nbytes > limit:
        raise DataError(f"{what} declares {_size(nbytes)}, more than the {_size(limit)} of memory "
                        "normstats may take to read it whole; it is damaged or not meant to be read whole")


def check_expansion(nbytes: int, stored: int, what: str) -> None:
    """Refuse a compressed item that would expand from `stored` bytes to `nbytes`
    beyond EXPANSION_LIMIT times (a decompression bomb)."""
    if nbytes > EXPANSION_FLOOR and nbytes > EXPANSION_LIMIT * max(stored, 1):
        raise DataError(
            f"{what} declares {_size(nbytes)} stored in {_size(stored)} (more than {EXPANSION_LIMIT}x "
            "compression): refused as a decompression bomb; save it uncompressed if it is real"
        )


def check_stored(declared: int, stored: int, what: str, remedy: str = "re-create or re-copy it") -> None:
    """Refuse data that declares more bytes than the file stores."""
    if stored < declared:
        raise DataError(f"{what} declares {declared} bytes of data but the file holds {stored}; "
                        f"it is truncated or was never fully written: {remedy}")


def special_kind(mode: int) -> Optional[str]:
    """What a file of `mode` is when it is a FIFO, a socket or a device; None for
    anything else (a regular file, a folder, a link)."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return None


def require_regular_file(path: str, what: str) -> os.stat_result:
    """The stat of `path`, which must be a regular file (after symlinks).

    Pipes, FIFOs and devices are refused before they are opened (opening a
    FIFO would block, reading it would consume it): every reader seeks, and
    reads a file more than once.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path!r} does not exist") from None
    except OSError as error:
        raise UsageError(f"{what} {path!r} cannot be examined ({error.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{what} {path!r} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {path!r} is {special_kind(info.st_mode) or 'not a regular file'}; normstats "
                         "reads its files more than once and at offsets, which pipes (FIFOs), sockets and devices do not allow: "
                         "save the data to a file first")
    return info


def _size(nbytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
