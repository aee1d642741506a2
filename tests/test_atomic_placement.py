"""A Ctrl-C held while outputs are placed arrives after them and undoes nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from normstats.writers import atomic


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt here (a pytest-xdist worker ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("count", [1, 2])
def test_a_signal_held_during_placement_keeps_every_placed_file(tmp_path: Path, monkeypatch, ctrl_c, replace,
                                                                count) -> None:
    paths = [str(tmp_path / f"out{i}.bin") for i in range(count)]
    if replace:
        for path in paths:  # the previous files (a checkpoint replacing the last one)
            Path(path).write_bytes(b"old")
    place = atomic._place

    def place_and_interrupt(temporary: str, path: str, replace: bool) -> None:
        place(temporary, path, replace)
        os.kill(os.getpid(), signal.SIGINT)  # held: raised when the placing step ends

    monkeypatch.setattr(atomic, "_place", place_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_paths(paths, replace=replace) as temporaries:
            for temporary in temporaries:
                Path(temporary).write_bytes(b"new")
    assert [Path(path).read_bytes() for path in paths] == [b"new"] * count
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(os.path.basename(p) for p in paths)


def test_a_failed_placement_removes_the_files_placed_before_it(tmp_path: Path, monkeypatch) -> None:
    paths = [str(tmp_path / "a.ark"), str(tmp_path / "a.scp")]
    place = atomic._place

    def fail_second(temporary: str, path: str, replace: bool) -> None:
        if path.endswith(".scp"):
            raise PermissionError(13, "refused", path)
        place(temporary, path, replace)

    monkeypatch.setattr(atomic, "_place", fail_second)
    with pytest.raises(PermissionError):
        with atomic.atomic_paths(paths, replace=False) as temporaries:
            for temporary in temporaries:
                Path(temporary).write_bytes(b"new")
    assert list(tmp_path.iterdir()) == []


def test_signals_are_held_while_another_thread_could_take_them(ctrl_c) -> None:
    # The kernel may hand a process's SIGINT to any thread not blocking it (a reader
    # thread); it must still wait for the end of the held block.
    import threading

    stop = threading.Event()
    reader = threading.Thread(target=stop.wait)
    reader.start()
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic.held_signals():
                for _ in range(20):
                    os.kill(os.getpid(), signal.SIGINT)
                    sum(range(10000))  # bytecodes at which a pending handler would run
                reached.append(True)
    finally:
        stop.set()
        reader.join()
    assert reached == [True]


def test_an_interrupt_while_the_signals_are_restored_leaves_nothing_held(monkeypatch) -> None:
    # A signal another thread took during the block may have its Python handler run only
    # once restored (a loaded machine schedules that thread late): its KeyboardInterrupt
    # must not leave the mask blocking or a noting handler installed (later signals lost).
    real = signal.signal
    raised = []

    def restore_then_interrupt(signum, handler):
        previous = real(signum, handler)
        if not raised:
            raised.append(signum)
            raise KeyboardInterrupt  # what the restored handler of the late signal does
        return previous

    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with pytest.raises(KeyboardInterrupt):
        with atomic.held_signals():
            monkeypatch.setattr(signal, "signal", restore_then_interrupt)
    monkeypatch.undo()
    assert raised and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask
