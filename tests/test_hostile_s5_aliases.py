"""Outputs that would replace an input reached another way than by its name: a
file an HDF5 link or virtual dataset leads to, a file inside a Zarr store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns

from tests.cli_checks import error_line

zarr = pytest.importorskip("zarr")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parts(tmp_path: Path) -> np.ndarray:
    """part.h5 holding two datasets, linked into coll.h5:/train and one.h5:x."""
    values = np.random.default_rng(5).normal(1.0, 2.0, size=(50, 4))
    with h5py.File(tmp_path / "part.h5", "w") as f:
        f["a"], f["b"], f["all"] = values[:30], values[30:], values
        f["labels"] = np.arange(50) % 3
    with h5py.File(tmp_path / "coll.h5", "w") as f:
        f["train/a"] = h5py.ExternalLink("part.h5", "/a")
        f["train/b"] = h5py.ExternalLink("part.h5", "/b")
        f["x"] = h5py.ExternalLink("part.h5", "/all")
        f["labels"] = h5py.ExternalLink("part.h5", "/labels")
    return values


@pytest.mark.parametrize("args", [
    ["fit-bn", "coll.h5:/train", "--mode", "exact", "-o", "part.h5"],
    ["fit-bn", "coll.h5:/train", "--mode", "exact", "-o", "s.npz", "--checkpoint", "part.h5"],
    ["fit-bn", "coll.h5:x", "--mode", "exact", "-o", "part.h5"],
    ["fit-centers", "coll.h5:/train", "--labels", "coll.h5:labels", "--num-classes", "3", "-o", "c.npz",
     "--checkpoint", "part.h5"],
    ["apply", "s0.npz", "coll.h5:x", "-o", "part.h5"],
    ["assign", "c0.npz", "coll.h5:x", "-o", "part.h5"],
], ids=["fit-bn-collection", "checkpoint-collection", "fit-bn-linked-dataset", "fit-centers-checkpoint",
        "apply-linked-dataset", "assign-linked-dataset"])
def test_an_output_onto_the_file_an_hdf5_link_reads_is_refused_with_force(run, tmp_path, args):
    _parts(tmp_path)
    assert run("fit-bn", "coll.h5:x", "--mode", "exact", "-o", "s0.npz").exit_code == 0
    assert run("fit-centers", "coll.h5:x", "--labels", "coll.h5:labels", "--num-classes", "3",
               "-o", "c0.npz").exit_code == 0
    before = _digest(tmp_path / "part.h5")
    result = run(*args, "--force")
    assert result.exit_code == 2, result.output
    assert "'part.h5', which the input" in error_line(result)
    assert _digest(tmp_path / "part.h5") == before


def test_labels_reached_through_a_link_are_an_input_too(run, tmp_path):
    np.save(tmp_path / "x.npy", _parts(tmp_path))
    before = _digest(tmp_path / "part.h5")
    result = run("fit-centers", "x.npy", "--labels", "coll.h5:labels", "--num-classes", "3",
                 "-o", "part.h5", "--force")
    assert result.exit_code == 2
    assert "'part.h5', which the input coll.h5:labels reads" in error_line(result)
    assert _digest(tmp_path / "part.h5") == before


def _virtual(values: np.ndarray, path: Path, name: str) -> h5py.File:
    """`path` (open, to add to) holding `name`: a virtual dataset of part.h5's 'a'."""
    layout = h5py.VirtualLayout(shape=(30, 4), dtype=values.dtype)
    layout[:] = h5py.VirtualSource("part.h5", "a", shape=(30, 4))
    f = h5py.File(path, "w")
    f.create_virtual_dataset(name, layout)
    return f


def test_a_virtual_source_file_is_an_input(run, tmp_path):
    values = _parts(tmp_path)
    _virtual(values, tmp_path / "vds.h5", "x").close()
    before = _digest(tmp_path / "part.h5")
    result = run("fit-bn", "vds.h5:x", "--mode", "exact", "-o", "part.h5", "--force")
    assert result.exit_code == 2
    assert "'part.h5', which the input vds.h5:x reads" in error_line(result)
    assert _digest(tmp_path / "part.h5") == before
    # and away from it the virtual dataset reads the source's numbers
    assert run("fit-bn", "vds.h5:x", "--mode", "exact", "-o", "s.npz").exit_code == 0
    with np.load(tmp_path / "s.npz") as stats:
        assert np.allclose(stats["mean"], values[:30].mean(axis=0))


