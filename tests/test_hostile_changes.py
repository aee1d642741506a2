"""Inputs that change under a run (cut, rewritten, replaced) stop it with an
error naming the file; pipes and devices are refused before they are opened."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns

SCRIPT = str(Path(sys.executable).with_name("normstats"))
ROWS, COLUMNS, BLOCK = 4000, 8, 500


def _values() -> np.ndarray:
    return np.random.default_rng(3).normal(1.0, 1.0, size=(ROWS, COLUMNS))


def _cut_after_first_block(specs: list[str], cut) -> None:
    """Read one block of the stream, call `cut()`, then read the rest."""
    with ns.open_stream(specs) as stream:
        blocks = stream.blocks(BLOCK, prefetch=False)
        next(blocks)
        cut()
        for _ in blocks:
            pass


def _truncate(path: Path, size: int):
    return lambda: os.truncate(path, size)


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_cut_mid_run_is_an_error_naming_it(tmp_path: Path, order: str) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.asarray(_values(), order=order))
    with pytest.raises(ns.DataError, match="x.npy"):
        _cut_after_first_block([str(path)], _truncate(path, path.stat().st_size // 2))


def test_npy_rewritten_in_place_mid_run_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, _values())

    def rewrite() -> None:
        with open(path, "r+b") as f:  # same size, other contents
            f.seek(-8, os.SEEK_END)
            f.write(b"\0" * 8)

    with pytest.raises(ns.DataError, match="changed while it was read"):
        _cut_after_first_block([str(path)], rewrite)


@pytest.mark.parametrize("chunks", [None, (100, COLUMNS)])
def test_h5_cut_mid_run_is_an_error_not_zeros(tmp_path: Path, chunks) -> None:
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=_values(), chunks=chunks)
    with pytest.raises(ns.DataError, match="x.h5"):
        _cut_after_first_block([f"{path}:x"], _truncate(path, path.stat().st_size // 2))


def test_shard_replaced_by_another_shape_mid_run_is_an_error(tmp_path: Path) -> None:
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    for path in (first, second):
        with h5py.File(path, "w") as f:
            f["x"] = _values()

    def replace() -> None:
        with h5py.File(tmp_path / "new.h5", "w") as f:
            f["x"] = np.ones((ROWS // 2, COLUMNS))
        os.replace(tmp_path / "new.h5", second)

    with pytest.raises(ns.DataError, match="b.h5"):
        _cut_after_first_block([f"{first}:x", f"{second}:x"], replace)


FORTRAN_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import normstats as ns
    path = sys.argv[1]
    np.save(path, np.asfortranarray(np.random.default_rng(0).normal(size=(200_000, 16))))
    try:
        with ns.open_stream([path]) as stream:
            blocks = stream.blocks(10_000)
            next(blocks)
            os.truncate(path, os.path.getsize(path) // 3)
            for block in blocks:
                block.sum()
    except ns.DataError as error:
        print("DataError", error)
    """
)


def test_fortran_npy_cut_mid_fit_is_an_error_not_sigbus(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", FORTRAN_CHILD, str(tmp_path / "f.npy")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.startswith("DataError") and "f.npy" in result.stdout


def test_fortran_npy_reads_the_same_numbers_as_c_order(tmp_path: Path) -> None:
    x = np.random.default_rng(4).normal(size=(1001, 3, 5)).astype(np.float32)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    with ns.open_stream([str(tmp_path / "f.npy")]) as stream:
        got = np.concatenate([block.copy() for block in stream.blocks(97)])
    np.testing.assert_array_equal(got, x)


# --- pipes and devices --------------------------------------------------------------


def _one_error(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_process_substitution_input_is_refused_in_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", _values())
    ns.write_stats(ns.BatchNormExact().update(_values()).result(), str(tmp_path / "s.npz"))
    for command in (f"'{SCRIPT}' fit-bn <(cat x.npy) -o out.npz",
                    f"'{SCRIPT}' apply <(cat s.npz) x.npy -o y.npy",
                    f"'{SCRIPT}' inspect <(cat s.npz)"):
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        _one_error(result, "pipe", "save the data to a file first")
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "y.npy").exists()


def test_fifo_input_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.npy")  # opening it would block until a writer comes: it is never opened
    result = subprocess.run([SCRIPT, "fit-bn", str(tmp_path / "fifo.npy"), "-o", str(tmp_path / "s.npz")],
                            capture_output=True, text=True, timeout=60)
    _one_error(result, "fifo.npy", "pipe")


def test_character_device_input_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([SCRIPT, "fit-bn", "/dev/zero", "-o", str(tmp_path / "s.npz")],
                            capture_output=True, text=True, timeout=60)
    _one_error(result, "/dev/zero", "device")


def test_shard_removed_before_its_turn_is_an_error_naming_it(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", _values())
    np.save(tmp_path / "b.npy", _values())
    with pytest.raises(ns.DataError, match="b.npy"):
        _cut_after_first_block([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
                               lambda: os.unlink(tmp_path / "b.npy"))
