"""Files read in one pass where one suffices: inspect on a state dict of several layers, and an
HDF5 object by URL (whose every walk is a series of ranged requests)."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats.export_files as export_files
from normstats.export_files import describe_export
from normstats.readers.remote_sources import RemoteH5

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
    real = export_files.open_npz
    monkeypatch.setattr(export_files, "open_npz", lambda path: opened.append(path) or real(path))
    found = describe_export(str(tmp_path / "k.npz"))
    assert found["arrays"] == {"axis": "int64 (1,)", "mean": "float64 (4,)", "variance": "float64 (4,)"}
    assert len(opened) == 1


class _LocalObject:
    """A RemoteObject stand-in serving a local file (the walks counted are h5py's, not the store's)."""

    def __init__(self, path: Path) -> None:
        self.url = self.path = str(path)

    def identity(self, url=None) -> tuple:
        return (self.url,)

    def open(self, block_size: int) -> io.BytesIO:
        return io.BytesIO(Path(self.url).read_bytes())


@pytest.mark.parametrize("name", [None, "train/x"])
def test_a_remote_hdf5_file_is_walked_at_most_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name) -> None:
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("train/x", data=x)
    walks = []
    real = h5py.Group.visititems
    monkeypatch.setattr(h5py.Group, "visititems", lambda self, fn: walks.append(1) or real(self, fn))
    source = RemoteH5(_LocalObject(tmp_path / "d.h5"), name)
    out = np.empty((8, 3), np.float32)
    source.read_into(0, out)
    source.close()
    np.testing.assert_array_equal(out, x)
    assert len(walks) == (1 if name is None else 0)  # only to find the one dataset


def test_a_missing_remote_dataset_still_names_those_there(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("a", data=np.zeros(2))
        f.create_dataset("g/b", data=np.zeros(2))
    with pytest.raises(Exception, match=r"has no dataset 'c'; it has: a, g/b"):
        RemoteH5(_LocalObject(tmp_path / "d.h5"), "c")
