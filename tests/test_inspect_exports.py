"""inspect says what another toolkit's file (as export writes them) is and how to load it."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture
def exported(run, tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "img.npy", rng.normal(size=(40, 3, 2, 2)).astype(np.float32))
    np.save(tmp_path / "frames.npy", rng.normal(size=(40, 5)).astype(np.float32))
    assert run("fit-bn", "img.npy", "-o", "img.npz", "--mode", "exact").exit_code == 0
    assert run("fit-bn", "frames.npy", "-o", "frames.npz", "--mode", "exact").exit_code == 0
    return tmp_path


@pytest.mark.parametrize("source, target, output, kind, detail", [
    ("img.npz", "torch", "bn.safetensors", "PyTorch BatchNorm state dict", "3 channels"),
    ("img.npz", "keras", "k.npz", "Keras Normalization weights", "variance: float64 (3,)"),
    ("frames.npz", "espnet", "e.npz", "ESPnet GlobalMVN statistics", "sum_square: float64 (5,)"),
    ("frames.npz", "kaldi", "c.mat", "Kaldi CMVN statistics", "5 dims, count 40"),
])
def test_inspect_names_the_toolkit_and_how_to_load(run, exported, source, target, output, kind, detail) -> None:
    if target == "kaldi":
        pytest.importorskip("kaldiio")
    assert run("export", source, "--to", target, "-o", output).exit_code == 0
    result = run("inspect", output)
    assert result.exit_code == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    assert first == f"{output}: {kind}"
    assert detail in result.stdout and any(line.split()[0] == "load" for line in rest)
    summary = json.loads(run("inspect", output, "--json").stdout)
    assert summary["kind"] == kind and summary["load"]


def test_a_torch_export_says_it_came_from_normstats_and_how_to_import(run, exported) -> None:
    assert run("export", "img.npz", "--to", "torch", "-o", "bn.safetensors", "--prefix", "net.bn1").exit_code == 0
    out = run("inspect", "bn.safetensors").stdout
    assert "normstats export --to torch" in out and "normstats import FILE --prefix net.bn1" in out


def test_an_unknown_npz_is_still_refused(run, exported) -> None:
    np.savez(exported / "other.npz", a=np.zeros(2))
    result = run("inspect", "other.npz")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ")
