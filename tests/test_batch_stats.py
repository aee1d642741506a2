"""apply --batch-stats: the layer's training-mode output (each batch normalized with
its own statistics, optionally pooled), against a plain-NumPy reference batch by batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import normstats as ns
from normstats.batch_stats import BatchStatsNormalizer
from tests.batch_reference import data, ref_batch_stats_apply


def _stats(run, tmp_path: Path, *args) -> None:
    result = run("fit-bn", "x.npy", "-o", "s.npz", "-q", *args)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("shape", [(53, 4), (29, 3, 4, 2)])
@pytest.mark.parametrize("dtype,rtol", [("float32", 2e-5), ("float64", 1e-10), ("int16", 2e-5)])
def test_batch_stats_equal_the_reference(run, tmp_path: Path, shape, dtype, rtol) -> None:
    x = data(shape, dtype, seed=len(shape))
    np.save(tmp_path / "x.npy", x)
    _stats(run, tmp_path, "--eps", "0.001", "--ddof", "0")
    np.save(tmp_path / "g.npy", np.linspace(0.5, 2.0, shape[1]))
    result = run("apply", "s.npz", "x.npy", "-o", "y.npy", "--batch-stats", "--batch-size", "5",
                 "--gamma", "g.npy", "--beta", "0.25", "-q")
    assert result.exit_code == 0, result.stderr
    y = np.load(tmp_path / "y.npy")
    expected = ref_batch_stats_apply(x, 5, eps=1e-3, ddof=0, gamma=np.linspace(0.5, 2.0, shape[1]), beta=0.25)
    assert y.dtype == (np.float32 if dtype != "float64" else np.float64)
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("block_rows", [4, 8, 24, 1000])
@pytest.mark.parametrize("pool,below", [(3, None), (4, 10)])
def test_pooled_batch_stats_across_blocks(tmp_path: Path, block_rows: int, pool: int, below) -> None:
    x = data((70, 2, 3), "float64", seed=pool)
    np.save(tmp_path / "x.npy", x)
    stats = ns.BatchNormEMA(ddof=1, eps=1e-4).update(x).result()
    normalizer = BatchStatsNormalizer(stats, batch_size=4, pool_batches=pool, pool_below=below)
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        ns.apply_stats(normalizer, stream, str(tmp_path / "y.npy"), block_rows=block_rows)
    expected = ref_batch_stats_apply(x, 4, eps=1e-4, ddof=1, pool=pool, below=below)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-10, atol=1e-12)


def test_cli_pool_and_default_batch_size_from_the_stats_file(run, tmp_path: Path) -> None:
    x = data((40, 3), "float32", seed=7)
    np.save(tmp_path / "x.npy", x)
    _stats(run, tmp_path, "--batch-size", "6")
    result = run("apply", "s.npz", "x.npy", "-o", "y.npy", "--batch-stats", "--pool-batches", "2", "-q")
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref_batch_stats_apply(x, 6, pool=2), rtol=2e-5, atol=2e-5)


def test_terms_fitted_as_none_are_dropped(run, tmp_path: Path) -> None:
    x = data((30, 2, 2), "float64", seed=8)
    np.save(tmp_path / "x.npy", x)
    _stats(run, tmp_path, "--inv-std", "none")
    result = run("apply", "s.npz", "x.npy", "-o", "y.npy", "--batch-stats", "--batch-size", "4", "-q")
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref_batch_stats_apply(x, 4, use_inv_std=False),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "1"], "Error: x.npy row 0: its batch has 1 element(s) per statistic, no variance with ddof=1"),
    (["--pool-below", "3", "--batch-size", "4"], "--pool-below needs --pool-batches K"),
    (["--engine", "dask", "--batch-size", "4"], "--batch-stats runs on the local engine"),
])
def test_bad_batch_stats_are_one_line_errors(run, tmp_path: Path, args, message) -> None:
    np.save(tmp_path / "x.npy", data((20, 3), "float32"))
    _stats(run, tmp_path)
    result = run("apply", "s.npz", "x.npy", "-o", "y.npy", "--batch-stats", *args, "-q")
    assert result.exit_code != 0
    assert message in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if "Error" in line] == [result.stderr.strip().splitlines()[-1]]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "y.npy").exists()


def test_batch_options_need_batch_stats(run, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", data((20, 3), "float32"))
    _stats(run, tmp_path)
    result = run("apply", "s.npz", "x.npy", "-o", "y.npy", "--pool-batches", "2", "-q")
    assert result.exit_code != 0 and "--pool-batches needs --batch-stats" in result.stderr


def test_a_stats_file_without_a_batch_size_needs_one(run, tmp_path: Path) -> None:
    x = data((20, 3), "float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "b.npy", np.array([0, 10]))
    _stats(run, tmp_path, "--batch-boundaries", "b.npy")
    result = run("apply", "s.npz", "x.npy", "-o", "y.npy", "--batch-stats", "-q")
    assert result.exit_code != 0 and "--batch-stats needs --batch-size B (s.npz records no batch size)" in result.stderr


def test_a_batch_larger_than_the_limit_is_refused(tmp_path: Path, monkeypatch) -> None:
    import normstats.batch_stats as batch_stats

    monkeypatch.setattr(batch_stats, "MAX_BATCH_BYTES", 1000)
    stats = ns.BatchNormEMA().update(data((10, 3), "float64")).result()
    with pytest.raises(ns.UsageError, match="use a smaller --batch-size"):
        BatchStatsNormalizer(stats, batch_size=100).check((3,), np.dtype("float64"))
