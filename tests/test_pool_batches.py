"""fit-bn --pool-batches K [--pool-below L]: the batch statistics pooled over the last K
batches, weighted by element count, against a plain-NumPy reference of the layer's
intended rule, batch by batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import normstats as ns
import normstats.stream as read_blocks
from normstats.files import identities
from normstats.pooling import BatchPool
from normstats.resume import Checkpointer
from tests.batch_reference import close, data, fixed_batches, ref_pooled_ema


SHAPES = [(103, 4), (61, 3, 2, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "int16"])
@pytest.mark.parametrize("pool,below", [(1, None), (2, None), (4, None), (3, 7), (5, 10_000)])
def test_pooled_ema_equals_the_layers_rule(shape, dtype, pool, below) -> None:
    x = data(shape, dtype, seed=pool)
    batch = 4 if len(shape) == 2 else 2  # rank 2: 4 elements per statistic; rank 4: 20
    below = None if below is None else (below if len(shape) == 4 else below // 3)
    state = ns.BatchNormEMA(alpha=0.3, batch_size=batch, pool_batches=pool, pool_below=below)
    stats = state.update(x).result()
    mean, inv_std = ref_pooled_ema(fixed_batches(x, batch), alpha=0.3, pool=pool, below=below)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["pool_batches"] == pool and stats.meta["pool_below"] == below


def test_pool_below_switches_per_statistic_by_element_count() -> None:
    # A batch of 3 rows has 3 elements per statistic: pooled below 4, its own at or above 3.
    x = data((30, 2), "float64", seed=3)
    pooled = ns.BatchNormEMA(alpha=0.5, batch_size=3, pool_batches=3, pool_below=4).update(x).result()
    own = ns.BatchNormEMA(alpha=0.5, batch_size=3, pool_batches=3, pool_below=3).update(x).result()
    plain = ns.BatchNormEMA(alpha=0.5, batch_size=3).update(x).result()
    always = ns.BatchNormEMA(alpha=0.5, batch_size=3, pool_batches=3).update(x).result()
    close(own.arrays["inv_std"], plain.arrays["inv_std"])
    close(pooled.arrays["inv_std"], always.arrays["inv_std"])
    assert not np.allclose(pooled.arrays["inv_std"], plain.arrays["inv_std"])


def test_pool_is_exact_for_large_offsets() -> None:
    # The parallel-variance formula in float64 keeps the digits a naive sum of squares loses.
    x = (1e8 + data((40, 3), "float64", seed=9))
    stats = ns.BatchNormEMA(alpha=0.2, batch_size=4, pool_batches=3).update(x).result()
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 4), alpha=0.2, pool=3)
    np.testing.assert_allclose(stats.arrays["inv_std"], inv_std, rtol=1e-7)
    np.testing.assert_allclose(stats.arrays["mean"], mean, rtol=1e-15)


def test_batch_pool_against_the_union_of_elements() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(2, int(n))) for n in (1, 3, 5, 2, 7, 4)]
    pool = BatchPool(3, None, (2,))
    for i, b in enumerate(batches):
        n, mean, m2 = pool.take(np.full((1, 2), b.shape[1], float), b.mean(1)[None], b.var(1)[None] * b.shape[1])
        union = np.concatenate(batches[max(0, i - 2):i + 1], axis=1)
        close(n[0], union.shape[1])
        close(mean[0], union.mean(1))
        close(m2[0], union.var(1) * union.shape[1])
    assert pool.n.shape == (2, 2)


@pytest.mark.parametrize("block_rows", [3, 5, 16, 40])
def test_pools_cross_read_blocks(tmp_path: Path, monkeypatch, block_rows: int) -> None:
    x = data((150, 4), "float32", seed=4)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", block_rows * 4 * 4)  # blocks smaller and larger than a batch
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        stats = ns.run_fit(ns.BatchNormEMA(alpha=0.25, batch_size=8, pool_batches=3), stream)
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 8), alpha=0.25, pool=3)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)


def test_pool_with_the_open_batch_of_update_more_and_close() -> None:
    x = data((77, 3, 2, 2), "float64", seed=5)
    whole = ns.BatchNormEMA(alpha=0.1, batch_size=10, pool_batches=4).update(x).result()
    pieces = ns.BatchNormEMA(alpha=0.1, batch_size=10, pool_batches=4)
    for a, b in [(0, 3), (3, 4), (4, 25), (25, 40), (40, 77)]:
        pieces.update(x[a:b], more=True)
    stats = pieces.close().result()
    for key in ("mean", "inv_std"):
        close(stats.arrays[key], whole.arrays[key])
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 10), alpha=0.1, pool=4)
    close(stats.arrays["inv_std"], inv_std)


@pytest.mark.parametrize("fmt", ["npz", "h5", "safetensors", "json"])
def test_a_continued_fit_keeps_the_buffer(tmp_path: Path, fmt: str) -> None:
    x = data((90, 5), "float32", seed=6)
    options = dict(alpha=0.2, batch_size=6, pool_batches=4, pool_below=20)
    first = ns.BatchNormEMA(**options).update(x[:42]).result()
    assert first.arrays["pool_count"].shape == (3, 5)
    ns.write_stats(first, str(tmp_path / f"c.{fmt}"))
    state = ns.batchnorm_state("ema", init=ns.read_stats(str(tmp_path / f"c.{fmt}")))
    assert state.pool_batches == 4 and state.pool_below == 20
    stats = state.update(x[42:]).result()
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 6), alpha=0.2, pool=4, below=20)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)


def test_resume_from_a_checkpoint_keeps_the_buffer(run, tmp_path: Path) -> None:
    x = data((120, 3), "float32", seed=7)
    np.save(tmp_path / "x.npy", x)
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        state = ns.BatchNormEMA(alpha=0.1, batch_size=5, pool_batches=3)
        state.update(x[:55])  # eleven whole batches: where a checkpoint is taken
        save = Checkpointer(str(tmp_path / "ck.npz"), 0.0, sources=stream.names, rows_total=stream.rows,
                            inputs=identities({"features": stream}))
        save._last = -1e9
        save(state, 55)
    result = run("fit-bn", "x.npy", "-o", "s.npz", "--resume", "ck.npz", "-q")
    assert result.exit_code == 0, result.stderr
    stats = ns.read_stats(str(tmp_path / "s.npz"))
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 5), alpha=0.1, pool=3)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["pool_batches"] == 3


def test_cli_pool_batches_equals_the_reference(run, tmp_path: Path) -> None:
    x = data((50, 3, 4, 2), "int16", seed=8)
    np.save(tmp_path / "x.npy", x)
    result = run("fit-bn", "x.npy", "-o", "s.npz", "--batch-size", "3", "--alpha", "0.2",
                 "--pool-batches", "4", "--pool-below", "20", "-q")
    assert result.exit_code == 0, result.stderr
    stats = ns.read_stats(str(tmp_path / "s.npz"))
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 3), alpha=0.2, pool=4, below=20)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    shown = run("inspect", "s.npz")
    assert "pool_batches       4" in shown.output and "pool_count" not in shown.output


@pytest.mark.parametrize("args,message", [
    (["--pool-below", "4"], "--pool-below needs --pool-batches K"),
    (["--pool-batches", "0"], "must be a positive integer"),
    (["--pool-batches", "2", "--mode", "exact"], "--pool-batches needs --mode ema"),
])
def test_bad_pool_options_are_one_line_errors(run, tmp_path: Path, args, message) -> None:
    np.save(tmp_path / "x.npy", data((20, 3), "float32"))
    result = run("fit-bn", "x.npy", "-o", "s.npz", *args, "-q")
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("Error")] == \
        [result.stderr.strip().splitlines()[-1]]
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("jobs", [2, 3])
@pytest.mark.parametrize("batch,pool", [(4, 3), (7, 5), (40, 2)])
def test_jobs_prime_each_range_with_the_batches_before_it(run, tmp_path: Path, jobs: int, batch: int, pool: int) -> None:
    x = data((230, 3, 2), "float32", seed=batch)
    np.save(tmp_path / "x.npy", x)
    result = run("fit-bn", "x.npy", "-o", "s.npz", "--batch-size", batch, "--alpha", "0.2",
                 "--pool-batches", pool, "--pool-below", "30", "--jobs", jobs, "-q")
    assert result.exit_code == 0, result.stderr
    stats = ns.read_stats(str(tmp_path / "s.npz"))
    assert stats.meta["jobs"] == jobs
    mean, inv_std = ref_pooled_ema(fixed_batches(x, batch), alpha=0.2, pool=pool, below=30)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    serial = ns.BatchNormEMA(alpha=0.2, batch_size=batch, pool_batches=pool, pool_below=30).update(x).result()
    np.testing.assert_allclose(stats.arrays["pool_mean"], serial.arrays["pool_mean"], rtol=1e-12)
    assert stats.meta["batches_seen"] == serial.meta["batches_seen"]


def test_split_ranges_with_small_blocks_match_the_serial_fit(tmp_path: Path) -> None:
    x = data((300, 4), "float64", seed=12)
    np.save(tmp_path / "x.npy", x)
    recipe = ns.Recipe("batchnorm", "ema", {"batch_size": 6, "alpha": 0.1, "pool_batches": 4})
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        stats = ns.run_fit_parallel(recipe, stream, jobs=3, block_rows=12)
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 6), alpha=0.1, pool=4)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)


def test_priming_is_only_for_pooled_fits() -> None:
    with pytest.raises(ns.UsageError, match="only a pooled fit"):
        with ns.BatchNormEMA(batch_size=4).priming(0):
            pass


def test_dask_tasks_prime_their_ranges(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    x = data((260, 3), "float32", seed=13)
    np.save(tmp_path / "x.npy", x)
    recipe = ns.Recipe("batchnorm", "ema", {"batch_size": 5, "alpha": 0.15, "pool_batches": 3})
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") \
            as cluster, distributed.Client(cluster) as client, ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        stats = ns.run_fit_dask(recipe, stream, client, task_rows=50, block_rows=10)
    assert stats.meta["tasks"] > 3
    mean, inv_std = ref_pooled_ema(fixed_batches(x, 5), alpha=0.15, pool=3)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)


@pytest.mark.parametrize("fmt", ["npz", "h5", "safetensors", "json"])
def test_a_pool_of_one_batch_writes_no_empty_arrays(tmp_path: Path, fmt: str) -> None:
    x = data((9, 2), "float64")
    for pool in (1, 2):
        stats = ns.BatchNormEMA(batch_size=4, pool_batches=pool).update(x).result()
        ns.write_stats(stats, str(tmp_path / f"{pool}.{fmt}"))
        back = ns.read_stats(str(tmp_path / f"{pool}.{fmt}"))
        assert ("pool_count" in back.arrays) == (pool > 1) and back.meta["pool_batches"] == pool


def test_a_damaged_pool_buffer_is_a_stats_file_error() -> None:
    stats = ns.BatchNormEMA(batch_size=4, pool_batches=3).update(data((20, 2), "float64")).result()
    stats.arrays["pool_mean"] = np.zeros((2, 5))
    with pytest.raises(ns.StatsFileError, match="do not fit statistics of shape"):
        ns.batchnorm_state("ema", init=stats)
    stats.arrays["pool_mean"] = np.zeros((2, 2))
    stats.arrays["pool_count"] = -np.ones((2, 2))
    with pytest.raises(ns.StatsFileError, match="negative or non-finite"):
        ns.batchnorm_state("ema", init=stats)
