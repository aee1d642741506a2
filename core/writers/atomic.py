"""Atomic placement: outputs are written under a temporary name beside their
target and placed there only when complete."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import functools
import os
import re
import secrets
import signal
import stat
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import OutputError, UsageError


# Temporaries are ".<output name>.<pid of the writer>.<random tag>.tmp" beside the output, so a
# later run can tell those of dead writers (SIGKILL, power loss) and remove them.
TAG_CHARS = 8
TEMPORARY = re.compile(r"\A\.(?P<base>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{%d}\.tmp\Z" % TAG_CHARS, re.DOTALL)
# The errors that mean "no room": disk full, quota, file-size limit (RLIMIT_FSIZE, the
# filesystem's largest file).
NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the filesystem's largest file"}
_RUN_STARTED = time.time()  # temporaries older than this, of dead writers, are stale
_swept: set[str] = set()
_REPLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("normstats_replace", default=True)


@contextlib.contextmanager
def overwriting(allowed: bool) -> Iterator[None]:
    """Within this block, outputs placed by :func:`atomic_path` (without an
    explicit `replace`) replace a file at their path only if `allowed`.

    Outside any such block they do (the library's default). The CLI sets it
    from ``--force``: without it, an output that appeared while the run
    worked is never replaced.
    """
    token = _REPLACE.set(bool(allowed))
    try:
        yield
    finally:
        _REPLACE.reset(token)


def _temporary_name(base: str, tag: str) -> str:
    return f".{base}.{os.getpid()}.{tag}.tmp"


@contextlib.contextmanager
def atomic_path(path: str, *, replace: Optional[bool] = None) -> Iterator[str]:
    """Yield a temporary path beside `path`; place it at `path` on success.

    On any exception (including KeyboardInterrupt) the temporary is removed
    and `path` is left as it was. A refusal of the system to store the bytes
    (disk full, file-size limit) becomes one :class:`OutputError`.

    Parameters
    ----------
    replace : bool, optional
        Whether a file at `path` may be replaced. If not, the temporary is
        linked into place (or renamed with ``RENAME_NOREPLACE``), so a file
        that appeared meanwhile is kept and the run fails. Default: as
        :func:`overwriting` says (outside it: replace).
    """
    with atomic_paths([path], replace=replace) as (temporary,):
        yield temporary


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str], *, replace: Optional[bool] = None) -> Iterator[list[str]]:
    """:func:`atomic_path` for outputs that belong together (a Kaldi ark and its scp).

    Yields one temporary per path; they are placed in the order of `paths`
    only when the block ends without an exception, all in one step with
    signals held. If placing one fails, those placed before it are removed
    again, so the set is never left half written (a file they had replaced
    with `replace` stays replaced: it was gone the moment they were placed).
    """
    replace = _REPLACE.get() if replace is None else replace
    places = [os.path.split(os.path.abspath(path)) for path in paths]
    for folder, _ in places:
        sweep_temporaries(folder)
    temporaries: list[str] = []
    placed: list[str] = []
    try:  # from here on, any exit (Ctrl-C included) removes the temporaries
        # Ctrl-C / SIGTERM are held while the temporaries are created: one landing between a
        # creation and the list holding it would strand it. Held signals arrive inside the guard.
        with held_signals():
            for folder, base in places:
                temporaries.append(_create_temporary(folder, base))
        yield list(temporaries)
        for temporary in temporaries:
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        with held_signals():  # placed and cleaned up as one step
            for temporary, path in zip(temporaries, paths):
                _place(temporary, path, replace)
                placed.append(path)
            # All placed: a signal held meanwhile (raised as this block ends) must not undo them
            # (a checkpoint that replaced the last one would be lost).
            placed.clear()
    except BaseException as error:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        for path in placed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(error, OSError) and (error.errno in NO_ROOM or error.filename in temporaries):
            failed = temporaries.index(error.filename) if error.filename in temporaries else len(placed)
            raise _refused(paths[min(failed, len(paths) - 1)], error) from None
        raise
    for folder in dict.fromkeys(folder for folder, _ in places):
        _sync_folder(folder)


def _refused(path: str, error: OSError) -> OutputError:
    """The system refused to store `path`'s bytes (its temporary is gone already)."""
    kept = f"the previous {path} is intact" if os.path.lexists(path) else "no output was left"
    if error.errno in NO_ROOM:
        return OutputError(f"cannot write {path}: {NO_ROOM[error.errno]} ({os.strerror(error.errno)}); "
                           f"{kept}; free space or write elsewhere")
    return OutputError(f"cannot write {path}: {error.strerror or error}; {kept}")


def _create_temporary(folder: str, base: str) -> str:
    """Create an empty temporary (mode 0666 less the umask, like any new file)."""
    while True:
        temporary = os.path.join(folder, _temporary_name(base, secrets.token_hex(TAG_CHARS // 2)))
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return temporary
        except FileExistsError:  # the same tag twice: draw another
            continue


def _place(temporary: str, path: str, replace: bool) -> None:
    if replace:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # fails if `path` exists, whatever it is (a dangling link too)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        _rename_noreplace(temporary, path)  # a filesystem without hard links (FAT, some FUSE)
        return
    os.unlink(temporary)


def _rename_noreplace(temporary: str, path: str) -> None:
    """``renameat2(RENAME_NOREPLACE)`` (Linux >= 3.15); where neither it nor links exist,
    a rename after a last look, which narrows the window to that instant."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(temporary), at_fdcwd, os.fsencode(path), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise _appeared(path)
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), path)
    if os.path.lexists(path):
        raise _appeared(path)
    os.rename(temporary, path)


def _appeared(path: str) -> UsageError:
    return UsageError(f"output {path!r} was created by someone else while this run worked; it was kept "
                      "and nothing was written; pass --force to overwrite it")


def _sync_folder(folder: str) -> None:
    """Make the rename durable (best effort: not every system can fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_temporaries(folder: str) -> list[str]:
    """Remove the temporaries that dead writers left in `folder`; return their names.

    Only names of this module's pattern count, only regular files written
    before this process started, and only of a pid that no longer runs on
    this machine. Each folder is swept once per process.
    """
    if folder in _swept:
        return []
    _swept.add(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMPORARY.match(entry.name)
        if not match or _alive(int(match["pid"])):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_mtime < _RUN_STARTED:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's live process, or not a pid
        return True
    return True


HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the block; a signal that came meanwhile arrives at its end.

    The calling thread's mask holds the signals sent to it (and a process forked
    inside starts with them held). In the main thread the handlers are also
    swapped for ones that note them: the kernel hands a process's signal to any
    thread not blocking it (a reader thread), and Python would then run the
    handler in the main thread at once.
    """
    masks = hasattr(signal, "pthread_sigmask")  # (not on Windows)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(HELD)) if masks else None
    pending: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in HELD}
    try:
        yield
    finally:
        steps = [functools.partial(signal.signal, signum, signal.SIG_DFL if handler is None else handler)
                 for signum, handler in handlers.items()]  # None: set outside Python
        if masks:
            steps.append(functools.partial(signal.pthread_sigmask, signal.SIG_SETMASK, previous))
        came = _every_step(steps)
        if came is not None:
            raise came
        if pending:
            signal.raise_signal(pending[0])  # as if it came now, to the handler it would have met


def _every_step(steps: Sequence[Callable[[], Any]]) -> Optional[KeyboardInterrupt]:
    """Run every one of `steps` (each may be repeated), whatever interrupts them.

    A signal that another thread took during the held block may have its Python
    handler run only now, once restored (a loaded machine schedules that thread
    late): its KeyboardInterrupt, raised between two steps, would leave the rest
    undone (the mask still blocking, the noting handler installed, so that later
    signals are lost). It is kept and returned instead, the steps completed.
    """
    came = None
    for step in steps:
        while True:
            try:
                step()
                break
            except KeyboardInterrupt as error:
                came = error
    return came