def test_a_virtual_source_of_a_collection_member_is_an_input(run, tmp_path):
    values = _parts(tmp_path)
    with _virtual(values, tmp_path / "vcoll.h5", "t/v") as f:
        f["t/w"] = values[30:]
    before = _digest(tmp_path / "part.h5")
    for extra in (["-o", "part.h5"], ["-o", "s.npz", "--checkpoint", "part.h5"]):
        result = run("fit-bn", "vcoll.h5:/t", "--mode", "exact", *extra, "--force")
        assert result.exit_code == 2, result.output
        assert "'part.h5', which the input vcoll.h5:/t reads" in error_line(result)
        assert _digest(tmp_path / "part.h5") == before
    assert run("fit-bn", "vcoll.h5:/t", "--mode", "exact", "-o", "s.npz").exit_code == 0
    with np.load(tmp_path / "s.npz") as stats:
        assert np.allclose(stats["mean"], values.mean(axis=0))


@pytest.mark.parametrize("command", ["fit-bn", "apply"])
def test_an_output_inside_a_zarr_store_input_is_refused(run, tmp_path, command):
    values = np.random.default_rng(6).normal(size=(40, 4)).astype(np.float32)
    zarr.create_array(str(tmp_path / "x.zarr"), shape=values.shape, chunks=(16, 4), dtype=values.dtype)[:] = values
    assert run("fit-bn", "x.zarr", "--mode", "exact", "-o", "s.npz").exit_code == 0
    meta = tmp_path / "x.zarr" / "zarr.json"
    before = _digest(meta)
    args = (["fit-bn", "x.zarr", "--mode", "exact", "-o", "x.zarr/zarr.json"] if command == "fit-bn"
            else ["apply", "s.npz", "x.zarr", "-o", "x.zarr/c/extra.npy"])
    result = run(*args, "--force")
    assert result.exit_code == 2
    assert "is inside the input 'x.zarr'" in error_line(result)
    assert _digest(meta) == before
    assert not (tmp_path / "x.zarr" / "c" / "extra.npy").exists()


def _linked_stats(tmp_path: Path) -> None:
    """st.h5 whose mean is an external link into held.h5 (in the same folder, so allowed);
    gam.h5:g a link into gval.h5."""
    values = np.random.default_rng(7).normal(size=(40, 4))
    np.save(tmp_path / "x.npy", values)
    ns.write_stats(ns.BatchNormExact().update(values).result(), str(tmp_path / "st.h5"))
    with h5py.File(tmp_path / "st.h5", "r+") as f:
        mean = f["mean"][()]
        del f["mean"]
        f["mean"] = h5py.ExternalLink("held.h5", "/mean")
    with h5py.File(tmp_path / "held.h5", "w") as f:
        f["mean"] = mean
    with h5py.File(tmp_path / "gam.h5", "w") as f:
        f["g"] = h5py.ExternalLink("gval.h5", "/g")
    with h5py.File(tmp_path / "gval.h5", "w") as f:
        f["g"] = np.full(4, 2.0)


@pytest.mark.parametrize("args, target", [
    (["apply", "st.h5", "x.npy", "-o", "held.h5"], "held.h5"),
    (["export", "st.h5", "--to", "espnet", "-o", "held.h5"], "held.h5"),
    (["fit-bn", "x.npy", "--mode", "exact", "--init", "st.h5", "-o", "held.h5"], "held.h5"),
    (["merge", "st.h5", "other.npz", "-o", "held.h5"], "held.h5"),
    (["apply", "other.npz", "x.npy", "--gamma", "gam.h5:g", "-o", "gval.h5"], "gval.h5"),
], ids=["apply-stats", "export-stats", "init", "merge", "gamma"])
def test_an_output_onto_the_file_a_stats_or_gamma_file_links_to_is_refused(run, tmp_path, args, target):
    """The stats file would be left with a dangling link (its mean gone)."""
    _linked_stats(tmp_path)
    assert run("fit-bn", "x.npy", "--mode", "exact", "-o", "other.npz").exit_code == 0
    before = _digest(tmp_path / target)
    result = run(*args, "--force")
    assert result.exit_code == 2, result.output
    assert f"'{target}', which the " in error_line(result) and "reads through an HDF5 link" in error_line(result)
    assert _digest(tmp_path / target) == before
    assert run("apply", "st.h5", "x.npy", "-o", "ok.npy").exit_code == 0  # still whole
