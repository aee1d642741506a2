"""Files read in one pass where one suffices: inspect on a state dict of several layers, and an
HDF5 object by URL (whose every walk is a series of ranged requests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import normstats.export_files as export_files
from normstats.export_files import describe_export

CHANNELS = {"net.bn1": 3, "net.bn2": 5, "head.bn": 7}


def test_a_state_dict_of_several_layers_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    for prefix, c in CHANNELS.items():
        tensors[f"{prefix}.running_mean"] = np.zeros(c, np.float32)
        tensors[f"{prefix}.running_var"] = np.ones(c, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reads = []
    real = export_files.read_safetensors
    monkeypatch.setattr(export_files, "read_safetensors", lambda *a, **k: reads.append(a) or real(*a, **k))
    found = describe_export(str(tmp_path / "model.safetensors"))
    assert found["layers"] == {prefix: f"{c} channels" for prefix, c in sorted(CHANNELS.items())}
    assert len(reads) == 1


def test_an_npz_export_is_opened_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / "k.npz", mean=np.zeros(4), variance=np.ones(4), axis=np.array([-1]))
    opened = []
    real = export_files._npz_archive
    monkeypatch.setattr(export_files, "_npz_archive", lambda path: opened.append(path) or real(path))
    found = describe_export(str(tmp_path / "k.npz"))
    assert found["arrays"] == {"axis": "int64 (1,)", "mean": "float64 (4,)", "variance": "float64 (4,)"}
    assert len(opened) == 1
