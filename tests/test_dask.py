"""The Dask engine on a real local cluster (worker processes, loopback only).

Every command runs with ``--scheduler`` pointed at the cluster and is compared
with the local engine and with the numpy references; one test kills a worker
mid-run and still gets the same result.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import h5py
import numpy as np
import pytest

import normstats as ns
from tests.reference import ref_apply, ref_bn_ema, ref_bn_exact, ref_centers_ema_first, ref_centers_exact

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402  (installed with distributed)

ROWS = 2000
SHARDS = [(0, 700), (700, 1250), (1250, 2000)]  # cut mid-batch: batches span shards


@pytest.fixture(scope="module")
def cluster():
    # The scheduler runs in this process; a long transition log lets a test see reruns.
    with dask.config.set({"distributed.admin.low-level-log-length": 100_000}), distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """x (2000, 3, 4, 5) float32 as three .npy shards and one HDF5 file with three
    datasets; labels (7 classes, class 6 only after row 1000) and weights."""
    folder = tmp_path_factory.mktemp("dask")
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(ROWS, 3, 4, 5)) * np.array([1.0, 3.0, 0.5])[:, None, None]
         + np.array([10.0, -2.0, 0.0])[:, None, None]).astype(np.float32)
    labels = rng.integers(0, 6, ROWS)
    labels[1000:1300] = 6
    weights = rng.random(ROWS)
    with h5py.File(folder / "x.h5", "w") as f:
        for i, (a, b) in enumerate(SHARDS):
            np.save(folder / f"x{i}.npy", x[a:b])
            np.save(folder / f"y{i}.npy", labels[a:b])
            f[f"part{i}"] = x[a:b]
    np.save(folder / "y.npy", labels)
    np.save(folder / "w.npy", weights)
    return folder, x, labels, weights


SHARD_ARGS = ["x0.npy", "x1.npy", "x2.npy"]


def _fit(run, folder, monkeypatch, args, output):
    monkeypatch.chdir(folder)
    result = run(*args, "-o", output, "--force")
    assert result.exit_code == 0, result.stderr
    with np.load(folder / output) as f:
        return {k: f[k] for k in f.files if k != "meta"}, json.loads(str(f["meta"]))


def _both(run, folder, monkeypatch, cluster, args):
    """(local result, dask result) of the same command."""
    local = _fit(run, folder, monkeypatch, args, "local.npz")
    dask = _fit(run, folder, monkeypatch,
                [*args, "--engine", "dask", "--scheduler", cluster.scheduler_address, "--task-rows", "160"],
                "dask.npz")
    return local, dask


def test_fit_bn_ema_equals_the_local_engine_and_the_reference(run, data, monkeypatch, cluster):
    folder, x, _, _ = data
    args = ["fit-bn", *SHARD_ARGS, "--batch-size", "32", "--alpha", "0.05"]
    (local, _), (dask, meta) = _both(run, folder, monkeypatch, cluster, args)
    assert meta["engine"] == "dask" and meta["tasks"] == 13 and meta["workers"] == 2
    mean, inv_std, batches, _ = ref_bn_ema(x, 32, alpha=0.05)
    for key, expected in (("mean", mean), ("inv_std", inv_std)):
        np.testing.assert_allclose(dask[key], local[key], rtol=1e-10)
        np.testing.assert_allclose(dask[key], expected, rtol=1e-10)
    assert meta["batches_seen"] == batches and meta["rows_seen"] == ROWS


@pytest.mark.parametrize("extra", [[], ["--weights", "w.npy"], ["--groups", "y.npy", "--num-groups", "7"],
                                   ["--axes", "0,3"]], ids=["plain", "weights", "groups", "axes"])
def test_fit_bn_exact_equals_the_local_engine(run, data, monkeypatch, cluster, extra):
    folder, x, _, _ = data
    args = ["fit-bn", "x.h5:part0", "x.h5:part1", "x.h5:part2", "--mode", "exact", *extra]
    (local, _), (dask, meta) = _both(run, folder, monkeypatch, cluster, args)
    assert sorted(dask) == sorted(local) and meta["tasks"] > 1
    for key in local:
        np.testing.assert_allclose(dask[key], local[key], rtol=1e-12)
    if not extra:
        mean, var, _ = ref_bn_exact(x)
        np.testing.assert_allclose(dask["mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(dask["var"], var, rtol=1e-12)


@pytest.mark.parametrize("mode", ["ema", "exact"])
def test_fit_centers_equals_the_local_engine_and_the_reference(run, data, monkeypatch, cluster, mode):
    folder, x, labels, _ = data
    args = ["fit-centers", *SHARD_ARGS, "--labels", "y.npy", "--num-classes", "8", "--batch-size", "32",
            "--mode", mode, *(["--init", "first", "--alpha", "0.2"] if mode == "ema" else [])]
    (local, _), (dask, meta) = _both(run, folder, monkeypatch, cluster, args)
    np.testing.assert_allclose(dask["centers"], local["centers"], rtol=1e-10 if mode == "ema" else 1e-12)
    np.testing.assert_array_equal(dask["counts"], local["counts"])
    flat = x.reshape(ROWS, -1)
    if mode == "ema":  # class 6 first appears in a later task: it is seeded by its first batch mean
        expected, _ = ref_centers_ema_first(flat, labels, 8, 32, alpha=0.2)
    else:
        expected = ref_centers_exact(flat, labels, 8)[0]
    np.testing.assert_allclose(dask["centers"].reshape(8, -1), expected, rtol=1e-10)
    assert np.isnan(dask["centers"][7]).all() and meta["classes_unseen"] == 1


@pytest.mark.parametrize("output", ["out.npy", "out.h5", "out.h5:normalized"])
def test_apply_writes_what_the_local_engine_writes(run, data, monkeypatch, cluster, output):
    folder, x, _, _ = data
    monkeypatch.chdir(folder)
    np.save(folder / "all.npy", x)
    assert run("fit-bn", "all.npy", "--mode", "exact", "-o", "stats.npz", "--force").exit_code == 0
    path, _, name = output.partition(":")
    local_output = "local" + output[3:]
    assert run("apply", "stats.npz", "all.npy", "-o", local_output, "--force").exit_code == 0
    result = run("apply", "stats.npz", "all.npy", "-o", output, "--force", "--engine", "dask",
                 "--scheduler", cluster.scheduler_address, "--task-rows", "300")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("apply: 2,000 rows")
    read = (lambda p, n: np.load(folder / p)) if path.endswith(".npy") else \
        (lambda p, n: h5py.File(folder / p, "r")[n or "data"][...])
    got, expected = read(path, name), read("local" + path[3:], name)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(got, expected)
    with np.load(folder / "stats.npz") as stats:
        np.testing.assert_allclose(got, ref_apply(x, stats["mean"], stats["inv_std"]), rtol=1e-5, atol=1e-5)
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_a_bad_value_is_reported_with_its_file_and_row(run, data, monkeypatch, cluster, tmp_path):
    _, x, _, _ = data
    bad = x[:900].copy()
    bad[777, 1, 2, 3] = np.inf
    np.save(tmp_path / "a.npy", x[:300])
    np.save(tmp_path / "b.npy", bad)
    result = run("fit-bn", "a.npy", "b.npy", "-o", "s.npz", "--mode", "exact", "--engine", "dask",
                 "--scheduler", cluster.scheduler_address, "--task-rows", "100")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {tmp_path / 'b.npy'} row 777: column 1, 2, 3 holds inf")
    assert "Traceback" not in result.stderr and not (tmp_path / "s.npz").exists()


def test_a_worker_killed_mid_run_changes_nothing(data, cluster):
    """SIGKILL one worker while tasks run; Dask reruns its tasks (and any results it
    held) elsewhere, the nanny restarts it, and the states come out the same."""
    folder, x, labels, _ = data
    recipe = {"kind": "batchnorm", "mode": "ema", "options": {"batch_size": 16, "alpha": 0.05}}
    with distributed.Client(cluster.scheduler_address) as client, \
            ns.open_stream([str(folder / "x.h5:part0"), str(folder / "x.h5:part1"),
                            str(folder / "x.h5:part2")]) as stream:
        expected = ns.run_fit(ns.batchnorm_state("ema", batch_size=16, alpha=0.05), stream)
        pids = client.run(os.getpid)
        killed = []
        done = []

        def kill_a_busy_worker(rows: int) -> None:
            done.append(rows)
            busy = [worker for worker, keys in client.processing().items() if keys]
            if len(done) >= 20 and busy and not killed:  # well under way, and it is running a task
                killed.append(pids[busy[0]])
                os.kill(killed[0], signal.SIGKILL)
            time.sleep(0.01)  # keep the run going long enough for the kill to matter

        log_start = len(cluster.scheduler.transition_log)
        got = ns.run_fit_dask(recipe, stream, client, task_rows=16, block_rows=16,
                              progress=kill_a_busy_worker)
        assert killed and got.meta["tasks"] == 125
        # The task it was running (and any state it held) was computed again elsewhere.
        log = list(cluster.scheduler.transition_log)[log_start:]
        processing = [entry[0] for entry in log if entry[2] == "processing"]
        assert len(processing) > len(set(processing))
        assert killed[0] not in client.run(os.getpid).values()  # the nanny started a new worker
        for key in ("mean", "inv_std"):
            np.testing.assert_allclose(got.arrays[key], expected.arrays[key], rtol=1e-10)
        assert got.meta["batches_seen"] == expected.meta["batches_seen"]


def test_engine_dask_without_a_scheduler_starts_a_local_cluster(run, data, monkeypatch):
    folder, x, _, _ = data
    monkeypatch.chdir(folder)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    result = run("fit-bn", "x0.npy", "--mode", "exact", "--engine", "dask", "-o", "local_cluster.npz",
                 "--force")
    assert result.exit_code == 0, result.stderr
    with np.load(folder / "local_cluster.npz") as f:
        meta = json.loads(str(f["meta"]))
        np.testing.assert_allclose(f["mean"], ref_bn_exact(x[:700])[0], rtol=1e-12)
    assert meta["workers"] == 2


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --engine dask"),
    (["--task-rows", "10"], "--task-rows needs --engine dask"),
    (["--engine", "dask", "--jobs", "2"], "--jobs is for the local engine"),
    (["--engine", "dask", "--checkpoint", "ck.npz"], "do not combine with"),
    (["--engine", "dask", "--task-rows", "0"], "--task-rows"),
])
def test_engine_usage_errors(run, npy4d, args, message):
    result = run("fit-bn", npy4d, "-o", "s.npz", *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists("s.npz")


def test_engine_dask_without_distributed_says_how_to_install_it(run, npy4d, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    result = run("fit-bn", npy4d, "-o", "s.npz", "--engine", "dask")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: --engine dask needs dask.distributed; install it with "
                                     "pip install 'normstats[dask]'")


def test_an_unreachable_scheduler_is_a_usage_error(run, npy4d, monkeypatch):
    monkeypatch.setattr(ns.engines, "CONNECT_TIMEOUT", "1s")
    result = run("fit-bn", npy4d, "-o", "s.npz", "--engine", "dask", "--scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: cannot connect to the Dask scheduler at tcp://127.0.0.1:9: ")
    assert len(result.stderr.strip().splitlines()) == 1 and not os.path.exists("s.npz")


def test_fit_centers_from_initial_centers_equals_the_local_engine(run, data, monkeypatch, cluster):
    folder, x, labels, _ = data
    np.save(folder / "init.npy", np.random.default_rng(3).normal(size=(8, 60)))
    args = ["fit-centers", *SHARD_ARGS, "--labels", "y.npy", "--num-classes", "8", "--batch-size", "32",
            "--init", "init.npy"]
    (local, _), (dask, meta) = _both(run, folder, monkeypatch, cluster, args)
    assert meta["tasks"] > 1
    np.testing.assert_allclose(dask["centers"], local["centers"], rtol=1e-10)
    # class 7 never appears: it keeps its initial center
    np.testing.assert_array_equal(dask["centers"][7].ravel(), np.load(folder / "init.npy")[7])
