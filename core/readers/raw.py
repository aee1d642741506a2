"""Arrays stored raw at a byte offset of a container (an uncompressed `.npz`
member, a safetensors tensor), read with ``pread`` like a `.npy` file."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..limits import check_stored, elements
from .base import _identity
from .npy import NpySource
from .reopened_file import ReopenedFile


class RawArraySource(NpySource):
    """`shape` elements of `dtype` stored in C (or Fortran) order at byte `offset` of `path`."""

    def __init__(self, path: str, name: str, dataset: Optional[str], offset: int, shape: tuple[int, ...],
                 dtype: np.dtype, *, fortran: bool = False) -> None:
        self.path, self.name, self.dataset = path, name, dataset
        self._file = ReopenedFile(path)
        self._strips = self._staging = None
        self.shape, self.dtype, self._fortran = tuple(int(n) for n in shape), np.dtype(dtype), fortran
        self._offset = offset
        self._row_bytes = elements(self.shape[1:]) * self.dtype.itemsize
        info = os.stat(path)
        self._identity = _identity(info)
        check_stored(offset + elements(self.shape) * self.dtype.itemsize, info.st_size, name)
        self._validate()
