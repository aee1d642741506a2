"""A closed standard output on the printing commands tests/test_hostile_faults.py leaves
out: ``normstats --help`` and ``--version`` exited 1 (click's own broken-pipe exit),
not 141 like every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = str(Path(sys.executable).with_name("normstats"))


def _into_a_closed_pipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([SCRIPT, *args], stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60, cwd=cwd)
    finally:
        os.close(writer)


@pytest.mark.parametrize("args", [["--help"], ["-V"], ["export", "--help"],
                                  ["fit-bn", "x.npy", "-o", "s.npz", "--mode", "exact"]])
def test_a_closed_stdout_ends_quietly_with_141(tmp_path: Path, args) -> None:
    values = np.random.default_rng(9).normal(size=(50, 3))
    np.save(tmp_path / "x.npy", values)
    done = _into_a_closed_pipe(args, tmp_path)
    assert (done.returncode, done.stderr) == (141, "")
    if "fit-bn" in args:  # the summary line is lost, not the output, placed before it
        with np.load(tmp_path / "s.npz") as stats:
            assert np.allclose(stats["mean"], values.mean(axis=0))
