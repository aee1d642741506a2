"""Two readers side by side (normstats.readers.parallel): the same statistics as one
reader (ema: the same batches, to the bit; exact: to rounding), against the plain-NumPy
references too, over shards, dtypes and odd block / batch alignments; a file cut under
the run is one clean error naming it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import pytest

import normstats as ns
from normstats import pipeline
from normstats.readers import parallel
from tests.reference import make_data, ref_bn_ema, ref_bn_exact


@pytest.fixture
def spy(monkeypatch):
    """Counts the blocks the two readers hand over (so a test knows the path ran)."""
    seen = {"blocks": 0}
    ordered = parallel.ordered_map

    def counted(*args, **kwargs):
        for item in ordered(*args, **kwargs):
            seen["blocks"] += 1
            yield item

    monkeypatch.setattr(pipeline, "ordered_map", counted)
    return seen


def _fit(specs, mode, *, two: bool, block_rows=None, monkeypatch=None, **options):
    if not two:
        monkeypatch.setattr(pipeline, "parallel_stream", lambda stream: False)
    try:
        with ns.open_stream(specs) as stream:
            return ns.run_fit(ns.batchnorm_state(mode, **options), stream, block_rows=block_rows)
    finally:
        if not two:
            monkeypatch.undo()


def _shards(tmp_path: Path, x: np.ndarray, cuts: list[int], kinds: list[str]) -> list[str]:
    specs = []
    for i, (lo, hi, kind) in enumerate(zip([0] + cuts, cuts + [len(x)], kinds)):
        part = x[lo:hi]
        if kind == "h5":
            with h5py.File(tmp_path / f"s{i}.h5", "w") as f:
                f.create_dataset("x", data=part)
            specs.append(f"{tmp_path / f's{i}.h5'}:x")
        else:
            np.save(tmp_path / f"s{i}.npy", np.asfortranarray(part) if kind == "F" else part)
            specs.append(str(tmp_path / f"s{i}.npy"))
    return specs


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int16", "uint8", "int64"])
def test_exact_two_readers_equal_one_and_the_reference(tmp_path, monkeypatch, spy, dtype):
    x = make_data((3001, 3, 4), dtype, seed=1)
    specs = _shards(tmp_path, x, [1000, 1777], ["npy", "npy", "npy"])
    two = _fit(specs, "exact", two=True, block_rows=211)
    assert spy["blocks"] > 5
    one = _fit(specs, "exact", two=False, block_rows=211, monkeypatch=monkeypatch)
    mean, var, inv_std = ref_bn_exact(x)
    for name in ("mean", "var", "inv_std"):
        np.testing.assert_allclose(two.arrays[name], one.arrays[name], rtol=1e-13, atol=0)
    np.testing.assert_allclose(two.arrays["mean"], mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(two.arrays["var"], var, rtol=1e-12)
    np.testing.assert_array_equal(two.arrays["count"], one.arrays["count"])
    for name in ("rows_seen", "batches_seen"):
        assert two.meta[name] == one.meta[name]


@pytest.mark.parametrize("batch_size, block_rows", [(1, 37), (7, 30), (64, 64), (50, 333), (5000, 300)])
def test_ema_two_readers_fold_the_same_batches_to_the_bit(tmp_path, monkeypatch, spy, batch_size, block_rows):
    """The block is rounded to whole batches (batch not dividing it, batch larger than a
    block: then one reader, the batch accumulated across blocks); shards cut batches."""
    x = make_data((4003, 6), "float32", seed=2)
    specs = _shards(tmp_path, x, [999, 2500], ["npy", "npy", "npy"])
    options = dict(batch_size=batch_size, alpha=0.05)
    two = _fit(specs, "ema", two=True, block_rows=block_rows, **options)
    assert (spy["blocks"] > 0) == (batch_size <= block_rows)
    one = _fit(specs, "ema", two=False, block_rows=block_rows, monkeypatch=monkeypatch, **options)
    np.testing.assert_array_equal(two.arrays["mean"], one.arrays["mean"])
    np.testing.assert_array_equal(two.arrays["inv_std"], one.arrays["inv_std"])
    mean, inv_std, batches, skipped = ref_bn_ema(x, batch_size, alpha=0.05)
    np.testing.assert_allclose(two.arrays["mean"], mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two.arrays["inv_std"], inv_std, rtol=1e-10)
    assert (two.meta["batches_seen"], two.meta["batches_skipped"]) == (batches, skipped)


def test_mixed_shards_fortran_and_hdf5_read_one_at_a_time_give_the_same(tmp_path, monkeypatch, spy):
    x = make_data((2500, 5), "float64", seed=3)
    specs = _shards(tmp_path, x, [800, 1500], ["F", "h5", "npy"])
    two = _fit(specs, "exact", two=True, block_rows=123, ddof=0)
    assert spy["blocks"] > 5
    mean, var, _ = ref_bn_exact(x, ddof=0)
    np.testing.assert_allclose(two.arrays["mean"], mean, rtol=1e-13)
    np.testing.assert_allclose(two.arrays["var"], var, rtol=1e-12)
    ema_two = _fit(specs, "ema", two=True, block_rows=120, batch_size=40)
    ema_one = _fit(specs, "ema", two=False, block_rows=120, batch_size=40, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(ema_two.arrays["mean"], ema_one.arrays["mean"])


def test_omit_policy_and_a_nan_naming_its_row(tmp_path, spy):
    x = make_data((2000, 4), "float64", seed=4)
    x[[5, 900, 1500], [0, 2, 3]] = np.nan
    path = str(tmp_path / "x.npy")
    np.save(path, x)
    got = _fit([path], "exact", two=True, block_rows=100, nan_policy="omit")
    np.testing.assert_allclose(got.arrays["mean"], np.nanmean(x, axis=0), rtol=1e-13)
    np.testing.assert_allclose(got.arrays["var"], np.nanvar(x, axis=0, ddof=1), rtol=1e-12)
    x[5, 0] = 1.0
    np.save(path, x)
    for mode in ("exact", "ema"):  # the first NaN in stream order, whichever thread met it first
        with pytest.raises(ns.NonFiniteError, match=r"x\.npy.*row 900"):
            _fit([path], mode, two=True, block_rows=100, batch_size=50)


@pytest.mark.parametrize("kind", ["npy", "h5"])
def test_file_cut_mid_run_is_one_error_naming_it(tmp_path, kind):
    x = make_data((40_000, 8), "float64", seed=5)
    path = tmp_path / f"x.{kind}"
    if kind == "npy":
        np.save(path, x)
        spec = str(path)
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x)
        spec = f"{path}:x"
    calls = []

    def cut(rows):
        if not calls:
            os.truncate(path, path.stat().st_size // 3)
        calls.append(rows)

    for mode in ("exact", "ema"):
        with ns.open_stream([spec]) as stream, pytest.raises(ns.DataError, match=f"x.{kind}"):
            ns.run_fit(ns.batchnorm_state(mode, batch_size=10), stream, block_rows=500, progress=cut)
        calls.clear()
        if kind == "npy":
            np.save(path, x)
        else:
            with h5py.File(path, "w") as f:
                f.create_dataset("x", data=x)


def test_checkpoints_and_progress_see_every_block_in_order(tmp_path):
    x = make_data((1000, 3), "float32", seed=6)
    path = str(tmp_path / "x.npy")
    np.save(path, x)
    done, rows = [], []
    with ns.open_stream([path]) as stream:
        ns.run_fit(ns.batchnorm_state("exact"), stream, block_rows=64, progress=rows.append,
                   checkpoint=lambda state, row: done.append((row, state.rows_seen)))
    assert sum(rows) == 1000 and [r for r, _ in done] == [s for _, s in done]
    assert [r for r, _ in done] == sorted(r for r, _ in done) and done[-1][0] == 1000


def test_ordered_map_leaving_early_stops_the_threads(tmp_path):
    x = np.arange(5000 * 2, dtype=np.float64).reshape(5000, 2)
    path = str(tmp_path / "x.npy")
    np.save(path, x)
    with ns.open_stream([path]) as stream:
        seen = []
        for rows, first in parallel.ordered_map(stream, 100, 250, lambda block, row, scratch: (row, block[0, 0])):
            seen.append(first)
            if len(seen) == 3:
                break
    assert seen == [(250, 500.0), (350, 700.0), (450, 900.0)]
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("normstats-reader-")]


# --- HDF5 read around h5py: pread of contiguous data, chunks decoded in threads -----------


@pytest.mark.parametrize("dtype", ["float32", "int16", "float16"])
def test_contiguous_hdf5_read_by_pread_equals_h5py(tmp_path, dtype):
    from normstats.readers.h5_contiguous import ContiguousReader

    x = make_data((501, 4, 3), dtype, seed=14)
    spec = _shards(tmp_path, x, [], ["h5"])[0]
    with ns.open_stream([spec]) as stream:
        reader = ContiguousReader.of(stream.sources[0], stream.dtype)
        for start, rows in [(0, 501), (7, 100), (500, 1)]:
            out = np.zeros((rows, 4, 3), dtype)
            reader.read_into(start, out)
            np.testing.assert_array_equal(out, x[start:start + rows])
        reader.close()
        assert ContiguousReader.of(stream.sources[0], np.dtype(np.float64) if dtype != "float64" else None) is None


def _gzip(tmp_path: Path, x: np.ndarray, *, shuffle: bool, chunk_rows: int = 97, name: str = "g.h5",
          compression: Optional[str] = "gzip") -> str:
    with h5py.File(tmp_path / name, "w") as f:
        f.create_dataset("x", data=x, chunks=(chunk_rows,) + x.shape[1:], compression=compression,
                         compression_opts=1 if compression else None, shuffle=shuffle)
    return f"{tmp_path / name}:x"


@pytest.mark.parametrize("compression, shuffle", [(None, False), ("gzip", False), ("gzip", True)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int16", "uint8", "int64", "uint32"])
def test_chunks_read_raw_and_decoded_in_threads_equal_h5py(tmp_path, dtype, compression, shuffle):
    from normstats.readers.h5_chunks import ChunkReader

    x = make_data((1003, 3, 5), dtype, seed=7)
    spec = _gzip(tmp_path, x, shuffle=shuffle, compression=compression)
    with ns.open_stream([spec]) as stream:
        reader = ChunkReader.of(stream.sources[0], stream.dtype)
        assert reader is not None
        for start, rows in [(0, 1003), (5, 300), (96, 2), (97, 97), (950, 53), (1002, 1)]:
            out = np.full((rows, 3, 5), 7, dtype)
            reader.read_into(start, out)
            np.testing.assert_array_equal(out, x[start:start + rows])
        reader.close()


def test_gzip_chunk_stored_with_a_filter_skipped_reads_through_h5py(tmp_path):
    """A chunk whose filter mask says deflate was skipped (stored raw) is decoded by h5py."""
    from normstats.readers.h5_chunks import ChunkReader

    x = make_data((600, 64), "uint8", seed=8)
    spec = _gzip(tmp_path, x, shuffle=False, chunk_rows=100)
    with h5py.File(tmp_path / "g.h5", "r+") as f:
        f["x"].id.write_direct_chunk((200, 0), x[200:300].tobytes(), filter_mask=1)
    with ns.open_stream([spec]) as stream:
        reader = ChunkReader.of(stream.sources[0], stream.dtype)
        out = np.empty_like(x)
        reader.read_into(0, out)
        reader.close()
    np.testing.assert_array_equal(out, x)


def test_other_filters_and_layouts_keep_h5py_read(tmp_path):
    from normstats.readers.h5_chunks import ChunkReader

    x = make_data((300, 4, 6), "float32", seed=9)
    layouts = {"lzf": dict(chunks=(50, 4, 6), compression="lzf"),
               "split rows": dict(chunks=(50, 2, 6), compression="gzip"),
               "fletcher": dict(chunks=(50, 4, 6), compression="gzip", fletcher32=True),
               "chunks across rows": dict(chunks=(50, 4, 3))}
    for name, options in layouts.items():
        with h5py.File(tmp_path / "o.h5", "w") as f:
            f.create_dataset("x", data=x, **options)
        with ns.open_stream([f"{tmp_path / 'o.h5'}:x"]) as stream:
            assert ChunkReader.of(stream.sources[0], stream.dtype) is None, name
            got = _fit([f"{tmp_path / 'o.h5'}:x"], "exact", two=True, block_rows=64)
        np.testing.assert_allclose(got.arrays["mean"], x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_fit_on_gzip_with_two_readers_equals_one(tmp_path, monkeypatch, spy, mode):
    x = make_data((5000, 16), "float32", seed=10)
    specs = [_gzip(tmp_path, x[:2100], shuffle=True, name="a.h5"), _gzip(tmp_path, x[2100:], shuffle=True, name="b.h5")]
    two = _fit(specs, mode, two=True, block_rows=300, batch_size=100)
    assert spy["blocks"] > 5
    one = _fit(specs, mode, two=False, block_rows=300, batch_size=100, monkeypatch=monkeypatch)
    for name in two.arrays:
        np.testing.assert_allclose(two.arrays[name], one.arrays[name], rtol=1e-13 if mode == "exact" else 0)


def test_gzip_file_cut_mid_run_is_one_error_naming_it(tmp_path):
    x = make_data((30_000, 8), "float64", seed=11)
    spec = _gzip(tmp_path, x, shuffle=True, chunk_rows=200)
    path = tmp_path / "g.h5"

    def cut(rows):
        if path.stat().st_size > 4096:
            os.truncate(path, path.stat().st_size // 3)

    with ns.open_stream([spec]) as stream, pytest.raises(ns.DataError, match="g.h5"):
        ns.run_fit(ns.batchnorm_state("exact"), stream, block_rows=500, progress=cut)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="page faults are read from /proc")
def test_inflated_chunks_reuse_heap_memory_from_the_first_fit(tmp_path):
    """Each inflated chunk is a new buffer; above glibc's initial mmap threshold each would
    be a fresh mapping faulting in every page (0.6 s of CPU per GB). The first fit of a
    process must reuse memory: far fewer minor faults than pages inflated."""
    import subprocess
    import sys

    x = np.random.default_rng(3).normal(size=(32 * 1024, 256)).astype(np.float32)  # 32 MB, chunks of 1 MB
    spec = _gzip(tmp_path, x, shuffle=True, chunk_rows=1024)
    child = (
        "import sys, numpy as np, normstats as ns\n"
        "from normstats import kernels\n"
        "kernels.warm_up()\n"
        "def faults(): return int(open('/proc/self/stat').read().rpartition(')')[2].split()[7])\n"
        "with ns.open_stream([sys.argv[1]]) as stream:\n"
        "    before = faults()\n"
        "    ns.run_fit(ns.batchnorm_state('ema', batch_size=256), stream)\n"
        "    print(faults() - before)\n"
    )
    # (glibc's MALLOC_* variables fix its thresholds: dask.distributed, imported by other tests,
    # sets MALLOC_TRIM_THRESHOLD_ for its workers, and it leaks into this process's children)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", child, spec], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    pages = x.nbytes // 4096
    assert int(done.stdout.split()[-1]) < pages  # (about 2 per page before; now about half, the buffers)
