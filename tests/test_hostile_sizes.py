"""Tiny files that declare huge sizes: every claim is checked against the file
and the memory before anything is allocated, with shapes multiplied out in
Python integers (no wrapping)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns

SCRIPT = str(Path(sys.executable).with_name("normstats"))
# Runs a command and prints its peak RSS in kB: a fresh parent, so only that child counts.
PEAK_RSS = ("import resource, subprocess, sys;"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); sys.stderr.write(r.stderr);"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _script(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _one_error(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode in (1, 2), (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _npy_with_header(path: Path, shape: tuple, payload: bytes = b"\0" * 64, fortran: bool = False) -> Path:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": fortran, "shape": shape})
        f.write(payload)
    return path


def test_npy_shape_whose_int64_product_wraps_to_zero_is_truncated(tmp_path: Path) -> None:
    path = _npy_with_header(tmp_path / "wrap.npy", (1, 2**32, 2**32))
    assert path.stat().st_size < 256
    _one_error(_script("fit-bn", path, "-o", tmp_path / "s.npz"), "wrap.npy", "truncated")
    assert not (tmp_path / "s.npz").exists()


def test_npy_of_endless_empty_rows_is_one_error_not_a_loop(tmp_path: Path) -> None:
    path = _npy_with_header(tmp_path / "endless.npy", (2**63 - 1, 0), payload=b"")
    _one_error(_script("fit-bn", path, "-o", tmp_path / "s.npz", timeout=30), "endless.npy", "no elements")


@pytest.mark.parametrize("shape", [(5, 0), (5, 3, 0)])
def test_features_with_rows_of_zero_elements_are_one_clear_error(run, tmp_path: Path, shape) -> None:
    np.save(tmp_path / "empty.npy", np.zeros(shape, np.float32))
    for args in (["fit-bn", tmp_path / "empty.npy", "-o", tmp_path / "s.npz"],
                 ["fit-bn", tmp_path / "empty.npy", "-o", tmp_path / "s.npz", "--mode", "exact"]):
        result = run(*args)
        assert result.exit_code == 1 and "no elements" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_npy_shorter_than_its_header_says_is_refused_at_open(tmp_path: Path) -> None:
    path = _npy_with_header(tmp_path / "short.npy", (1000, 4))
    with pytest.raises(ns.DataError, match="truncated"):
        ns.open_source(str(path))


# --- npz members ---------------------------------------------------------------------


def _member(shape: tuple, payload: bytes, descr: str = "<f8") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue() + payload


def _stats_npz(path: Path, **members: bytes) -> Path:
    meta = {"kind": "batchnorm", "mode": "ema", "axes": [0], "row_shape": [2], "input_dtype": "float32",
            "rows_seen": 4, "batches_seen": 1, "eps": 1e-5, "ddof": 1}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.array(json.dumps(meta)))
        archive.writestr("meta.npy", buffer.getvalue())
        archive.writestr("inv_std.npy", _member((2,), np.ones(2).tobytes()))
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return path


def test_npz_member_declaring_a_trillion_elements_is_refused_by_key(run, tmp_path: Path) -> None:
    path = _stats_npz(tmp_path / "huge.npz", mean=_member((10**12,), b"\0" * 2000))
    assert path.stat().st_size < 4000
    with pytest.raises(ns.StatsFileError, match="key 'mean'"):
        ns.read_stats(str(path))
    result = run("inspect", path)
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "'mean'" in result.stderr


def test_npz_zip_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    _stats_npz(path)
    declared = 200 << 20
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("mean.npy", "w", force_zip64=True) as member:
            member.write(_member((declared // 8,), b""))
            zeros = bytes(1 << 20)
            for _ in range(declared >> 20):
                member.write(zeros)
    assert path.stat().st_size < declared // 100
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, SCRIPT, "inspect", str(path)],
                            capture_output=True, text=True, timeout=120)
    code, peak_kb = map(int, result.stdout.split())
    assert code == 1 and "decompression bomb" in result.stderr and "'mean'" in result.stderr
    assert peak_kb < 150_000, f"inspect peaked at {peak_kb} kB"


def test_npz_member_whose_stream_inflates_beyond_its_header_reads_only_the_header_size(tmp_path: Path) -> None:
    """The `.npy` header says 2 values; the member holds many more: only 2 are read."""
    path = _stats_npz(tmp_path / "long.npz", mean=_member((2,), np.zeros(2).tobytes() + bytes(1 << 20)))
    assert ns.read_stats(str(path)).arrays["mean"].shape == (2,)


def test_gamma_npz_member_beyond_memory_is_refused(run, tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "g.npz", "w") as archive:
        archive.writestr("gamma.npy", _member((2**40, 2**20), b"\0" * 100))
    np.save(tmp_path / "x.npy", np.ones((4, 2)))
    ns.write_stats(ns.BatchNormExact().update(np.random.default_rng(0).normal(size=(8, 2))).result(),
                   str(tmp_path / "s.npz"))
    result = run("apply", tmp_path / "s.npz", tmp_path / "x.npy", "--gamma", f"{tmp_path / 'g.npz'}:gamma",
                 "-o", tmp_path / "y.npy")
    assert result.exit_code != 0 and "gamma" in result.stderr and "Traceback" not in result.output


# --- HDF5 datasets --------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [None, (1000, 1000)])
def test_h5_dataset_declaring_a_terabyte_in_a_small_file_is_refused(tmp_path: Path, chunks) -> None:
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", shape=(10**6, 10**6), dtype="f4", chunks=chunks)
    assert path.stat().st_size < 20_000
    _one_error(_script("fit-bn", f"{path}:x", "-o", tmp_path / "s.npz", "--mode", "exact", timeout=60),
               "huge.h5:x")


def test_h5_stats_array_declaring_a_trillion_elements_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stats.h5"
    ns.write_stats(ns.BatchNormExact().update(np.ones((4, 2)) * [1, 2] + np.eye(4, 2)).result(), str(path))
    with h5py.File(path, "a") as f:
        del f["mean"]
        f.create_dataset("mean", shape=(10**12,), dtype="f8", chunks=(10**6,), compression="gzip")
    with pytest.raises(ns.StatsFileError, match="'mean'"):
        ns.read_stats(str(path))


def test_h5_input_cut_short_is_refused_at_open_not_read_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.ones((20_000, 8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ns.DataError, match="cut.h5"):
        ns.open_source(f"{path}:x")


# --- safetensors ----------------------------------------------------------------------


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F64", "shape": [10**12], "data_offsets": [0, 8 * 10**12]}, ["'mean'", "data_offsets"]),
    ({"dtype": "F64", "shape": [2**32, 2**32], "data_offsets": [0, 16]}, ["'mean'", "declares"]),
    ({"dtype": "F64", "shape": "two", "data_offsets": [0, 16]}, ["'mean'", "shape"]),
])
def test_safetensors_entries_are_checked_against_the_file(tmp_path: Path, entry, words) -> None:
    path = _safetensors(tmp_path / "s.safetensors", {"mean": entry, "__metadata__": {"normstats_meta": "{}"}},
                        bytes(16))
    with pytest.raises(ns.StatsFileError) as raised:
        ns.read_stats(str(path))
    for word in words:
        assert word in str(raised.value)


def test_safetensors_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b'{"a": 1}')
    with pytest.raises(ns.StatsFileError, match="header declares"):
        ns.read_stats(str(path))


def test_h5_virtual_dataset_larger_than_its_sources_is_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f["x"] = np.ones((4, 2))
    layout = h5py.VirtualLayout(shape=(10**9, 2), dtype="f8")
    layout[:4] = h5py.VirtualSource("src.h5", "x", shape=(4, 2))
    with h5py.File(tmp_path / "vds.h5", "w") as f:
        f.create_virtual_dataset("x", layout, fillvalue=0)
    with pytest.raises(ns.DataError, match="maps 8 of its 2000000000 elements"):
        ns.open_source(f"{tmp_path / 'vds.h5'}:x")


def test_h5_stats_attribute_declaring_a_trillion_values_is_a_stats_file_error(tmp_path: Path) -> None:
    path = tmp_path / "stats.h5"
    ns.write_stats(ns.BatchNormExact().update(np.ones((4, 2)) * [1, 2] + np.eye(4, 2)).result(), str(path))
    with h5py.File(path, "a") as f:
        f.attrs["extra"] = np.zeros(1000, np.uint8)
    data = bytearray(path.read_bytes())
    dims = data.index((1000).to_bytes(8, "little"), data.index(b"extra\0"))  # the attribute's dataspace:
    for at in (dims, data.index((1000).to_bytes(8, "little"), dims + 8)):  # size and maximum size
        data[at:at + 8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ns.StatsFileError):  # HDF5 checks an attribute's data against its message
        ns.read_stats(str(path))


def test_h5_chunk_declared_beyond_memory_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones((10, 64)), maxshape=(None, 64), chunks=(2**20, 64), compression="gzip")
    monkeypatch.setattr("normstats.limits.available_memory", lambda: 256 << 20)  # a 512 MB chunk
    with pytest.raises(ns.DataError, match="one of its chunks"):
        ns.open_source(f"{path}:x")
