"""The compiled EMA fold gives the NumPy fold's bits; the HDF5 readers around h5py take
the storage their source read (no second open, no probe of a shard a resume skips) and
read gzip chunks by pread, refusing one that inflates past its declared size."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest

import normstats as ns
from normstats import hdf5_policy
from normstats.batchnorm import BatchNormEMA
from normstats.readers import parallel
from normstats.readers.h5_chunks import ChunkReader
from normstats.readers.h5_contiguous import ContiguousReader
from tests.reference import make_data, ref_bn_ema


def _numpy_fold(state: BatchNormEMA) -> BatchNormEMA:
    """`state` folding with the NumPy code the compiled loop replaces."""
    state._fold_compiled = lambda sums, per_stat: state._fold(*sums.moments(per_stat, state.shape))
    return state


def _same_bits(a: BatchNormEMA, b: BatchNormEMA) -> None:
    for name in ("mean", "inv_std", "count", "decay"):
        left, right = getattr(a, name), getattr(b, name)
        assert (left is None) == (right is None), name
        if left is not None:
            assert left.dtype == right.dtype and left.tobytes() == right.tobytes(), name
    assert (a.batches_seen, a.batches_skipped, a.rows_seen) == (b.batches_seen, b.batches_skipped, b.rows_seen)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int16", "uint8", "int64"])
@pytest.mark.parametrize("options", [
    dict(batch_size=7), dict(batch_size=7, ddof=0), dict(batch_size=1), dict(batch_size=1, axes=(0,)),
    dict(batch_size=13, mean=None), dict(batch_size=13, inv_std=None), dict(batch_size=2, alpha=1.0),
    dict(batch_size=101), dict(batch_size=500, axes="auto:-1"),
])
def test_compiled_fold_gives_the_numpy_folds_bits(dtype, options):
    x = make_data((101, 5, 3), dtype, seed=3)
    compiled = BatchNormEMA(alpha=options.pop("alpha", 0.1), **options)
    reference = _numpy_fold(copy.deepcopy(compiled))
    for part in (x[:40], x[40:41], x[41:]):  # several updates: the state carries over
        compiled.update(part)
        reference.update(part)
    _same_bits(compiled, reference)


def test_compiled_fold_with_omitted_values_and_empty_batches():
    x = make_data((203, 6), "float64", seed=4)
    x[np.random.default_rng(0).random(x.shape) < 0.4] = np.nan
    x[20:40] = np.nan  # whole batches with nothing to count
    for ddof in (0, 1):
        compiled = BatchNormEMA(alpha=0.2, batch_size=10, ddof=ddof, nan_policy="omit")
        reference = _numpy_fold(copy.deepcopy(compiled))
        compiled.update(x)
        reference.update(x)
        _same_bits(compiled, reference)
        assert compiled.batches_skipped >= 2


def test_compiled_fold_matches_the_plain_reference():
    x = make_data((1000, 4), "float32", seed=5)
    got = BatchNormEMA(alpha=0.05, batch_size=64).update(x).result().arrays
    mean, inv_std, batches, skipped = ref_bn_ema(x, 64, alpha=0.05)
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["inv_std"], inv_std, rtol=1e-12)


def _two_readers_and_one(tmp_path, monkeypatch, x, mode, batch_size, block_rows) -> list[dict]:
    """The arrays of a fit of `x` (saved as .npy) with two readers, then with one."""
    from normstats import pipeline

    path = str(tmp_path / "x.npy")
    np.save(path, x)
    results = []
    for two in (True, False):
        if not two:
            monkeypatch.setattr(pipeline, "parallel_stream", lambda stream: False)
        with ns.open_stream([path]) as stream:
            results.append(ns.run_fit(ns.batchnorm_state(mode, batch_size=batch_size), stream,
                                      block_rows=block_rows).arrays)
    return results


@pytest.mark.parametrize("batch_size, block_rows", [(1, 37), (64, 64), (50, 333), (256, 1000)])
def test_two_readers_and_one_give_the_same_bits_over_odd_blocks(tmp_path, monkeypatch, batch_size, block_rows):
    results = _two_readers_and_one(tmp_path, monkeypatch, make_data((4321, 6), "float32", seed=6),
                                   "ema", batch_size, block_rows)
    for name in ("mean", "inv_std"):
        assert results[0][name].tobytes() == results[1][name].tobytes(), name


@pytest.mark.parametrize("dtype", ["float32", "int16"])
@pytest.mark.parametrize("block_rows", [50, 333, 5000])
def test_exact_two_readers_take_one_readers_first_shift(tmp_path, monkeypatch, dtype, block_rows):
    # The readers start from the shift a first update takes from the first rows (no first
    # block read apart): over one block the same sums, hence the same bits, as one reader
    # (a remote and a local fit agree); over more, the same to rounding (one reader
    # re-centres its shift as it folds, the readers keep the first).
    x = (make_data((4321, 6), "float64", seed=7) * 50 + 1e4).astype(dtype)
    results = _two_readers_and_one(tmp_path, monkeypatch, x, "exact", 64, block_rows)
    for name in ("mean", "var", "inv_std"):
        if block_rows >= len(x):
            assert results[0][name].tobytes() == results[1][name].tobytes(), name
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-13, atol=0)
    np.testing.assert_allclose(results[0]["var"], x.astype(np.float64).var(axis=0, ddof=1), rtol=1e-12)


# --- the storage the source read ---------------------------------------------------------


def _h5(path, x, **options) -> str:
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, **options)
    return f"{path}:x"


def test_readers_take_the_storage_the_source_read_without_opening_the_file(tmp_path, monkeypatch):
    x = make_data((300, 4), "float32", seed=7)
    contiguous = _h5(tmp_path / "c.h5", x)
    chunked = _h5(tmp_path / "z.h5", x, chunks=(64, 4), compression="gzip", shuffle=True)
    with ns.open_stream([contiguous]) as a, ns.open_stream([chunked]) as b:
        def refuse(*args, **kwargs):
            raise AssertionError("the dataset was opened again to probe its layout")

        monkeypatch.setattr(hdf5_policy, "open_dataset", refuse)
        assert ContiguousReader.of(a.sources[0], a.dtype).offset == a.sources[0].storage.offset
        reader = ChunkReader.of(b.sources[0], b.dtype)
        assert (reader.chunk_rows, reader.shuffle, reader.deflate) == (64, True, True)
        assert ChunkReader.of(a.sources[0], a.dtype) is None and ContiguousReader.of(b.sources[0], b.dtype) is None


def test_a_resume_never_probes_the_shards_it_skips(tmp_path, monkeypatch):
    x = make_data((900, 3), "float64", seed=8)
    specs = [_h5(tmp_path / f"s{i}.h5", x[i * 300:(i + 1) * 300]) for i in range(3)]
    probed = []
    of = ContiguousReader.of.__func__

    def counted(cls, source, dtype):
        probed.append(source.name)
        return of(cls, source, dtype)

    monkeypatch.setattr(ContiguousReader, "of", classmethod(counted))
    with ns.open_stream(specs) as stream:
        rows = [rows for rows, _ in parallel.ordered_map(stream, 100, 650, lambda block, row, scratch: None)]
    assert sum(rows) == 250
    assert probed == [stream.sources[2].name]


# --- gzip chunks by pread ----------------------------------------------------------------


def test_gzip_chunk_inflating_past_its_size_is_refused_naming_the_file(tmp_path):
    import zlib

    x = make_data((400, 16), "uint8", seed=9)
    spec = _h5(tmp_path / "g.h5", x, chunks=(100, 16), compression="gzip")
    with h5py.File(tmp_path / "g.h5", "r+") as f:  # a chunk holding twice its declared bytes
        f["x"].id.write_direct_chunk((100, 0), zlib.compress(np.zeros(3200, np.uint8).tobytes()))
    with ns.open_stream([spec]) as stream:
        reader = ChunkReader.of(stream.sources[0], stream.dtype)
        with pytest.raises(ns.DataError, match=r"g\.h5.*row 100.*declared size"):
            reader.read_into(0, np.empty_like(x))
        reader.close()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "uint16", "int32", "int64"])
def test_gzip_read_by_pread_equals_h5py_over_odd_ranges(tmp_path, dtype, shuffle):
    x = make_data((777, 2, 3), dtype, seed=10)
    spec = _h5(tmp_path / "g.h5", x, chunks=(50, 2, 3), compression="gzip", shuffle=shuffle)
    with ns.open_stream([spec]) as stream:
        reader = ChunkReader.of(stream.sources[0], stream.dtype)
        with h5py.File(tmp_path / "g.h5", "r") as f:
            expected = f["x"][...]
        for start, rows in [(0, 777), (49, 2), (50, 50), (51, 726), (776, 1), (300, 251)]:
            out = np.full((rows, 2, 3), 3, dtype)
            reader.read_into(start, out)
            np.testing.assert_array_equal(out, expected[start:start + rows])
        reader.close()
