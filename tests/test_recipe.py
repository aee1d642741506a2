"""The fit recipe: one frozen carrier of a state's description, its split rules
and its memory check."""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from normstats.tasks import FitTask, Inputs, join


def test_recipe_builds_each_state_and_accepts_the_old_mapping_form():
    assert isinstance(ns.Recipe("batchnorm", "ema", {"alpha": 0.1}).build(), ns.BatchNormEMA)
    assert isinstance(ns.Recipe.of({"kind": "centers", "mode": "exact", "options": {"num_classes": 3}}).build(),
                      ns.CentersExact)
    with pytest.raises(ns.UsageError, match="num_classes"):
        ns.Recipe("centers", "ema", {})
    with pytest.raises(ns.UsageError, match="mode"):
        ns.Recipe("batchnorm", "fast", {})


def test_only_moving_averages_tie_blocks_to_batches():
    assert ns.Recipe("batchnorm", "ema", {"batch_size": 64}).row_unit == 64
    assert ns.Recipe("batchnorm", "exact", {"batch_size": 64}).row_unit is None


def test_a_split_fit_refuses_to_continue_a_stats_file():
    stats = ns.BatchNormExact().update(np.ones((4, 2)) * np.arange(4)[:, None]).result()
    with pytest.raises(ns.UsageError, match="cannot be split"):
        ns.Recipe("batchnorm", "exact", {"init": stats}).later()


def test_state_memory_is_refused_up_front_naming_the_figure(tmp_path):
    x = np.zeros((10, 256), np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros(10, np.int64))
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream, ns.open_stream([str(tmp_path / "y.npy")]) as y:
        with pytest.raises(ns.UsageError, match=r"100000 classes .* needs 1\.0 GB .* 1\.0 MB are the max_memory"):
            ns.run_fit(ns.CentersExact(100_000), stream, side={"labels": y}, max_memory=1_000_000)
        recipe = ns.Recipe("centers", "exact", {"num_classes": 100_000})
        with pytest.raises(ns.UsageError, match="needs"):
            ns.run_fit_parallel(recipe, stream, side={"labels": y}, jobs=2, max_memory=1_000_000)


