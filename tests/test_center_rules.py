"""fit-centers --rule per-sample: the Center layers' own update, against a plain loop.

The reference below is the layers' code written out in NumPy (Pytorch_Ext's
``index_add_`` of ``(alpha_layer - 1) * (C[labels] - f)``, Dandelion's
``inc_subtensor`` of ``alpha * (f - C[labels])``): per batch, every row adds its
step to its class's center, every step taken from the centers the batch started
with. It loops over batches and over rows; normstats folds per (batch, class).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import normstats as ns
import normstats.stream
from tests.reference import ref_centers_ema
from tests.test_exact import _interrupt_after, _small_blocks  # the checkpoint tests' interruption

K = 5


def layer_per_sample(x, labels, batch_size, alpha, init, *, ignore=None, skip_nonfinite=False):
    """The Center layers' update, batch by batch and row by row (init: an array, or
    None for 'first': a class takes the mean of its rows in the first batch it is in)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    if init is None:
        centers, ready = np.full((K, x.shape[1]), np.nan), np.zeros(K, bool)
    else:
        centers, ready = np.array(init, np.float64).reshape(K, -1).copy(), np.ones(K, bool)
    for start in range(0, len(x), batch_size):
        old = centers.copy()
        rows = []
        for f, label in zip(x[start:start + batch_size], labels[start:start + batch_size]):
            if label == ignore or (skip_nonfinite and not np.isfinite(f).all()):
                continue
            rows.append((f, label))
        for label in {label for _, label in rows if not ready[label]}:  # init 'first'
            centers[label] = old[label] = np.mean([f for f, lab in rows if lab == label], axis=0)
            ready[label] = True
        for f, label in rows:
            centers[label] += alpha * (f - old[label])
    return centers


