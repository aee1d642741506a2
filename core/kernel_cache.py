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
"""

from __future__ import annotations

import functools
from typing import Any, Iterable


def load_cached_quickly(dispatchers: Iterable[Any]) -> None:
    """Let each of `dispatchers` load its cached machine code without refreshing
    numba's target context (see the module docstring); a miss compiles as usual."""
    try:
        from numba.core.runtime import rtsys
    except ImportError:  # pragma: no cover - another numba layout: keep its own loader
        return
    for dispatcher in dispatchers:
        cache = getattr(dispatcher, "_cache", None)
        if not all(hasattr(cache, name) for name in ("load_overload", "_load_overload",
                                                      "_guard_against_spurious_io_errors")):
            continue  # caching disabled, or numba's cache is built differently
        cache.load_overload = functools.partial(_load_overload, cache, rtsys)


def _load_overload(cache: Any, rtsys: Any, sig: Any, target_context: Any) -> Any:
    # What numba's Cache.load_overload does, minus target_context.refresh(): the
    # runtime is the one part of the refresh a cached kernel needs (without it
    # the first kernel that allocates would crash the process).
    rtsys.initialize(target_context)
    with cache._guard_against_spurious_io_errors():
        return cache._load_overload(sig, target_context)