def test_cli_refuses_an_impossible_number_of_classes_in_one_line(run, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 4), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(10, np.int64))
    result = run("fit-centers", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--num-classes", str(10**12), "-o", str(tmp_path / "c.npz"))
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: the ema centers state for 1000000000000 classes")
    assert result.stderr.count("\n") == 1 and "TB of memory" in result.stderr
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("mode", ["ema", "exact"])
def test_tasks_of_a_split_fit_combine_to_the_serial_state(tmp_path, mode):
    x = np.random.default_rng(5).normal(3.0, 1.0, (300, 3))
    np.save(tmp_path / "x.npy", x)
    recipe = ns.Recipe("batchnorm", mode, {"batch_size": 10, "alpha": 0.1} if mode == "ema" else {"batch_size": 7})
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        inputs = Inputs.of(stream, {}, allow_external=False)
        serial = ns.run_fit(recipe.build(), stream, block_rows=50)
    tasks = [FitTask(recipe if a == 0 else recipe.later(), inputs, a, b, 50) for a, b in [(0, 100), (100, 300)]]
    first, second = (task() for task in tasks)
    assert second.first_row == 100 and second.rows_seen == 200
    joined = join(first, second).result()
    for key in serial.arrays:
        np.testing.assert_allclose(joined.arrays[key], serial.arrays[key], rtol=1e-12)
    assert joined.meta["rows_seen"] == 300 and joined.meta["batches_seen"] == serial.meta["batches_seen"]


def test_exact_batches_are_counted_on_the_stream_grid_whatever_the_blocks():
    x = np.random.default_rng(1).normal(size=(100, 2))
    state = ns.BatchNormExact(batch_size=8)
    for start in range(0, 100, 13):  # blocks that are no multiple of the batch
        state.update(x[start:start + 13])
    assert state.result().meta["batches_seen"] == 13  # ceil(100 / 8)


def test_split_ema_fit_with_batches_spanning_blocks_equals_the_serial_fit(tmp_path):
    x = np.random.default_rng(9).normal(2.0, 1.5, (330, 4))
    np.save(tmp_path / "x.npy", x)
    recipe = ns.Recipe("batchnorm", "ema", {"batch_size": 64, "alpha": 0.1})
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        serial = ns.run_fit(recipe.build(), stream, block_rows=16)
        parallel = ns.run_fit_parallel(recipe, stream, jobs=2, block_rows=16)
    for key in ("mean", "inv_std"):
        np.testing.assert_allclose(parallel.arrays[key], serial.arrays[key], rtol=1e-12)
    assert parallel.meta["batches_seen"] == serial.meta["batches_seen"] == 6


@pytest.mark.parametrize("args, what, remedy", [
    (["--pool-batches", str(10**12)], "a buffer of 1000000000000 pooled batches", "use a smaller --pool-batches"),
    (["--mode", "exact", "--groups", "g.npy", "--num-groups", str(10**12)], "1000000000000 groups",
     "use fewer groups"),
])
def test_cli_refuses_an_impossible_bn_state_naming_what_makes_it_big(run, tmp_path, args, what, remedy):
    np.save(tmp_path / "x.npy", np.zeros((10, 4), np.float32))
    np.save(tmp_path / "g.npy", np.zeros(10, np.int64))
    result = run("fit-bn", str(tmp_path / "x.npy"), *args, "-o", str(tmp_path / "s.npz"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: the ")
    assert f" state for {what} of rows shaped (4,) needs " in result.stderr
    assert f"; {remedy} (or more memory)" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_workers_that_fill_the_cores_read_inline(tmp_path, monkeypatch, jobs):
    """A --jobs worker reads ahead in a thread only when a core is left for it; Dask tasks
    (one per worker thread) read inline. The numbers do not depend on it."""
    import os

    from normstats import engines
    from normstats.stream import Stream

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    x = np.random.default_rng(6).normal(size=(400, 3))
    np.save(tmp_path / "x.npy", x)
    seen = []
    blocks = Stream.blocks

    def spied(self, *args, prefetch=True, **kwargs):
        seen.append(prefetch)
        return blocks(self, *args, prefetch=prefetch, **kwargs)

    monkeypatch.setattr(Stream, "blocks", spied)
    recipe = ns.Recipe("batchnorm", "exact", {"batch_size": 7})
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        tasks = engines._fit_tasks(recipe, stream, {}, allow_external=False, absolute=False, block_rows=50,
                                   parts=jobs, read_ahead=jobs < 2)
        states = [task() for task in tasks]
    assert seen and set(seen) == {jobs < 2}
    result = engines._tree(states, join).result()
    np.testing.assert_allclose(result.arrays["mean"], x.mean(0), rtol=1e-12)

    planned = {}
    plan = engines._fit_tasks

    def captured(*args, **kwargs):
        planned.update(kwargs)
        return plan(*args, **kwargs)

    monkeypatch.setattr(engines, "_fit_tasks", captured)
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        forked = ns.run_fit_parallel(recipe, stream, jobs=jobs)
    assert planned["read_ahead"] == (jobs < 2)  # two cores: one worker leaves one for its reader
    np.testing.assert_allclose(forked.arrays["mean"], x.mean(0), rtol=1e-12)

    # Dask: the tasks it plans read inline (its tasks run here, in this process, instead of on a cluster)
    class Client:
        def scheduler_info(self):
            return {"workers": {}}

    monkeypatch.setattr(engines, "_gather", lambda client, tasks, progress, combine: [
        engines._tree([task() for task in tasks], combine)])
    planned.clear()
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        clustered = ns.run_fit_dask(recipe, stream, Client(), task_rows=100)
    assert planned["read_ahead"] is False
    np.testing.assert_allclose(clustered.arrays["mean"], x.mean(0), rtol=1e-12)
