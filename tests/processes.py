"""Where a child process of a test is, read from /proc (Linux): so that a signal is timed by
what the process has done, never by a sleep, which the load of a shared machine stretches."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

POLL_SECONDS = 0.001


def has_proc() -> bool:
    return Path("/proc/self/status").exists() and Path("/proc/self/io").exists()


def _status_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait(process: subprocess.Popen | int, ready: Callable[[int], int], timeout: float) -> bool:
    """Poll `ready(pid)` until true (True) or the process ends (False)."""
    pid = process if isinstance(process, int) else process.pid
    alive = (lambda: _alive(pid)) if isinstance(process, int) else (lambda: process.poll() is None)
    deadline = time.monotonic() + timeout
    while alive():
        try:
            if ready(pid):
                return True
        except (OSError, ValueError):  # exiting between the poll and the read
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} made no progress in {timeout} s")
        time.sleep(POLL_SECONDS)
    return False


def wait_until_normstats_runs(process: subprocess.Popen, timeout: float = 60) -> bool:
    """Wait until the console script runs normstats' code: the first thing ``import normstats``
    does there is to catch SIGTERM (Python itself leaves it at its default); False if the
    process ended first. Before that moment only Python starts (some 30 ms unloaded, several
    hundred under load), which no code of ours can guard."""
    bit = 1 << (signal.SIGTERM - 1)
    return _wait(process, lambda pid: _status_mask(pid, "SigCgt") & bit, timeout)


def bytes_read(pid: int) -> int:
    """What the process has read so far through read(2)-like calls (``rchar``: preadv included)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def wait_until_read(process: subprocess.Popen, nbytes: int, timeout: float = 120) -> bool:
    """Wait until the process has read `nbytes` (its imports included); False if it ended first."""
    return _wait(process, lambda pid: bytes_read(pid) >= nbytes, timeout)


def wait_until_unblocked(pid: int, timeout: float = 60) -> bool:
    """Wait until process `pid` (any, e.g. a grandchild) no longer blocks SIGTERM: a --jobs
    worker is forked with the signals held and unblocks them once its handlers are set, to
    run its task; False if it ended first."""
    bit = 1 << (signal.SIGTERM - 1)
    return _wait(pid, lambda pid: not _status_mask(pid, "SigBlk") & bit, timeout)
