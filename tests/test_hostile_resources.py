"""Bounded resources while reading: compressed HDF5 chunks decoded once, and
shards opened one at a time."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
from normstats import hdf5_policy

SCRIPT = str(Path(sys.executable).with_name("normstats"))


def test_chunk_cache_holds_the_chunks_a_block_spans(tmp_path: Path) -> None:
    """One 32 MB gzip chunk, read in 8 MB blocks: the cache must hold it whole (and the
    next chunk row), or HDF5 decodes it again for every block."""
    path = tmp_path / "big.h5"
    x = np.zeros((65_536, 128), np.float32)
    x[:, 0] = np.arange(len(x))
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(65_536, 128), compression="gzip", compression_opts=1)
    source = ns.open_source(f"{path}:x")
    try:
        block = np.empty((16_384, 128), np.float32)
        source.read_into(16_384, block)
        np.testing.assert_array_equal(block[:, 0], np.arange(16_384, 32_768))
        _, dataset = source._handles
        slots, nbytes, _ = dataset.id.get_access_plist().get_chunk_cache()
        assert nbytes >= 2 * x.nbytes and slots >= 100_003
    finally:
        source.close()


def test_chunk_cache_spans_every_chunk_across_a_row() -> None:
    class Fake:  # a chunked, filtered dataset: 4 chunks across each row of chunks
        shape, dtype = (10_000, 400), np.dtype("f8")

        class id:  # noqa: N801 (h5py's attribute name)
            @staticmethod
            def get_create_plist():
                class Plist:
                    get_layout = staticmethod(lambda: h5py.h5d.CHUNKED)
                    get_nfilters = staticmethod(lambda: 1)
                    get_chunk = staticmethod(lambda: (5_000, 100))
                return Plist

    slots, nbytes = hdf5_policy.chunk_cache(Fake, memory=1 << 34)
    chunk = 5_000 * 100 * 8
    assert nbytes >= 2 * 4 * chunk
    assert all(slots % d for d in range(2, 1000))  # prime, as HDF5 asks
    # bounded by the memory at hand
    assert hdf5_policy.chunk_cache(Fake, memory=1 << 30)[1] <= max(hdf5_policy.BASE_CACHE_BYTES, 1 << 28)


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_1100_shards_under_1024_descriptors(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    parts, specs = [], []
    for i in range(1100):
        part = rng.normal(i % 7, 1.0, size=(3, 2))
        parts.append(part)
        if i % 2:
            np.save(tmp_path / f"p{i}.npy", part)
            specs.append(f"p{i}.npy")
        else:
            with h5py.File(tmp_path / f"p{i}.h5", "w") as f:
                f["x"] = part
            specs.append(f"p{i}.h5")
    result = subprocess.run([SCRIPT, "fit-bn", *specs, "-o", "s.npz", "--mode", "exact", "-q"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, preexec_fn=_limit_descriptors)
    assert result.returncode == 0, result.stderr[-2000:]
    everything = np.concatenate(parts)
    stats = np.load(tmp_path / "s.npz")
    np.testing.assert_allclose(stats["mean"], everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["var"], everything.var(0, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("batch, block", [(700, 256), (4096, 256), (5000, 256), (2, 1), (700, 97)])
def test_ema_centers_accumulate_a_batch_larger_than_a_block(tmp_path: Path, batch: int, block: int) -> None:
    """Batches larger than the read block: each batch spans blocks (and blocks end
    mid-batch), the result equals the batch-by-batch rule."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(9000, 6)) + 1e6).astype(np.float64)
    y = rng.integers(0, 5, size=9000)
    y[:batch][y[:batch] == 4] = 3  # class 4 first appears in a later batch (init 'first')
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    alpha = 0.3
    centers = np.full((5, 6), np.nan)
    for start in range(0, 9000, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        for k in np.unique(yb):
            mean = xb[yb == k].mean(0)
            centers[k] = mean if np.isnan(centers[k]).any() else alpha * mean + (1 - alpha) * centers[k]
    state = ns.CentersEMA(5, alpha=alpha, init="first", batch_size=batch)
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream, ns.open_stream([str(tmp_path / "y.npy")]) as labels:
        stats = ns.run_fit(state, stream, side={"labels": labels}, block_rows=block)
    np.testing.assert_allclose(stats.arrays["centers"], centers, rtol=1e-13)
    assert stats.meta["batches_seen"] == -(-9000 // batch)
    np.testing.assert_array_equal(stats.arrays["counts"], np.bincount(y, minlength=5))
