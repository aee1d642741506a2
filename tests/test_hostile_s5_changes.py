"""Inputs changed under a run, in the containers tests/test_hostile_changes.py leaves
out: an Arrow IPC file cut (was SIGBUS: it was memory-mapped), a Zarr chunk removed
(read as the fill value: a silent wrong number)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import normstats as ns
from tests.cli_checks import error_line

ROWS, COLUMNS, BLOCK = 4000, 8, 500


def _values() -> np.ndarray:
    return np.random.default_rng(4).normal(1.0, 1.0, size=(ROWS, COLUMNS)).astype(np.float32)


def test_an_arrow_file_cut_mid_run_is_an_error_not_sigbus(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.feather as feather

    column = pa.FixedSizeListArray.from_arrays(pa.array(_values().reshape(-1)), COLUMNS)
    feather.write_feather(pa.table({"feats": column}), str(tmp_path / "x.arrow"), chunksize=BLOCK,
                          compression="uncompressed")
    # in a child: a SIGBUS would end the test process itself
    child = textwrap.dedent(f"""
        import os, normstats as ns
        with ns.open_stream(["x.arrow:feats"]) as stream:
            blocks = stream.blocks({BLOCK}, prefetch=False)
            next(blocks)
            os.truncate("x.arrow", os.path.getsize("x.arrow") // 2)
            try:
                for _ in blocks:
                    pass
            except ns.DataError as error:
                print(error)
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "x.arrow changed while it was read" in done.stdout


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_zarr_chunk_removed_mid_run_is_an_error_not_the_fill_value(tmp_path: Path, zarr_format) -> None:
    zarr = pytest.importorskip("zarr")
    values = _values()
    store = tmp_path / "x.zarr"
    zarr.create_array(str(store), shape=values.shape, chunks=(BLOCK, COLUMNS), dtype=values.dtype,
                      zarr_format=zarr_format)[:] = values
    chunk = store / ("5.0" if zarr_format == 2 else "c/5/0")
    assert chunk.is_file()
    with ns.open_stream([str(store)]) as stream:
        blocks = stream.blocks(BLOCK, prefetch=False)
        next(blocks)
        os.remove(chunk)
        with pytest.raises(ns.DataError, match="is gone from the store, which changed while it was read"):
            for _ in blocks:
                pass


def test_a_sharded_zarr_group_member_still_reads_every_row(run, tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    values = _values()
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("sub/feats", shape=values.shape, chunks=(64, 4), shards=(512, 8), dtype=values.dtype)[:] = values
    assert run("fit-bn", "g.zarr:sub/feats", "--mode", "exact", "-o", "s.npz").exit_code == 0
    with np.load(tmp_path / "s.npz") as stats:
        assert np.allclose(stats["mean"], values.astype(np.float64).mean(axis=0))
        assert np.allclose(stats["var"], values.astype(np.float64).var(axis=0, ddof=1))


@pytest.mark.parametrize("edit, message", [
    ({"shape": [10**12, 10**6]}, "has at most 1 of its 2500000000000000 chunks written"),
    ({"chunks": [0, 4]}, "declares chunks of shape (0, 4)"),
], ids=["trillions-of-chunks", "chunk-side-zero"])
def test_a_zarr_header_declaring_a_hostile_chunk_grid_is_one_line(run, tmp_path: Path, edit, message) -> None:
    """zarr counts written chunks by walking the declared grid: 10^15 keys exhaust memory (or
    loop for hours); a chunk side of 0 divided by zero (a traceback)."""
    zarr = pytest.importorskip("zarr")
    zarr.create_array(str(tmp_path / "x.zarr"), shape=(100, 4), chunks=(100, 4), dtype="f4",
                      zarr_format=2)[:] = np.ones((100, 4), np.float32)
    header = tmp_path / "x.zarr" / ".zarray"
    header.write_text(json.dumps({**json.loads(header.read_text()), **edit}))
    result = run("fit-bn", "x.zarr", "--mode", "exact", "-o", "s.npz")
    assert result.exit_code == 1
    assert message in error_line(result)
