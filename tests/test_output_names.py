"""Output specs: `file.h5:NAME` (NAME may be a path in the file), and names where none fits."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from normstats.writers.base import split_output


@pytest.mark.parametrize("spec, parts", [
    ("o.h5", ("o.h5", None)),
    ("o.h5:x", ("o.h5", "x")),
    ("o.h5:a/b", ("o.h5", "a/b")),
    ("o.h5:/a/b", ("o.h5", "a/b")),
    ("dir.h5/o.hdf5:g/x", ("dir.h5/o.hdf5", "g/x")),
    ("o.npy:foo", ("o.npy", "foo")),
    ("o.npy", ("o.npy", None)),
    ("weird:name.npz", ("weird:name.npz", None)),
])
def test_split_output(spec: str, parts: tuple) -> None:
    assert split_output(spec) == parts


@pytest.fixture
def fitted(run, tmp_path):
    np.save(tmp_path / "x.npy", np.arange(40, dtype=np.float32).reshape(10, 4))
    assert run("fit-bn", "x.npy", "-o", "s.npz", "--mode", "exact").exit_code == 0
    return tmp_path


@pytest.mark.parametrize("spec", ["o.h5:a/b", "o.h5:/a/b"])
def test_apply_writes_a_dataset_inside_a_group(run, fitted, spec: str) -> None:
    result = run("apply", "s.npz", "x.npy", "-o", spec)
    assert result.exit_code == 0, result.stderr
    with h5py.File(fitted / "o.h5") as f:
        assert f["a/b"].shape == (10, 4)


@pytest.mark.parametrize("command", [["apply", "s.npz", "x.npy"], ["fit-bn", "x.npy"]])
def test_a_name_the_format_cannot_hold_is_refused(run, fitted, command: list) -> None:
    spec = "o.npy:foo" if command[0] == "apply" else "t.npz:foo"
    result = run(*command, "-o", spec)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: output ") and "write " in result.stderr
    assert not (fitted / "o.npy").exists() and not (fitted / "t.npz").exists()
