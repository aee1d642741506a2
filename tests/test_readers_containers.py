"""Arrays in other containers (Zarr v2/v3, .npz members, safetensors tensors,
Parquet / Arrow IPC columns), read block by block against plain NumPy; bad
specs and missing extras as one-line errors."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

import normstats as ns


@pytest.fixture
def x() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.normal(size=(53, 6)) * np.arange(1, 7) + np.arange(6)).astype(np.float32)


def _read(spec: str, block_rows: int = 5) -> np.ndarray:
    with ns.open_stream([spec]) as stream:
        return np.concatenate([b.copy() for b in stream.blocks(block_rows, prefetch=False)])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array_and_group_member(tmp_path: Path, x: np.ndarray, zarr_format: int) -> None:
    zarr = pytest.importorskip("zarr")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=zarr_format)
    root.create_array("feats", shape=x.shape, chunks=(8, 6), dtype=x.dtype)[:] = x
    np.testing.assert_array_equal(_read(f"{tmp_path / 's.zarr'}:feats"), x)
    np.testing.assert_array_equal(_read(str(tmp_path / "s.zarr")), x)  # a group of one array
    alone = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=x.shape, chunks=(10, 3), dtype="f8",
                            zarr_format=zarr_format)
    alone[:] = x
    np.testing.assert_array_equal(_read(str(tmp_path / "a.zarr"), block_rows=7), x.astype("f8"))


def test_zarr_missing_chunk_is_refused(tmp_path: Path, x: np.ndarray) -> None:
    zarr = pytest.importorskip("zarr")
    array = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=x.shape, chunks=(8, 6), dtype=x.dtype)
    array[:16] = x[:16]
    with pytest.raises(ns.DataError, match="chunks written"):
        ns.open_source(str(tmp_path / "a.zarr"))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members(tmp_path: Path, x: np.ndarray, compressed: bool) -> None:
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", feats=x, other=np.arange(3))
    np.testing.assert_array_equal(_read(f"{tmp_path / 'd.npz'}:feats"), x)
    fortran = np.asfortranarray(x.astype(np.float64))
    np.savez(tmp_path / "f.npz", only=fortran)
    np.testing.assert_array_equal(_read(str(tmp_path / "f.npz")), fortran)
    with pytest.raises(ns.UsageError, match="holds 2 arrays"):
        ns.open_source(str(tmp_path / "d.npz"))
    with pytest.raises(ns.UsageError, match="no array 'nope'"):
        ns.open_source(f"{tmp_path / 'd.npz'}:nope")


def test_compressed_npz_member_read_out_of_order_starts_over(tmp_path: Path, x: np.ndarray) -> None:
    np.savez_compressed(tmp_path / "d.npz", feats=x)
    source = ns.open_source(f"{tmp_path / 'd.npz'}:feats")
    out = np.empty((4, 6), np.float32)
    source.read_into(20, out)
    np.testing.assert_array_equal(out, x[20:24])
    source.read_into(3, out)
    np.testing.assert_array_equal(out, x[3:7])
    source.close()


def test_safetensors_tensor(tmp_path: Path, x: np.ndarray) -> None:
    from safetensors.numpy import save_file

    save_file({"feats": x, "bias": np.zeros(3, np.float64)}, str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(_read(f"{tmp_path / 't.safetensors'}:feats"), x)
    with pytest.raises(ns.UsageError, match="holds 2 tensors"):
        ns.open_source(str(tmp_path / "t.safetensors"))


@pytest.mark.parametrize("layout", ["fixed", "list", "scalar"])
def test_parquet_and_arrow_columns(tmp_path: Path, x: np.ndarray, layout: str) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    if layout == "fixed":
        column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 6)
        expected = x
    elif layout == "list":
        column = pa.array(list(x))
        expected = x
    else:
        column = pa.array(x[:, 2])
        expected = x[:, 2]
    table = pa.table({"id": pa.array(np.arange(len(x))), "feats": column})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=10)
    np.testing.assert_array_equal(_read(f"{tmp_path / 'd.parquet'}:feats", block_rows=7), expected)
    feather.write_feather(table, tmp_path / "d.arrow", chunksize=9)
    np.testing.assert_array_equal(_read(f"{tmp_path / 'd.arrow'}:feats", block_rows=4), expected)


def test_parquet_ragged_lists_name_the_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"f": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "r.parquet")
    with pytest.raises(ns.DataError, match="row 1 holds 1 values"):
        _read(f"{tmp_path / 'r.parquet'}:f")


def test_fit_over_a_container_equals_numpy(tmp_path: Path, x: np.ndarray, run) -> None:
    np.savez(tmp_path / "d.npz", feats=x)
    result = run("fit-bn", "d.npz:feats", "-o", "s.npz", "--mode", "exact", "--ddof", "0")
    assert result.exit_code == 0, result.stderr
    stats = ns.read_stats(tmp_path / "s.npz")
    np.testing.assert_allclose(stats.arrays["mean"], x.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.arrays["var"], x.astype(np.float64).var(0), rtol=1e-10)


@pytest.mark.parametrize("spec, message", [
    ("s3://bucket/feats.scp", "are read from local disks only"),
    ("https://example.org/x.npz:a", "are read from local disks only"),
    ("ark:-", "not from pipes or standard input"),
    ("feats.scp:NAME", "has no members to name"),
])
def test_bad_specs_are_one_line_errors(run, spec: str, message: str) -> None:
    result = run("fit-bn", spec, "-o", "s.npz")
    assert result.exit_code == 2 and message in result.stderr
    assert result.stderr.startswith("Error:") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module, spec, extra", [
    ("kaldiio", "scp:feats.scp", "kaldi"), ("zarr", "s.zarr", "zarr"), ("pyarrow", "d.parquet:f", "arrow"),
])
def test_missing_extra_is_one_line(tmp_path: Path, run, monkeypatch: pytest.MonkeyPatch,
                                   module: str, spec: str, extra: str) -> None:
    (tmp_path / "feats.scp").write_text("")
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    real = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    monkeypatch.delitem(__import__("sys").modules, module, raising=False)
    result = run("fit-bn", spec, "-o", "s.npz")
    package = {"kaldi": "kaldiio", "zarr": "zarr", "arrow": "pyarrow"}[extra]
    assert result.stderr.strip() == f"Error: reading {spec} needs {package}; pip install 'normstats[{extra}]'"
    assert result.exit_code == 2


@pytest.mark.parametrize("block_rows", [1, 3, 8, 13, 40, 100])
def test_zarr_reads_are_chunk_aligned(tmp_path: Path, x: np.ndarray, block_rows: int) -> None:
    """Every slice asked of zarr starts and ends on a chunk row (or the end): each chunk is
    decoded once in a sequential read, whatever the block."""
    zarr = pytest.importorskip("zarr")
    zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=x.shape, chunks=(8, 3), dtype=x.dtype)[:] = x
    source = ns.open_source(str(tmp_path / "a.zarr"))
    asked = []
    real = source._array

    class Recording:
        def __getitem__(self, rows):
            asked.append((rows.start, rows.stop))
            return real[rows]

    source._array = Recording()
    with ns.Stream([source]) as stream:
        data = np.concatenate([b.copy() for b in stream.blocks(block_rows, prefetch=False)])
    np.testing.assert_array_equal(data, x)
    assert all(a % 8 == 0 and (b % 8 == 0 or b == len(x)) for a, b in asked), asked
    covered = sorted(asked)
    assert sum(b - a for a, b in covered) == len(x)  # no chunk row read twice
