"""The HDF5 layout of array outputs: contiguous datasets allocated at creation,
so that rows are raw bytes at fixed offsets; attributes hold metadata."""

from __future__ import annotations

import array
import errno
import json
import os
import re
from typing import Any, Iterable, Optional

import numpy as np


def write_attrs(target: Any, meta: dict[str, Any]) -> None:
    """Store `meta` as HDF5 attributes of `target` (a file, group or dataset)."""
    for key, value in meta.items():
        # Scalars stay readable attributes; lists and None are stored as JSON.
        if isinstance(value, (str, bool, int, float)):
            target.attrs[key] = value
        else:
            target.attrs[key] = "json:" + json.dumps(value)


def _h5_skeleton(path: str, datasets: Iterable[tuple[str, tuple[int, ...], np.dtype]], attrs: dict[str, Any],
                 values: dict[str, np.ndarray]) -> np.ndarray:
    """Create the HDF5 file `path` with `datasets` (name, shape, dtype) allocated and
    unwritten, the whole `values` and `attrs`; each dataset's data offset, in order
    (-1: none, an empty dataset). The datasets may come one at a time (a collection
    output of many sequences makes no object per sequence)."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    offsets = array.array("q")
    try:
        with h5py.File(path, "w") as f:
            for name, shape, dtype in datasets:
                offset = f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl).id.get_offset()
                offsets.append(-1 if offset is None else offset)
            for name, value in values.items():
                f.create_dataset(name, data=value)
            write_attrs(f, attrs)
    except (OSError, RuntimeError) as error:  # HDF5 reports a failed write as either
        raise h5_write_error(error, path) from None
    return np.frombuffer(offsets, np.int64) if offsets else np.zeros(0, np.int64)


def h5_write_error(error: Exception, path: str) -> OSError:
    """An HDF5 write error as the OSError it stands for. The system's errno, where HDF5's
    message names it ("errno = 27"), wins over h5py's own: h5py may give a generic code
    (a file-size limit then read as an unnamed write failure)."""
    code = _h5_errno(str(error)) or getattr(error, "errno", None)
    return OSError(code or errno.EIO, str(error).split("\n")[0], path)


def _h5_errno(message: str) -> Optional[int]:
    match = re.search(r"errno = (\d+)", message)
    return int(match[1]) if match else None


def _check_file_size(path: str, size: int) -> None:
    """Refuse, as the system would, a file beyond the file-size limit, before the HDF5
    library meets the limit while it closes the file (an error it does not recover from)."""
    try:
        import resource
    except ImportError:  # Windows
        return
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size > limit:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path)
