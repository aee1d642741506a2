"""The `.npy` layout of an array output: a header, then the rows in C order."""

from __future__ import annotations

from typing import Any

import numpy as np


def _write_npy_header(f: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The `.npy` header of a C-order array; its data follows at ``f.tell()``."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)
