"""Recognize a file's format by its first bytes, without importing the library that reads it.

Telling a stats file's format must not cost h5py's import (~50 ms of the start of every
``inspect``, ``merge`` or ``export`` of a ``.npz``); the HDF5 check here is the one the HDF5
library itself makes.
"""

from __future__ import annotations

import os

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: str) -> bool:
    """Whether `path` holds an HDF5 superblock signature where HDF5 looks for one: at
    byte 0, or after a user block, at 512, 1024, 2048, ... (the file format
    specification, "Format Signature"; what ``H5Fis_accessible`` / ``h5py.is_hdf5`` test)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False