def close(actual, expected):
    actual = np.asarray(actual).reshape(np.shape(expected))
    scale = max(1.0, float(np.nanmax(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12 * scale)


@pytest.fixture
def data():
    """97 rows of 6 float32 features; labels with many repeats per batch, -1 (ignored) rows."""
    rng = np.random.default_rng(14)
    x = (rng.normal(size=(97, 6)) * 2.0 + np.arange(6)).astype(np.float32)
    labels = rng.choice(K, size=97, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    labels[[3, 4, 20, 61, 62, 63]] = -1
    return x, labels


def test_the_two_rules_differ_and_batch_mean_is_the_default(data):
    x, labels = data
    keep = labels >= 0
    default = ns.CentersEMA(K, alpha=0.2, init="zeros", batch_size=16).update(x[keep], labels[keep]).result()
    assert default.meta["rule"] == "batch-mean"
    close(default.arrays["centers"], ref_centers_ema(x[keep], labels[keep], K, 16, alpha=0.2)[0])
    per_sample = ns.CentersEMA(K, alpha=0.2, rule="per-sample", init="zeros", batch_size=16)
    per_sample = per_sample.update(x[keep], labels[keep]).result()
    assert per_sample.meta["rule"] == "per-sample"
    assert np.abs(per_sample.arrays["centers"] - default.arrays["centers"]).max() > 0.5
    with pytest.raises(ns.UsageError, match="rule must be one of batch-mean, per-sample"):
        ns.CentersEMA(K, rule="per-row")


@pytest.mark.parametrize("batch_size", [1, 3, 16, 97, 200])
@pytest.mark.parametrize("init", ["zeros", "random", "first", "array"])
def test_per_sample_equals_the_layer_loop(data, batch_size, init):
    x, labels = data
    given = np.random.default_rng(1).normal(size=(K, 6)) if init == "array" else init
    state = ns.CentersEMA(K, alpha=0.07, rule="per-sample", init=given, seed=3, batch_size=batch_size,
                          ignore_label=-1)
    stats = state.update(x, labels).result()
    bound = 1 / np.sqrt(6)  # init random: uniform in ±1/sqrt(dim), seeded
    start = {"zeros": np.zeros((K, 6)), "first": None, "array": given,
             "random": np.random.default_rng(3).uniform(-bound, bound, size=(K, 6))}[init]
    close(stats.arrays["centers"], layer_per_sample(x, labels, batch_size, 0.07, start, ignore=-1))
    np.testing.assert_array_equal(stats.arrays["counts"], np.bincount(labels[labels >= 0], minlength=K))
    assert stats.meta["rows_ignored"] == 6


def test_per_sample_overshoots_as_the_layer_does(data):
    """alpha * n > 1 for a class with many rows in a batch: the layer's centers leave the
    data's range; normstats reproduces them, it does not clip."""
    x, labels = data
    keep = labels >= 0
    stats = ns.CentersEMA(K, alpha=0.1, rule="per-sample", init="zeros", batch_size=97).update(x[keep], labels[keep])
    expected = layer_per_sample(x[keep], labels[keep], 97, 0.1, np.zeros((K, 6)))
    close(stats.result().arrays["centers"], expected)
    assert np.abs(expected).max() > np.abs(x).max()


def test_nan_rows_are_skipped_under_omit(data):
    x, labels = data
    x = x.copy()
    x[[7, 8, 50], [0, 5, 2]] = [np.nan, np.inf, np.nan]
    stats = ns.CentersEMA(K, alpha=0.05, rule="per-sample", init="zeros", batch_size=8, ignore_label=-1,
                          nan_policy="omit").update(x, labels).result()
    close(stats.arrays["centers"],
          layer_per_sample(x, labels, 8, 0.05, np.zeros((K, 6)), ignore=-1, skip_nonfinite=True))


def test_a_batch_accumulated_over_updates_equals_one_update(data):
    x, labels = data
    options = dict(alpha=0.03, rule="per-sample", init="zeros", batch_size=40, ignore_label=-1)
    whole = ns.CentersEMA(K, **options).update(x, labels).result()
    pieces = ns.CentersEMA(K, **options)
    for start in range(0, 97, 7):  # 7-row pieces: every 40-row batch spans pieces
        pieces.update(x[start:start + 7], labels[start:start + 7], more=True)
    close(pieces.close().result().arrays["centers"], whole.arrays["centers"])
    close(whole.arrays["centers"], layer_per_sample(x, labels, 40, 0.03, np.zeros((K, 6)), ignore=-1))


@pytest.mark.parametrize("init", ["zeros", "first"])
def test_ranges_appended_with_follow_equal_one_state(data, init):
    """The split of --jobs and Dask: later ranges start from zero and are appended."""
    x, labels = data
    options = dict(alpha=0.06, rule="per-sample", init=init, batch_size=8, ignore_label=-1)
    one = ns.CentersEMA(K, **options).update(x, labels).result()
    first = ns.CentersEMA(K, **options).update(x[:24], labels[:24])
    second = ns.CentersEMA(K, **options).zero_start()
    second.first_row = 24
    second.update(x[24:64], labels[24:64])
    third = ns.CentersEMA(K, **options).zero_start()
    third.first_row = 64
    third.update(x[64:], labels[64:])
    joined = first.follow(second.follow(third)).result()
    close(joined.arrays["centers"], one.arrays["centers"])
    np.testing.assert_array_equal(joined.arrays["counts"], one.arrays["counts"])
    with pytest.raises(ns.DataError, match="different rule"):
        ns.CentersEMA(K, **options).update(x[:8], labels[:8]).follow(
            ns.CentersEMA(K, **dict(options, rule="batch-mean")).zero_start().update(x[8:16], labels[8:16]))


def test_a_continued_fit_takes_the_rule_from_its_file(data):
    x, labels = data
    options = dict(alpha=0.05, rule="per-sample", init="zeros", batch_size=8, ignore_label=-1)
    start = ns.CentersEMA(K, **options).update(x[:48], labels[:48]).result()
    continued = ns.CentersEMA.from_stats(start).update(x[48:], labels[48:]).result()
    assert continued.meta["rule"] == "per-sample" and continued.meta["alpha"] == 0.05
    close(continued.arrays["centers"], layer_per_sample(x, labels, 8, 0.05, np.zeros((K, 6)), ignore=-1))


def test_the_recipe_carries_the_rule_to_every_range(data):
    recipe = ns.Recipe("centers", "ema", {"num_classes": K, "rule": "per-sample", "alpha": 0.1})
    assert recipe.build().rule == "per-sample" and recipe.later().build().rule == "per-sample"


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, data):
    x, labels = data
    np.save(tmp_path / "x.npy", x[:45])
    np.save(tmp_path / "x2.npy", x[45:])
    np.save(tmp_path / "l.npy", labels)
    return tmp_path


FIT = ["fit-centers", "x.npy", "x2.npy", "--labels", "l.npy", "--num-classes", K, "--ignore-label", -1,
       "--init", "zeros", "--rule", "per-sample", "--alpha", 0.04, "-q"]
BATCH = ["--batch-size", 8]


def load(path):
    stats = ns.read_stats(str(path))
    return stats.arrays, stats.meta


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_cli_per_sample_equals_the_layer_and_is_recorded(run, files, data):
    x, labels = data
    ok(run(*FIT, *BATCH, "-o", "c.npz"))
    arrays, meta = load(files / "c.npz")
    close(arrays["centers"], layer_per_sample(x, labels, 8, 0.04, np.zeros((K, 6)), ignore=-1))
    assert meta["rule"] == "per-sample" and meta["alpha"] == 0.04
    shown = ok(run("inspect", "c.npz", "--json")).stdout
    assert json.loads(shown)["options"]["rule"] == "per-sample"


def test_cli_jobs_equal_the_chained_fit(run, files):
    ok(run(*FIT, *BATCH, "-o", "one.npz"))
    ok(run(*FIT, *BATCH, "-o", "two.npz", "--jobs", 2))
    one, _ = load(files / "one.npz")
    two, meta = load(files / "two.npz")
    assert meta["jobs"] == 2 and meta["rule"] == "per-sample"
    close(two["centers"], one["centers"])


def test_cli_batches_larger_than_a_read_block(run, files, data, monkeypatch):
    x, labels = data
    monkeypatch.setattr(normstats.stream, "BLOCK_BYTES", 5 * 6 * 4)  # 5-row blocks, 32-row batches
    seen = []
    original = ns.CentersEMA.update

    def spy(self, block, labels, **kwargs):
        seen.append(len(block))
        return original(self, block, labels, **kwargs)

    monkeypatch.setattr(ns.CentersEMA, "update", spy)
    ok(run(*FIT, "--batch-size", 32, "-o", "c.npz"))
    assert max(seen) < 32
    arrays, _ = load(files / "c.npz")
    close(arrays["centers"], layer_per_sample(x, labels, 32, 0.04, np.zeros((K, 6)), ignore=-1))


def test_cli_init_from_a_file_continues_with_its_rule(run, files, data):
    x, labels = data
    np.save(files / "a.npy", x[:40])
    np.save(files / "b.npy", x[40:])
    np.save(files / "la.npy", labels[:40])
    np.save(files / "lb.npy", labels[40:])
    common = ["--num-classes", K, "--ignore-label", -1, "-q"]
    ok(run("fit-centers", "a.npy", "--labels", "la.npy", *common, "--init", "zeros", "--rule", "per-sample",
           "--alpha", 0.04, "--batch-size", 8, "-o", "a.npz"))
    ok(run("fit-centers", "b.npy", "--labels", "lb.npy", *common, "--init", "a.npz", "-o", "ab.npz"))
    arrays, meta = load(files / "ab.npz")
    assert meta["rule"] == "per-sample" and meta["alpha"] == 0.04
    close(arrays["centers"], layer_per_sample(x, labels, 8, 0.04, np.zeros((K, 6)), ignore=-1))


def test_cli_resume_equals_one_run(run, files, monkeypatch):
    _small_blocks(monkeypatch, 16)
    ok(run(*FIT, *BATCH, "-o", "full.npz"))
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        interrupted = run(*FIT, *BATCH, "-o", "out.npz", "--checkpoint", "ck.npz", "--checkpoint-every", 0)
    assert interrupted.exit_code == 130, interrupted.output
    checkpoint = ns.read_stats(str(files / "ck.npz"))
    assert checkpoint.meta["rule"] == "per-sample" and 0 < checkpoint.meta["checkpoint"]["rows_done"] < 97
    ok(run(*FIT, *BATCH, "-o", "out.npz", "--resume", "ck.npz"))
    resumed, meta = load(files / "out.npz")
    full, _ = load(files / "full.npz")
    close(resumed["centers"], full["centers"])
    assert meta["rows_seen"] == 97


def test_cli_rule_needs_ema(run, files):
    result = run("fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", K, "--ignore-label", -1,
                 "--mode", "exact", "--rule", "per-sample", "-o", "c.npz")
    assert result.exit_code == 2 and "--rule applies to --mode ema only" in result.stderr
    assert not (files / "c.npz").exists()
    bad = run("fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", K, "--rule", "per-row", "-o", "c.npz")
    assert bad.exit_code == 2 and "per-row" in bad.stderr


def test_a_file_with_an_unknown_rule_is_refused(run, files):
    ok(run(*FIT, *BATCH, "-o", "c.json"))
    document = json.loads((files / "c.json").read_text())
    document["meta"]["rule"] = "per-row"
    (files / "c.json").write_text(json.dumps(document))
    result = run("inspect", "c.json")
    assert result.exit_code != 0 and "'rule'" in result.stderr and "per-row" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_dask_equals_the_chained_fit(files, data):
    distributed = pytest.importorskip("distributed")
    x, labels = data
    recipe = ns.Recipe("centers", "ema", {"num_classes": K, "rule": "per-sample", "alpha": 0.04,
                                          "init": "zeros", "batch_size": 8, "ignore_label": -1})
    specs = [str(files / "x.npy"), str(files / "x2.npy")]
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0") as client, \
            ns.open_stream(specs) as stream, ns.open_stream([str(files / "l.npy")]) as side:
        stats = ns.run_fit_dask(recipe, stream, client, side={"labels": side}, task_rows=24)
    assert stats.meta["tasks"] > 2 and stats.meta["rule"] == "per-sample"
    close(stats.arrays["centers"], layer_per_sample(x, labels, 8, 0.04, np.zeros((K, 6)), ignore=-1))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_per_sample_equals_the_layer_formula_in_torch(data):
    """Pytorch_Ext's Center update, as torch ops: index_add_ of (a - 1) (C[labels] - f), a = 0.9."""
    import torch

    x, labels = data
    keep = labels >= 0
    features, targets = torch.from_numpy(x[keep].astype(np.float64)), torch.from_numpy(labels[keep])
    centers = torch.zeros(K, 6, dtype=torch.float64)
    for start in range(0, len(targets), 8):
        f, t = features[start:start + 8], targets[start:start + 8]
        centers.index_add_(0, t, (0.9 - 1.0) * (centers.index_select(0, t) - f))
    stats = ns.CentersEMA(K, alpha=0.1, rule="per-sample", init="zeros", batch_size=8).update(x[keep], labels[keep])
    close(stats.result().arrays["centers"], centers.numpy())
