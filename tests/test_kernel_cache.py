"""The kernels' cache loader (normstats.kernel_cache): loads without numba's context refresh,
and saves / loads under the cache folder's lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from normstats import compiled, kernel_cache

KERNEL = textwrap.dedent(
    """
    import numba

    @numba.njit(cache=True)
    def scaled_sum(x):
        total = 0.0
        for v in x:
            total += v * 1.5
        return total
    """
)

# A fresh interpreter: imports the kernel module, gives it normstats' loader, calls it and
# reports whether it came from the cache (numba's own counters).
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import kernel
    from normstats.kernel_cache import load_cached_quickly
    load_cached_quickly([kernel.scaled_sum])
    x = np.arange(10, dtype=sys.argv[2])
    value = kernel.scaled_sum(x)
    stats = kernel.scaled_sum.stats
    print(value, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    """
)


def _held_elsewhere(folder: Path, exclusive: bool):
    """Whether another open file description cannot take the lock right now (None: no folder)."""
    if not folder.is_dir():
        return None
    fd = os.open(folder / kernel_cache.LOCK_NAME, os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class _Cache:
    """What the loader uses of a numba cache, recording the lock while it works."""

    def __init__(self, folder: Path) -> None:
        self.cache_path = str(folder)
        self.seen: list[tuple[str, bool, bool]] = []

    def load_overload(self, sig, target_context):  # numba's, replaced by the loader
        raise AssertionError("numba's own loader was kept")

    save_overload = load_overload

    def _guard_against_spurious_io_errors(self):
        return contextlib.nullcontext()

    def _load_overload(self, sig, target_context):
        folder = Path(self.cache_path)
        self.seen.append(("load", _held_elsewhere(folder, exclusive=True), _held_elsewhere(folder, exclusive=False)))
        return "loaded"

    def _save_overload(self, sig, data):
        folder = Path(self.cache_path)
        self.seen.append(("save", _held_elsewhere(folder, exclusive=True), _held_elsewhere(folder, exclusive=False)))


class _Dispatcher:
    def __init__(self, cache: _Cache) -> None:
        self._cache = cache


def test_saves_hold_the_lock_exclusively_and_loads_shared(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "cache"
    cache = _Cache(folder)
    started = []
    monkeypatch.setattr("numba.core.runtime.rtsys.initialize", lambda context: started.append(context))
    kernel_cache.load_cached_quickly([_Dispatcher(cache)])
    cache.save_overload("sig", "data")  # creates the folder, as numba's save would
    assert cache.load_overload("sig", "context") == "loaded"
    # While saving, no one else may read or write; while loading, others may read but not write.
    assert cache.seen == [("save", True, True), ("load", True, False)]
    assert started == ["context"]  # the runtime is started before a load
    assert not _held_elsewhere(folder, exclusive=True)  # released after each


def test_a_load_before_anything_was_cached_runs_unlocked(tmp_path: Path, monkeypatch) -> None:
    cache = _Cache(tmp_path / "none")
    monkeypatch.setattr("numba.core.runtime.rtsys.initialize", lambda context: None)
    kernel_cache.load_cached_quickly([_Dispatcher(cache)])
    assert cache.load_overload("sig", "context") == "loaded"
    assert cache.seen == [("load", None, None)]
    assert not (tmp_path / "none").exists()  # a load creates no folder


def test_the_fits_kernels_use_the_loader() -> None:
    for name in ("_accumulate", "_update_groups", "_fold_exact", "_slot_rows", "_fold_centers_ema", "_fold_runs",
                 "_group_runs", "_order_by_group"):
        cache = getattr(compiled, name)._cache
        assert cache.load_overload.func is kernel_cache._load_overload, name
        assert cache.save_overload.func is kernel_cache._save_overload, name


def test_a_miss_compiles_and_the_next_process_loads_the_same_kernel(tmp_path: Path) -> None:
    dtype = "float32"
    (tmp_path / "kernel.py").write_text(KERNEL)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), dtype], capture_output=True, text=True,
                           timeout=120, env=env) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
    (first, hits1, misses1), (second, hits2, misses2) = (done.stdout.split() for done in runs)
    expected = float(np.arange(10, dtype=dtype).astype(np.float64).sum() * 1.5)
    assert float(first) == float(second) == expected
    assert (int(hits1), int(misses1), int(hits2), int(misses2)) == (0, 1, 1, 0)
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").rglob(kernel_cache.LOCK_NAME))
