"""Reused scratch arrays.

Fresh memory is expensive on the machines normstats runs on (the first touch
of a page costs far more than the arithmetic on it), so per-block temporaries
are allocated once and refilled.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class Workspace:
    """Named scratch arrays, grown on demand and never shrunk."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of `shape` and `dtype` backed by the buffer `name`.

        The content is undefined; the same memory is handed out again on the
        next call with the same name, so a caller must be done with it first.
        """
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.size < size:
            buffer = np.empty(max(size, 1), dtype=dtype)
            self._buffers[name] = buffer
        return buffer[:size].reshape(shape)


class KeepsScratch:
    """Mixin for state objects holding scratch memory in `_workspace`: it is
    left out when they pickle (they travel to workers as plain data)."""

    _workspace: Workspace

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_workspace", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workspace = Workspace()
