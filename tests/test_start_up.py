"""What a command's start imports: only what the command uses (issue 12, item 5)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
from normstats.file_signatures import is_hdf5

# Runs the console script's main() in a fresh interpreter, then reports which of the heavy
# modules it imported.
CHILD = textwrap.dedent(
    """
    import json, sys
    from normstats.cli import main
    sys.argv = ["normstats", *sys.argv[1:]]
    try:
        main()
    except SystemExit as done:
        code = done.code
    sys.stdout.flush()
    heavy = ["h5py", "tqdm", "numba"]
    sys.stderr.write(json.dumps({"code": code, "imported": [m for m in heavy if m in sys.modules]}) + "\\n")
    """
)


def _imports(tmp_path: Path, *args: object) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_inspect_of_an_npz_imports_neither_h5py_nor_tqdm_nor_numba(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(40, 3))
    ns.write_stats(ns.BatchNormExact().update(x).result(), str(tmp_path / "s.npz"))
    assert _imports(tmp_path, "inspect", "s.npz") == {"code": 0, "imported": []}


def test_a_fit_without_a_terminal_does_not_import_tqdm(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32))
    report = _imports(tmp_path, "fit-bn", "x.npy", "-o", "s.npz")
    assert report["code"] == 0 and "tqdm" not in report["imported"] and "numba" in report["imported"]


@pytest.mark.parametrize("userblock", [0, 512, 1024, 4096])
def test_hdf5_is_recognized_where_hdf5_looks(tmp_path: Path, userblock: int) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w", userblock_size=userblock) as f:
        f["x"] = np.arange(3.0)
    if userblock:
        with open(path, "r+b") as f:
            f.write(b"PK\x03\x04 not a zip" * 4)  # what a user block may hold
    assert is_hdf5(str(path)) and h5py.is_hdf5(str(path))


def test_other_files_are_not_hdf5(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(300.0))
    np.savez(tmp_path / "x.npz", a=np.arange(300.0))
    (tmp_path / "x.json").write_text('{"kind": "batchnorm"}' + " " * 2000)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"\x89HDF\r\n")  # a signature cut short
    late = bytearray(3000)
    late[700:708] = b"\x89HDF\r\n\x1a\n"  # not at a place HDF5 looks
    (tmp_path / "late").write_bytes(bytes(late))
    for name in ("x.npy", "x.npz", "x.json", "empty", "short", "late"):
        assert not is_hdf5(str(tmp_path / name)), name
        assert not h5py.is_hdf5(str(tmp_path / name)), name
    assert not is_hdf5(str(tmp_path / "missing.h5"))
