"""fit-bn --batch-boundaries FILE|sequences: batches starting at given rows (of one row,
or spanning many read blocks), against a plain-NumPy reference batch by batch; the
per-batch element counts stored (batch_elements) and summarized; bad files refused."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
import normstats.stream as read_blocks
from normstats.boundaries import checked_boundaries, read_boundaries
from normstats.files import identities
from normstats.resume import Checkpointer

from tests.batch_reference import close, data, per_stat, ref_pooled_ema


def cut(x: np.ndarray, starts) -> list:
    ends = list(starts[1:]) + [len(x)]
    return [x[a:b] for a, b in zip(starts, ends)]


STARTS = [0, 1, 2, 3, 40, 41, 97, 98, 99]  # batches of one row and of many 4-row blocks


def _fit(run, *args) -> ns.Stats:
    result = run("fit-bn", *args, "-o", "s.npz", "-q")
    assert result.exit_code == 0, result.stderr
    return ns.read_stats("s.npz")


@pytest.mark.parametrize("shape", [(120, 3), (120, 2, 3, 2)])
@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize("fmt", ["npy", "txt"])
def test_boundaries_file_equals_the_reference(run, tmp_path: Path, monkeypatch, shape, dtype, fmt) -> None:
    x = data(shape, dtype, seed=len(shape))
    np.save(tmp_path / "x.npy", x)
    if fmt == "npy":
        np.save(tmp_path / "b.npy", np.array(STARTS))
    else:
        (tmp_path / "b.txt").write_text("\n".join(map(str, STARTS)) + "\n")
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", 4 * x[0].nbytes)  # 4-row blocks
    stats = _fit(run, "x.npy", f"--batch-boundaries=b.{fmt}", "--alpha", "0.3", "--ddof", "0")
    mean, inv_std = ref_pooled_ema(cut(x, STARTS), alpha=0.3, ddof=0)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    per = per_stat(x[:1]).shape[1]
    np.testing.assert_array_equal(stats.arrays["batch_elements"], np.diff(STARTS + [120]) * per)
    assert stats.arrays["batch_elements"].dtype == np.int64
    assert stats.meta["batches_seen"] == len(STARTS) and stats.meta["batch_boundaries"] == f"b.{fmt}"
    assert stats.meta["batch_size"] is None


def test_batches_of_one_row_with_ddof_1_are_skipped_like_the_layer(run, tmp_path: Path) -> None:
    x = data((30, 3), "float64", seed=2)
    np.save(tmp_path / "x.npy", x)
    starts = [0, 10, 11, 12, 20]
    np.save(tmp_path / "b.npy", np.array(starts))
    stats = _fit(run, "x.npy", "--batch-boundaries", "b.npy", "--alpha", "0.5")
    kept = [b for b in cut(x, starts) if len(b) > 1]  # one element per statistic: no variance
    mean, inv_std = ref_pooled_ema(kept, alpha=0.5)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["batches_skipped"] == 2


def test_boundaries_with_pooling(tmp_path: Path, monkeypatch) -> None:
    x = data((90, 2, 5), "float32", seed=3)
    np.save(tmp_path / "x.npy", x)
    starts = [0, 1, 5, 6, 30, 31, 32, 70]
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", 7 * x[0].nbytes)
    state = ns.BatchNormEMA(alpha=0.2, boundaries=checked_boundaries(np.array(starts), "b"),
                            pool_batches=3, pool_below=50)
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        stats = ns.run_fit(state, stream)
    mean, inv_std = ref_pooled_ema(cut(x, starts), alpha=0.2, pool=3, below=50)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)


def test_library_updates_of_any_size_follow_the_grid() -> None:
    x = data((64, 4), "float64", seed=4)
    starts = [0, 3, 4, 30, 63]
    bounds = checked_boundaries(np.array(starts), "b")
    pieces = ns.BatchNormEMA(alpha=0.4, ddof=0, boundaries=bounds)
    for a, b in [(0, 1), (1, 4), (4, 5), (5, 33), (33, 63), (63, 64)]:
        pieces.update(x[a:b])
    stats = pieces.result()
    mean, inv_std = ref_pooled_ema(cut(x, starts), alpha=0.4, ddof=0)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    np.testing.assert_array_equal(stats.arrays["batch_elements"], [3, 1, 26, 33, 1])


def test_a_continued_fit_keeps_the_batch_elements(tmp_path: Path) -> None:
    x = data((50, 3), "float64", seed=5)
    first = ns.BatchNormEMA(alpha=0.3, boundaries=checked_boundaries(np.array([0, 7]), "a")).update(x[:20]).result()
    ns.write_stats(first, str(tmp_path / "c.h5"))
    later = checked_boundaries(np.array([0, 13]), "b")  # the new rows' own offsets (20 and 33 of x)
    state = ns.batchnorm_state("ema", init=ns.read_stats(str(tmp_path / "c.h5")), boundaries=later)
    stats = state.update(x[20:]).result()
    mean, inv_std = ref_pooled_ema(cut(x, [0, 7, 20, 33]), alpha=0.3)
    close(stats.arrays["inv_std"], inv_std)
    np.testing.assert_array_equal(stats.arrays["batch_elements"], [7, 13, 13, 17])


def test_init_and_resume_count_the_offsets_of_their_input(run, tmp_path: Path, monkeypatch) -> None:
    x = data((50, 3), "float32", seed=9)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "head.npy", x[:20])
    np.save(tmp_path / "tail.npy", x[20:])
    np.save(tmp_path / "all.npy", np.array([0, 7, 20, 33]))
    np.save(tmp_path / "a.npy", np.array([0, 7]))
    np.save(tmp_path / "b.npy", np.array([0, 13]))
    expected = ref_pooled_ema(cut(x, [0, 7, 20, 33]), alpha=0.3, pool=2)
    _fit(run, "head.npy", "--batch-boundaries", "a.npy", "--alpha", "0.3", "--pool-batches", "2")
    (tmp_path / "s.npz").rename(tmp_path / "head.npz")
    continued = _fit(run, "tail.npy", "--batch-boundaries", "b.npy", "--init", "head.npz")
    (tmp_path / "s.npz").unlink()
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        state = ns.BatchNormEMA(alpha=0.3, pool_batches=2, boundaries=read_boundaries(str(tmp_path / "all.npy")))
        state.update(x[:20])  # row 20 starts a batch: nothing open, a checkpoint is taken
        save = Checkpointer(str(tmp_path / "ck.npz"), 0.0, sources=stream.names, rows_total=stream.rows,
                            inputs=identities({"features": stream}))
        save._last = -1e9
        save(state, 20)
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", 4 * x[0].nbytes)
    resumed = _fit(run, "x.npy", "--batch-boundaries", "all.npy", "--resume", "ck.npz")
    for stats in (continued, resumed):
        close(stats.arrays["mean"], expected[0])
        close(stats.arrays["inv_std"], expected[1])
        np.testing.assert_array_equal(stats.arrays["batch_elements"], [7, 13, 13, 17])


def test_sequences_make_one_batch_each(run, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    lengths = [5, 1, 12, 3, 9]
    utts = {f"u{i}": rng.normal(size=(n, 3)) * (i + 1) for i, n in enumerate(lengths)}
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for key, value in utts.items():
            f[f"feats/{key}"] = value
    stats = _fit(run, "f.h5:/feats", "--batch-boundaries", "sequences", "--alpha", "0.5", "--ddof", "0")
    order = sorted(utts)  # the collection's order
    mean, inv_std = ref_pooled_ema([utts[k] for k in order], alpha=0.5, ddof=0)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    np.testing.assert_array_equal(stats.arrays["batch_elements"], [len(utts[k]) for k in order])
    summary = json.loads(run("inspect", "s.npz", "--json").output)
    assert summary["batch_elements"] == {"count": 5, "min": 1, "median": 5.0, "max": 12}
    assert "5 batches, 1 / 5 / 12" in run("inspect", "s.npz").output


@pytest.mark.parametrize("content,message", [
    ("0 5 5 9", "b.txt: offset 5 (entry 2) is not greater than the one before (5)"),
    ("0 5 3", "b.txt: offset 3 (entry 2) is not greater than the one before (5)"),
    ("0 4 -2", "b.txt: offset -2 (entry 2) is negative"),
    ("0 10 20", "b.txt: offset 20 (entry 2) is beyond the input's 20 rows"),
    ("3 10", "b.txt: the first offset is 3, not 0"),
    ("0 1.5", "b.txt: '1.5' (entry 1) is not an integer"),
    ("", "b.txt holds no offsets"),
])
def test_bad_boundaries_are_one_line_errors(run, tmp_path: Path, content: str, message: str) -> None:
    np.save(tmp_path / "x.npy", data((20, 3), "float32"))
    (tmp_path / "b.txt").write_text(content)
    result = run("fit-bn", "x.npy", "-o", "s.npz", "--batch-boundaries", "b.txt", "-q")
    assert result.exit_code != 0
    assert message in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("Error: ")
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("array,message", [
    (np.array([[0, 1], [2, 3]]), "has shape (2, 2)"),
    (np.array([0.0, 2.5]), "holds float64 values"),
    (np.array([0.0, np.inf]), "holds float64 values"),
    (np.array([0, 3, 1]), "offset 1 (entry 2) is not greater"),
])
def test_bad_npy_boundaries(tmp_path: Path, array, message) -> None:
    np.save(tmp_path / "b.npy", array)
    with pytest.raises(ns.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_boundaries(str(tmp_path / "b.npy"))


@pytest.mark.parametrize("args,message", [
    (["--batch-boundaries", "b.txt", "--batch-size", "4"], "--batch-boundaries replaces --batch-size"),
    (["--batch-boundaries", "b.txt", "--mode", "exact"], "--batch-boundaries needs --mode ema"),
    (["--batch-boundaries", "b.txt", "--jobs", "2"], "--batch-boundaries runs in one process"),
    (["--batch-boundaries", "sequences"], "x.npy is one array, without sequences"),
    (["--batch-boundaries", "missing.txt"], "--batch-boundaries file 'missing.txt' does not exist"),
])
def test_bad_boundary_options(run, tmp_path: Path, args, message) -> None:
    np.save(tmp_path / "x.npy", data((20, 3), "float32"))
    (tmp_path / "b.txt").write_text("0 5")
    result = run("fit-bn", "x.npy", "-o", "s.npz", *args, "-q")
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("seed", range(6))
def test_random_boundaries_and_blocks(tmp_path: Path, monkeypatch, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 80))
    x = data((rows, 2, 3), "float64" if seed % 2 else "int16", seed=seed)
    np.save(tmp_path / "x.npy", x)
    starts = np.unique(np.r_[0, rng.integers(0, rows, size=int(rng.integers(0, rows + 1)))])
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", int(rng.integers(1, 12)) * x[0].nbytes)
    pool = int(rng.integers(1, 4))
    state = ns.BatchNormEMA(alpha=0.3, ddof=0, pool_batches=pool, boundaries=checked_boundaries(starts, "b"))
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        stats = ns.run_fit(state, stream)
    mean, inv_std = ref_pooled_ema(cut(x, list(starts)), alpha=0.3, ddof=0, pool=pool)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["batches_seen"] == len(starts)


@pytest.mark.parametrize("grid", ["boundaries", "fixed"])
def test_checkpoints_fall_between_batches_and_resume_exactly(tmp_path: Path, monkeypatch, grid: str) -> None:
    # Blocks of 7 rows against batches that end elsewhere: each block is cut where its last
    # batch starts, so checkpoints are taken, and each resumes to the uninterrupted result.
    x = data((100, 3), "float64", seed=11)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", 7 * x[0].nbytes)
    starts = [0, 2, 3, 15, 16, 30, 44, 45, 60, 88]
    options = (dict(boundaries=checked_boundaries(np.array(starts), "b")) if grid == "boundaries"
               else dict(batch_size=9))
    options.update(alpha=0.2, pool_batches=3)
    saved = []
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        whole = ns.run_fit(ns.BatchNormEMA(**options), stream,
                           checkpoint=lambda state, done: saved.append((done, state.result())))
        grid_starts = starts if grid == "boundaries" else list(range(0, 100, 9))
        points = sorted({done for done, _ in saved})
        assert len(points) >= 5 and set(points) <= set(grid_starts) | {100}
        for done, stats in saved[1::3]:
            state = ns.batchnorm_state("ema", init=stats, **{k: v for k, v in options.items() if k == "boundaries"})
            resumed = ns.run_fit(state, stream, start_row=done)
            close(resumed.arrays["mean"], whole.arrays["mean"])
            close(resumed.arrays["inv_std"], whole.arrays["inv_std"])
            assert resumed.meta["batches_seen"] == whole.meta["batches_seen"]


def test_damaged_batch_elements_are_a_stats_file_error() -> None:
    bounds = checked_boundaries(np.array([0, 4]), "b")
    stats = ns.BatchNormEMA(boundaries=bounds).update(data((10, 2), "float64")).result()
    stats.arrays["batch_elements"] = np.array([np.nan, 3.0])
    with pytest.raises(ns.StatsFileError, match="batch_elements must be one non-negative integer per batch"):
        ns.batchnorm_state("ema", init=stats, boundaries=bounds)


def test_continuing_a_boundaries_fit_needs_a_batch_grid(run, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", data((20, 3), "float32"))
    np.save(tmp_path / "b.npy", np.array([0, 5]))
    _fit(run, "x.npy", "--batch-boundaries", "b.npy")
    result = run("fit-bn", "x.npy", "-o", "t.npz", "--init", "s.npz", "-q")
    assert result.exit_code != 0
    assert "was fitted with --batch-boundaries b.npy; give --batch-boundaries (or --batch-size) again" in result.stderr
    again = run("fit-bn", "x.npy", "-o", "t.npz", "--init", "s.npz", "--batch-size", "4", "-q")
    assert again.exit_code == 0, again.stderr


@pytest.mark.parametrize("target", ["output", "link", "checkpoint"])
def test_the_boundaries_file_is_an_input_no_output_may_overwrite(run, tmp_path: Path, target) -> None:
    np.save(tmp_path / "x.npy", np.arange(40, dtype=np.float32).reshape(20, 2))
    bounds = tmp_path / "bounds.json"  # a text file of offsets; its name is also a stats format
    bounds.write_text("0\n5\n12\n")
    before = bounds.read_bytes()
    (tmp_path / "link.json").symlink_to(bounds)
    out = {"output": ["-o", bounds], "link": ["-o", tmp_path / "link.json"],
           "checkpoint": ["-o", tmp_path / "s.npz", "--checkpoint", bounds]}[target]
    result = run("fit-bn", tmp_path / "x.npy", *out, "--batch-boundaries", bounds, "--force", "-q")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "the --batch-boundaries file" in result.stderr and "write to another path" in result.stderr
    assert bounds.read_bytes() == before and not (tmp_path / "s.npz").exists()
