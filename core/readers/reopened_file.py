"""A file read with ``pread``, opened at its first read and again after :meth:`ReopenedFile.close`.

The readers that go around a library (`.npy` files, raw members of
containers, HDF5 data stored contiguously or as raw chunks) keep only a
path between reads: the descriptor is opened when first needed, so a
thousand shards never hold a thousand descriptors, and it never travels in a
pickle (a worker process opens its own).
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

from ..errors import DataError


def _pread_exact(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes at `offset`; return the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


class ReopenedFile:
    """A read-only descriptor of `path`, opened lazily (safe from several threads).

    Parameters
    ----------
    path : str
        The file opened.
    name : str, optional
        The file for messages (default: `path`), e.g. the dataset it holds.
    """

    def __init__(self, path: str, name: Optional[str] = None) -> None:
        self.path = path
        self.name = path if name is None else name
        self._fd: Optional[int] = None
        self._lock = threading.Lock()

    def descriptor(self, reading: Optional[Callable[[], str]] = None) -> int:
        """The open descriptor, opened now if it is not; `reading` names, for the message,
        what the read was for (called only if the file cannot be opened).

        Raises
        ------
        DataError
            The file can no longer be opened (removed or replaced under the run).
        """
        fd = self._fd
        if fd is not None:  # the common case takes no lock
            return fd
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as error:
                    purpose = f" to read {reading()}" if reading is not None else ""
                    raise DataError(f"{self.name} cannot be opened again ({error.strerror}){purpose}; it was "
                                    "removed or replaced while the run went on") from None
            return self._fd

    def read(self, view: memoryview, offset: int, reading: Optional[Callable[[], str]] = None) -> int:
        """Read ``len(view)`` bytes at `offset` into `view`; return the bytes read (fewer
        only at the end of the file)."""
        return _pread_exact(self.descriptor(reading), view, offset)

    def fstat(self) -> os.stat_result:
        """The stat of the file opened (even if its name now holds another)."""
        return os.fstat(self.descriptor())

    def close(self) -> None:
        """Close the descriptor (a later read opens the file again)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __getstate__(self) -> dict:
        # the descriptor and the lock stay with this process; a copy opens its own at its first read
        return {"path": self.path, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["name"])
