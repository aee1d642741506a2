"""The ``normstats`` command line: thin click commands over the library.

This module stays light: the console script's :func:`main` installs its
signal handling before anything heavy is imported, so Ctrl-C at any moment
ends in exit 130 and one line, never a traceback. The click group ``cli``
and the command modules load on first use (see :mod:`normstats.cli.app` for
the exit codes).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any

__all__ = ["cli", "main", "commands", "interop"]


def main() -> None:
    """Entry point of the ``normstats`` console script."""
    if hasattr(signal, "SIGXFSZ"):
        # Past the file-size limit (ulimit -f) a write then fails with EFBIG, which is
        # reported like a full disk, instead of the signal killing the process mid-write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        # From here Ctrl-C and SIGTERM unwind (removing temporaries) instead of the start-up's
        # immediate exit (normstats/__init__.py).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
        code = _run()
    except KeyboardInterrupt:
        _ignore_signals()
        try:
            sys.stderr.write("Error: interrupted; no partial output was written\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        code = 130
    if _console_script():
        _leave(code)
    sys.exit(code)


def _console_script() -> bool:
    """Whether main() runs as the installed ``normstats`` script, not called by other
    Python code (which gets its SystemExit, and its interpreter stays up)."""
    return os.path.basename(getattr(sys.modules.get("__main__"), "__file__", None) or "") == "normstats"


def _leave(code: Any) -> None:
    """Exit with `code` as ``sys.exit`` would, but without Python's finalization.

    The command is over and its files are closed; what finalization would still do is
    tear down numba's and LLVM's modules: ~0.1-0.2 s of CPU per run, seconds on a loaded
    machine (which delayed the exit after SIGTERM with --jobs past its 2 s).
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit prints any other object and exits 1
        try:
            sys.stderr.write(f"{code}\n")
        except (OSError, ValueError):
            pass
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: _run reported it already
            pass
    os._exit(code & 0xFF)


def _run() -> Any:
    """Import the commands and run one; return the exit code, with signals ignored
    from then on (Python's exit must neither be interrupted nor write into a closed pipe)."""
    from .app import PIPE_CLOSED, silence_stdout

    group = _load()
    try:
        group.main(prog_name="normstats")  # standalone: it ends in SystemExit
        code: Any = 0
    except SystemExit as done:
        code = done.code
    _ignore_signals()
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        silence_stdout()
        code = PIPE_CLOSED
    return code


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _load() -> Any:
    """The click group with every command registered."""
    from . import commands, interop  # noqa: F401  (register the commands on the group)
    from .app import cli

    return cli


def __getattr__(name: str) -> Any:
    if name == "cli":
        return _load()
    if name in ("commands", "interop", "app", "report", "params", "files"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("CommandError", "NormstatsGroup", "INTERRUPTED"):  # defined here before the group moved
        return getattr(importlib.import_module(f"{__name__}.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
