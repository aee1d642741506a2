"""Faster loads of cached numba kernels: what a command's start-up pays per run.

Before it looks a signature up in its on-disk cache, numba refreshes the
target context: it imports and installs every lowering registry numba has
(all of ``numba.cpython`` and ``numba.np``) and scans the installed
packages' entry points for extensions. A compilation needs that; loading an
already compiled kernel from the cache does not -- it only needs numba's
runtime (NRT), which the refresh also starts. Measured on the fits' kernels
(numba 0.68): the first cached load takes ~0.25 s with the refresh and ~0.15 s
without it, once per process.

:func:`load_cached_quickly` gives given dispatchers a cache loader that starts
the runtime and skips the refresh. A cache miss still compiles through
numba's own path, which refreshes the context itself first. Only the given
dispatchers change; any other numba code in the process is left as numba
made it. Where numba's internals differ from what this expects (another
numba version), the dispatchers keep numba's own loader.

The same loader also makes the cache safe for processes that fill it at once
(``--jobs`` workers, parallel test workers, users of one installation on a
fresh cache). numba picks a data file name from the index it read, then
replaces the index and writes the data file: two processes saving different
signatures of one kernel at once can leave the index naming a data file the
other wrote, and a later process would load machine code compiled for other
argument types. Saves therefore hold an exclusive ``flock`` on a lock file in
the cache folder, and loads a shared one.

:class:`HeldFirstCalls` wraps a module's kernels so that the one call of
each that loads it (from the cache, else compiling it) runs with Ctrl-C and
SIGTERM held: a command loads only the kernels, and the variants of them,
that its data take, when it first takes them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType
from typing import Any, Callable, ContextManager, Iterable, Iterator

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: numba's own (unlocked) behaviour
    fcntl = None

LOCK_NAME = "normstats-kernels.lock"


def load_cached_quickly(dispatchers: Iterable[Any]) -> None:
    """Let each of `dispatchers` load its cached machine code without refreshing
    numba's target context (see the module docstring); a miss compiles as usual."""
    try:
        from numba.core.runtime import rtsys
    except ImportError:  # pragma: no cover - another numba layout: keep its own loader
        return
    for dispatcher in dispatchers:
        cache = getattr(dispatcher, "_cache", None)
        if not all(hasattr(cache, name) for name in ("load_overload", "_load_overload", "save_overload",
                                                      "_save_overload", "_guard_against_spurious_io_errors",
                                                      "cache_path")):
            continue  # caching disabled, or numba's cache is built differently
        cache.load_overload = functools.partial(_load_overload, cache, rtsys)
        cache.save_overload = functools.partial(_save_overload, cache)
        if hasattr(dispatcher, "_compilation_chain_init_hook"):
            # The hook scans every installed package's entry points for numba extensions
            # (~20 ms): these kernels use none, and other numba code still runs it itself.
            dispatcher._compilation_chain_init_hook = _no_extensions


def _no_extensions() -> None:
    pass


def _load_overload(cache: Any, rtsys: Any, sig: Any, target_context: Any) -> Any:
    # What numba's Cache.load_overload does, minus target_context.refresh(): the
    # runtime is the one part of the refresh a cached kernel needs (without it
    # the first kernel that allocates would crash the process).
    rtsys.initialize(target_context)
    with locked(cache.cache_path, exclusive=False), cache._guard_against_spurious_io_errors():
        return cache._load_overload(sig, target_context)


def _save_overload(cache: Any, sig: Any, data: Any) -> None:
    # numba's Cache.save_overload, under the exclusive lock.
    with locked(cache.cache_path, exclusive=True, create=True), cache._guard_against_spurious_io_errors():
        cache._save_overload(sig, data)


@contextlib.contextmanager
def locked(folder: str, *, exclusive: bool, create: bool = False) -> Iterator[None]:
    """Hold the kernel cache's lock in `folder` (shared or exclusive) for the block.

    Without a folder to lock in (nothing cached yet, when not `create`) or a
    lock file that cannot be opened (a read-only cache), the block runs
    unlocked: it then only reads what numba wrote.
    """
    fd = -1
    if fcntl is not None:
        try:
            if create:
                os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def argument_types(args: tuple) -> tuple:
    """What numba tells the variants of a kernel by, for `args`: an array's dtype,
    dimensions, layout, writability and alignment; any other value's type."""
    key = []
    for a in args:
        if isinstance(a, np.ndarray):
            flags = a.flags
            key.append((a.dtype, a.ndim, flags.c_contiguous, flags.f_contiguous, flags.writeable, flags.aligned))
        else:
            key.append(type(a))
    return tuple(key)


class _HeldFirstCall:
    """A kernel whose first call with new argument types runs inside `hold`."""

    __slots__ = ("kernel", "hold", "seen")

    def __init__(self, kernel: Callable, hold: Callable[[], ContextManager]) -> None:
        self.kernel = kernel
        self.hold = hold
        self.seen: set = set()

    def __call__(self, *args: Any) -> Any:
        key = argument_types(args)
        if key in self.seen:
            return self.kernel(*args)
        with self.hold():  # this call may load (or compile) the variant
            result = self.kernel(*args)
        self.seen.add(key)
        return result


class HeldFirstCalls:
    """The numba kernels of `modules` as attributes, each call that may load a
    kernel's variant (its argument types new in this process) run inside
    `hold` (e.g. signals held); later calls go straight to the kernel."""

    def __init__(self, modules: tuple[ModuleType, ...], hold: Callable[[], ContextManager]) -> None:
        from numba.core.dispatcher import Dispatcher

        for module in modules:
            for name, value in vars(module).items():
                if isinstance(value, Dispatcher):
                    setattr(self, name, _HeldFirstCall(value, hold))
