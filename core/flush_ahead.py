"""Writeback of an output started while it is still being written.

An output is fsynced before it is placed (:mod:`normstats.writers.atomic`):
left to the end, that fsync waits for every byte to reach the storage after
the last one was written, so the run takes the writing *plus* the flush. A
thread that asks for the data written so far to be flushed (``fdatasync``)
every :data:`FLUSH_BYTES` keeps the storage busy while the rows are still
read, computed and written, and leaves the final fsync little to do.

Only the timing changes: the final fsync stays the one that counts (an error
of an early flush is left to it: it reports the same storage error, and a run
that fails before it removes the output anyway).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

FLUSH_BYTES = 64 << 20  # written between two flushes: a few blocks, far below the page cache


class FlushAhead:
    """Counts the bytes written to a file and flushes them in a thread every `every` bytes."""

    def __init__(self, path: Optional[str], every: Optional[int] = None) -> None:
        self.path, self.every = path, int(every or FLUSH_BYTES)
        self._pending = 0
        self._wanted = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._fd: Optional[int] = None

    def start(self) -> "FlushAhead":
        if self.path is not None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError:  # (the writing itself reports what is wrong with the file)
                return self
            self._thread = threading.Thread(target=self._run, name="normstats-flush", daemon=True)
            self._thread.start()
        return self

    def written(self, nbytes: int) -> None:
        """Note `nbytes` more written; past `every` since the last flush, ask for one."""
        self._pending += int(nbytes)
        if self._pending >= self.every and self._thread is not None:
            self._pending = 0
            self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            with contextlib.suppress(OSError):  # the final fsync reports a storage error
                os.fdatasync(self._fd)

    def stop(self) -> None:
        """End the thread (after a flush under way) and close the file."""
        if self._thread is not None:
            self._stop = True
            self._wanted.set()
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def flush_ahead(path: Optional[str], every: Optional[int] = None) -> Iterator[FlushAhead]:
    """A :class:`FlushAhead` on `path` for the ``with`` block (a no-op for None); `every`
    defaults to :data:`FLUSH_BYTES`."""
    flusher = FlushAhead(path, every).start()
    try:
        yield flusher
    finally:
        flusher.stop()
