"""fit-centers --init FILE:NAME: initial centers from one array of an HDF5, .npz or safetensors file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file

import normstats as ns


def _write(path, kind: str, centers: np.ndarray) -> str:
    if kind == "h5":
        with h5py.File(path / "ci.h5", "w") as f:
            f["group/c"] = centers
        return "ci.h5:group/c"
    if kind == "npz":
        np.savez(path / "ci.npz", c=centers, other=np.ones(3))
        return "ci.npz:c"
    save_file({"c": centers, "other": np.ones(3)}, str(path / "ci.safetensors"))
    return "ci.safetensors:c"


@pytest.mark.parametrize("kind", ["h5", "npz", "safetensors"])
def test_initial_centers_from_a_named_array(run, tmp_path, kind: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = np.arange(50) % 3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    start = rng.normal(size=(3, 4))
    spec = _write(tmp_path, kind, start)
    result = run("fit-centers", "x.npy", "--labels", "y.npy", "--num-classes", "3", "--init", spec,
                 "--batch-size", "50", "--alpha", "0.5", "-o", "c.npz")
    assert result.exit_code == 0, result.stderr
    expected = 0.5 * start + 0.5 * np.stack([x[y == k].mean(0) for k in range(3)])
    np.testing.assert_allclose(ns.read_stats(str(tmp_path / "c.npz")).arrays["centers"], expected, rtol=1e-6)


def test_a_missing_name_says_which_there_are(run, tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    np.savez(tmp_path / "ci.npz", c=np.zeros((1, 2)))
    result = run("fit-centers", "x.npy", "--labels", "y.npy", "--num-classes", "1", "--init", "ci.npz:nope",
                 "-o", "c.npz")
    assert result.exit_code == 2
    assert "no array 'nope'" in result.stderr and "it has: c" in result.stderr
