"""--resume over a collection whose data changed in the files its index points into (the
Kaldi archive an scp names, the file an HDF5 link leads to): the checkpoint recorded only
the scp / the linking file, so the fit went on over other numbers."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
from tests.cli_checks import error_line
from tests.test_hostile_files import _interrupted_checkpoint

kaldiio = pytest.importorskip("kaldiio")


def _utterances(shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10)
    return {f"u{i}": (rng.normal(size=(20, 4)) + shift).astype(np.float32) for i in range(6)}


def _rewrite_ark(folder: Path) -> None:
    """The same keys and sizes at the same offsets, other numbers; the scp stays as it was."""
    scp = (folder / "f.scp").read_bytes()
    kaldiio.save_ark(str(folder / "f.ark"), _utterances(5.0), scp=str(folder / "other.scp"))
    assert (folder / "other.scp").read_bytes() == scp
    os.utime(folder / "f.ark", ns=(0, 10**18))


def _relink_part(folder: Path) -> None:
    with h5py.File(folder / "part.h5", "r+") as f:
        f["u0"][...] = f["u0"][()] + 5.0
    os.utime(folder / "part.h5", ns=(0, 10**18))


@pytest.mark.parametrize("layout", ["scp", "h5-links"])
def test_resume_refuses_a_collection_whose_data_files_changed(run, tmp_path: Path, monkeypatch, layout) -> None:
    utts = _utterances()
    if layout == "scp":
        kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
        spec, change, changed = "scp:f.scp", _rewrite_ark, "f.ark"
    else:
        with h5py.File(tmp_path / "part.h5", "w") as f:
            for key, value in utts.items():
                f[key] = value
        with h5py.File(tmp_path / "c.h5", "w") as f:
            for key in utts:
                f[f"t/{key}"] = h5py.ExternalLink("part.h5", f"/{key}")
        spec, change, changed = "c.h5:/t", _relink_part, "part.h5"
    args = ["fit-bn", spec, "--mode", "exact"]
    _interrupted_checkpoint(run, monkeypatch, *args)
    # unchanged, it goes on to the numbers of one uninterrupted run
    assert run(*args, "-o", "same.npz", "--resume", "ck.npz", "--checkpoint", "ck2.npz").exit_code == 0
    stats = ns.read_stats(str(tmp_path / "same.npz"))
    assert np.allclose(stats.arrays["mean"], np.concatenate(list(utts.values())).astype(np.float64).mean(axis=0))
    change(tmp_path)
    result = run(*args, "-o", "out.npz", "--resume", "ck.npz")
    assert result.exit_code == 2, result.output
    message = error_line(result)
    assert "other files" in message and changed in message, message
    assert not (tmp_path / "out.npz").exists()
