"""Exact, mergeable statistics (issue 3): exact state, merge, resume and checkpoints,
NaN policy, weights, per-group BatchNorm, ignore-label and near-constant channels.

Every number is checked against plain float64 numpy on the concatenated data
(``np.mean`` / ``np.var`` / ``np.average`` / ``np.nanmean`` / ``np.nanvar``),
never against the library's own arithmetic.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
import normstats.cli.commands
import normstats.pipeline

RTOL = 1e-12  # float64 input: exact up to float64 rounding
EPS = 1e-5


# --- helpers -----------------------------------------------------------------------------


def auto_axes(ndim: int) -> tuple[int, ...]:
    return (0,) + tuple(range(2, ndim))


def close(actual, expected, rtol=RTOL) -> None:
    """Relative comparison (no absolute slack); NaN only where NaN is expected."""
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=0, equal_nan=True)


def same_stats(actual: ns.Stats, expected: ns.Stats, rtol=RTOL) -> None:
    """The same arrays (names and values) in two stats."""
    assert sorted(actual.arrays) == sorted(expected.arrays)
    for name in expected.arrays:
        close(actual.arrays[name], expected.arrays[name], rtol)


def load(path) -> tuple[dict, dict]:
    """Arrays and metadata of a `.npz` stats file, read with plain numpy (never unpickling)."""
    with np.load(path, allow_pickle=False) as archive:
        return ({n: archive[n] for n in archive.files if n != "meta"},
                json.loads(str(archive["meta"])))


def save(folder: Path, name: str, array) -> Path:
    path = Path(folder) / name
    np.save(path, np.asarray(array))
    return path


def ok(result) -> None:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)


def failed(result, code: int) -> str:
    """Assert exit `code` with one ``Error:`` line and no traceback; return that line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def stream(*paths) -> ns.Stream:
    return ns.open_stream([str(p) for p in paths])


def fit(state, paths, *, block_rows=None, **side_paths) -> ns.Stats:
    """run_fit over the shard files `paths`, with per-row side files (labels, groups, weights)."""
    with contextlib.ExitStack() as stack:
        features = stack.enter_context(stream(*paths))
        side = {name: stack.enter_context(stream(*p if isinstance(p, (list, tuple)) else [p]))
                for name, p in side_paths.items() if p is not None}
        return ns.run_fit(state, features, side=side, block_rows=block_rows)


def bn_exact_ref(x, axes=None, ddof=1, eps=EPS):
    x = np.asarray(x, np.float64)
    axes = auto_axes(x.ndim) if axes is None else axes
    var = x.var(axis=axes, ddof=ddof)
    return {"mean": x.mean(axis=axes), "var": var, "inv_std": 1.0 / np.sqrt(var + eps),
            "count": np.full(var.shape, float(np.prod([x.shape[a] for a in axes])))}


def bn_weighted_ref(x, w, axes=None, ddof=1, eps=EPS):
    """Frequency weights: mean = np.average; var = sum w (x-m)^2 / (sum w - ddof)."""
    x = np.asarray(x, np.float64)
    axes = auto_axes(x.ndim) if axes is None else axes
    weights = np.broadcast_to(np.asarray(w, np.float64).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    mean = np.average(x, axis=axes, weights=weights)
    total = weights.sum(axis=axes)
    var = np.average((x - np.expand_dims(mean, axes)) ** 2, axis=axes, weights=weights) * total / (total - ddof)
    return {"mean": mean, "var": var, "inv_std": 1.0 / np.sqrt(var + eps), "count": total}


def centers_exact_ref(x, labels, k, weights=None):
    x = np.asarray(x, np.float64)
    centers = np.full((k,) + x.shape[1:], np.nan)
    var = np.full((k,) + x.shape[1:], np.nan)
    for j in range(k):
        rows = labels == j
        if rows.any():
            w = None if weights is None else weights[rows]
            centers[j] = np.average(x[rows], axis=0, weights=w)
            var[j] = np.average((x[rows] - centers[j]) ** 2, axis=0, weights=w)
    return {"centers": centers, "var": var, "counts": np.bincount(labels[labels >= 0], minlength=k)}


def ema_ref(x, batch_size, alpha, eps, ddof, mean=0.0, inv_std=1.0):
    """BatchNorm EMA over logical batches of 2-D `x` (nan-aware: NaN/Inf left out per statistic)."""
    x = np.where(np.isfinite(x), np.asarray(x, np.float64), np.nan)
    m = np.full(x.shape[1:], mean, np.float64)
    s = np.full(x.shape[1:], inv_std, np.float64)
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        n = np.isfinite(batch).sum(axis=0)
        valid = n > ddof
        with warnings.catch_warnings():  # all-NaN columns: their value is not used
            warnings.simplefilter("ignore", RuntimeWarning)
            bm = np.nanmean(batch, axis=0)
            bs = 1.0 / np.sqrt(np.nanvar(batch, axis=0, ddof=ddof) + eps)
        m = np.where(valid, (1 - alpha) * m + alpha * bm, m)
        s = np.where(valid, (1 - alpha) * s + alpha * bs, s)
    return m, s


def centers_ema_ref(x, labels, k, batch_size, alpha, init, ignore=None):
    """Center EMA over logical batches; rows labelled `ignore` are skipped but keep their batch slot."""
    x = np.asarray(x, np.float64)
    centers = np.array(init, np.float64).reshape((k,) + x.shape[1:])
    for start in range(0, len(x), batch_size):
        batch, batch_labels = x[start:start + batch_size], labels[start:start + batch_size]
        for j in np.unique(batch_labels):
            if j == ignore:
                continue
            centers[j] = alpha * batch[batch_labels == j].mean(axis=0) + (1 - alpha) * centers[j]
    return centers


# --- data ----------------------------------------------------------------------------------


def make_4d(rows=61, seed=3) -> np.ndarray:
    """(rows, 3, 4, 5) float64 with distinct channel offsets and scales (no mean near 0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3, 4, 5)) * np.array([1.0, 3.0, 0.25])[:, None, None]
    return x + np.array([-2.0, 7.0, 0.5])[:, None, None]


def make_2d(rows=97, cols=6, seed=5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, cols)) * np.linspace(0.5, 3.0, cols) + np.arange(1, cols + 1) * 1.5


@pytest.fixture
def x4d() -> np.ndarray:
    return make_4d()


@pytest.fixture
def x2d() -> np.ndarray:
    return make_2d()


@pytest.fixture
def labels97() -> np.ndarray:
    """97 labels in [0, 5); class 3 never occurs."""
    rng = np.random.default_rng(11)
    labels = rng.choice([0, 1, 2, 4], size=97)
    labels[:4] = [0, 1, 2, 4]
    return labels.astype(np.int64)


SPLITS = {2: [40], 3: [13, 50]}  # shard boundaries for 61- and 97-row data


def shards_of(x, count):
    return np.split(x, SPLITS[count])


# =========================================================================================
# 1. exact state: equal to numpy, independent of block size, batch size, split and order
# =========================================================================================


@pytest.mark.parametrize("block_rows", [1, 7, None], ids=["block1", "block7", "all"])
@pytest.mark.parametrize("axes, ddof", [(None, 1), (None, 0), ((0,), 1), ((0, 2, 3), 0), ((0, -1), 1)],
                         ids=["auto-ddof1", "auto-ddof0", "axes0", "axes023", "axes0,-1"])
def test_bn_exact_equals_numpy_for_any_block_size(tmp_path, x4d, axes, ddof, block_rows):
    paths = [save(tmp_path, f"s{i}.npy", part) for i, part in enumerate(shards_of(x4d, 3))]
    state = ns.BatchNormExact(axes="auto" if axes is None else axes, ddof=ddof, eps=EPS)
    stats = fit(state, paths, block_rows=block_rows or len(x4d))
    resolved = None if axes is None else tuple(sorted(a % 4 for a in axes))
    expected = bn_exact_ref(x4d, resolved, ddof)
    for name in ("mean", "var", "inv_std", "count"):
        close(stats.arrays[name], expected[name])
    assert stats.meta["mode"] == "exact" and stats.meta["rows_seen"] == len(x4d)
    assert stats.meta["near_constant_count"] == 0 and stats.meta["near_constant"] == []


@pytest.mark.parametrize("batch_size", [None, 1, 4, 64])
def test_bn_exact_does_not_depend_on_batch_size(tmp_path, x4d, batch_size):
    path = save(tmp_path, "x.npy", x4d)
    stats = fit(ns.BatchNormExact(batch_size=batch_size), [path], block_rows=9)
    expected = bn_exact_ref(x4d)
    for name in ("mean", "var", "inv_std"):
        close(stats.arrays[name], expected[name])


@pytest.mark.parametrize("block_rows", [1, 7, None], ids=["block1", "block7", "all"])
def test_centers_exact_equals_numpy_for_any_block_size(tmp_path, labels97, block_rows):
    x = make_2d(97, 6).reshape(97, 2, 3)  # rows of any shape are centered per row
    paths = [save(tmp_path, f"s{i}.npy", part) for i, part in enumerate(shards_of(x, 2))]
    label_paths = [save(tmp_path, f"l{i}.npy", part) for i, part in enumerate(shards_of(labels97, 2))]
    stats = fit(ns.CentersExact(5), paths, labels=label_paths, block_rows=block_rows or 97)
    expected = centers_exact_ref(x, labels97, 5)
    assert stats.arrays["centers"].shape == (5, 2, 3)
    close(stats.arrays["centers"], expected["centers"])
    close(stats.arrays["var"], expected["var"])
    np.testing.assert_array_equal(stats.arrays["counts"], expected["counts"])
    assert np.isnan(stats.arrays["centers"][3]).all() and stats.arrays["counts"][3] == 0  # never a silent 0
    assert stats.meta["classes_unseen"] == 1


# --- merge (library) ----------------------------------------------------------------------


def _bn_variant(variant):
    """(state factory, data, per-row side arrays) for a BatchNorm merge variant."""
    x = make_2d(97, 6)
    rng = np.random.default_rng(17)
    side = {}
    options = {}
    if variant == "4d":
        x = make_4d(97)
    elif variant == "weights":
        side["weights"] = rng.uniform(0, 3, size=97)
    elif variant == "omit":
        x = x.copy()
        x[[3, 50, 51, 90], [1, 2, 2, 5]] = [np.nan, np.inf, np.nan, -np.inf]
        options["nan_policy"] = "omit"
    elif variant == "groups":
        side["groups"] = rng.choice([0, 1, 3], size=97)
        options["num_groups"] = 4
    return (lambda: ns.BatchNormExact(**options)), x, side


def _centers_variant(variant, labels):
    x = make_2d(97, 6)
    rng = np.random.default_rng(19)
    side = {"labels": labels.copy()}
    options = {}
    if variant == "weights":
        side["weights"] = rng.uniform(0, 3, size=97)
    elif variant == "omit":
        x = x.copy()
        x[[3, 50, 90], [1, 2, 5]] = [np.nan, np.inf, np.nan]
        options["nan_policy"] = "omit"
    elif variant == "ignore":
        side["labels"][::7] = -1
        options["ignore_label"] = -1
    return (lambda: ns.CentersExact(5, **options)), x, side


def _update(state, x, side):
    if isinstance(state, ns.CentersExact):
        return state.update(x, side["labels"], side.get("weights")).result()
    return state.update(x, groups=side.get("groups"), weights=side.get("weights")).result()


@pytest.mark.filterwarnings("ignore:overflow encountered in square:RuntimeWarning")  # see test_inf_*
@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("variant", ["bn-2d", "bn-4d", "bn-weights", "bn-omit", "bn-groups",
                                     "centers", "centers-weights", "centers-omit", "centers-ignore"])
def test_merge_equals_single_fit_in_any_order(variant, shards, labels97):
    kind, _, detail = variant.partition("-")
    make, x, side = _bn_variant(detail) if kind == "bn" else _centers_variant(detail, labels97)
    single = _update(make(), x, side)
    parts = [
        _update(make(), x_part, {name: np.split(v, SPLITS[shards])[i] for name, v in side.items()})
        for i, x_part in enumerate(np.split(x, SPLITS[shards]))
    ]
    assert len(parts) == shards
    for order in itertools.permutations(range(shards)):
        merged = ns.merge_stats([parts[i] for i in order], names=[f"p{i}" for i in order])
        same_stats(merged, single)
        assert merged.meta["rows_seen"] == 97
        assert merged.meta["merged_from"] == [f"p{i}" for i in order]


# =========================================================================================
# precision and long streams
# =========================================================================================


@pytest.mark.parametrize("offset", [1e6, 1e4])
def test_float32_large_offset_variance_error_below_1e6_where_naive_float32_fails(offset):
    rng = np.random.default_rng(2024)
    x = (offset + 1e-2 * rng.standard_normal((200_000, 4))).astype(np.float32)
    x64 = x.astype(np.float64)  # the float32 values, exactly
    reference = x64.var(axis=0, ddof=1)
    assert (reference > 0).all()

    state = ns.BatchNormExact(ddof=1)
    for start in range(0, len(x), 4099):  # many blocks, so the Chan merges are exercised
        state.update(x[start:start + 4099])
    stats = state.result()
    error = np.abs(stats.arrays["var"] - reference) / reference
    assert error.max() <= 1e-6, error
    close(stats.arrays["mean"], x64.mean(axis=0), rtol=1e-12)
    assert stats.meta["near_constant_count"] == 0

    # Why the test exists: the textbook float32 sum / sum-of-squares formula loses every digit.
    n = np.float32(len(x))
    s1 = x.sum(axis=0, dtype=np.float32)
    s2 = (x * x).sum(axis=0, dtype=np.float32)
    naive = ((s2 - s1 * s1 / n) / (n - np.float32(1))).astype(np.float64)
    naive_error = np.abs(naive - reference) / reference
    assert naive_error.min() > 1e-6, naive_error


def test_long_constant_stream_has_exact_mean_zero_variance_and_is_near_constant():
    values = np.array([0.1, -3.7, 1e6 + 0.5], dtype=np.float32)
    state = ns.BatchNormExact(ddof=1, eps=EPS)
    rows = 0
    for size in itertools.cycle([997, 1, 2048, 13]):
        size = min(size, 200_000 - rows)
        if size == 0:
            break
        state.update(np.broadcast_to(values, (size, 3)))
        rows += size
    stats = state.result()
    np.testing.assert_array_equal(stats.arrays["mean"], values.astype(np.float64))  # exactly
    np.testing.assert_array_equal(stats.arrays["var"], 0.0)
    np.testing.assert_array_equal(stats.arrays["inv_std"], 1.0 / np.sqrt(EPS))
    np.testing.assert_array_equal(stats.arrays["count"], 200_000.0)
    assert stats.meta["rows_seen"] == 200_000
    assert stats.meta["near_constant_count"] == 3 and stats.meta["near_constant"] == [0, 1, 2]


@pytest.mark.parametrize("mode", ["library", "cli"])
def test_near_constant_channels_are_reported_with_finite_inv_std(run, tmp_path, mode):
    x = make_2d(50, 6)
    x[:, 1] = 2.5
    x[:, 4] = 0.0
    eps = 1e-3
    if mode == "library":
        stats = ns.BatchNormExact(eps=eps).update(x[:20]).update(x[20:]).result()
        arrays, meta = stats.arrays, stats.meta
    else:
        save(tmp_path, "x.npy", x)
        ok(run("fit-bn", "x.npy", "-o", "s.npz", "--mode", "exact", "--eps", eps))
        arrays, meta = load(tmp_path / "s.npz")
    assert meta["near_constant_count"] == 2 and meta["near_constant"] == [1, 4]
    assert np.isfinite(arrays["inv_std"]).all()
    assert arrays["var"][1] == 0.0 and arrays["var"][4] == 0.0
    assert arrays["inv_std"][1] == 1.0 / np.sqrt(eps) and arrays["inv_std"][4] == 1.0 / np.sqrt(eps)
    others = [0, 2, 3, 5]
    close(arrays["var"][others], x[:, others].var(axis=0, ddof=1))


# =========================================================================================
# 5. weights
# =========================================================================================


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("data", ["2d", "4d"])
def test_bn_weighted_equals_np_average(tmp_path, data, ddof):
    x = make_2d() if data == "2d" else make_4d()
    w = np.random.default_rng(1).uniform(0, 2.5, size=len(x))
    w[5] = 0.0
    path, wpath = save(tmp_path, "x.npy", x), save(tmp_path, "w.npy", w)
    stats = fit(ns.BatchNormExact(ddof=ddof), [path], weights=wpath, block_rows=8)
    expected = bn_weighted_ref(x, w, ddof=ddof)
    for name in ("mean", "var", "inv_std", "count"):
        close(stats.arrays[name], expected[name])
    assert stats.meta["weighted"] is True


@pytest.mark.parametrize("kind", ["bn", "centers"])
def test_integer_weights_equal_repeated_rows(kind, labels97):
    x = make_2d()
    w = np.random.default_rng(4).integers(0, 4, size=len(x))
    repeated = np.repeat(x, w, axis=0)
    if kind == "bn":
        weighted = ns.BatchNormExact().update(x, weights=w).result()
        plain = ns.BatchNormExact().update(repeated).result()
        names = ("mean", "var", "inv_std", "count")
    else:
        weighted = ns.CentersExact(5).update(x, labels97, w).result()
        plain = ns.CentersExact(5).update(repeated, np.repeat(labels97, w)).result()
        close(weighted.arrays["weight"][:, 0], np.bincount(np.repeat(labels97, w), minlength=5))
        names = ("centers", "var")
    for name in names:
        close(weighted.arrays[name], plain.arrays[name])


def test_centers_weighted_equal_np_average(tmp_path, labels97):
    x = make_2d()
    w = np.random.default_rng(6).uniform(0.1, 2.0, size=97)
    stats = fit(ns.CentersExact(5), [save(tmp_path, "x.npy", x)], labels=save(tmp_path, "l.npy", labels97),
                weights=save(tmp_path, "w.npy", w), block_rows=10)
    expected = centers_exact_ref(x, labels97, 5, weights=w)
    close(stats.arrays["centers"], expected["centers"])
    close(stats.arrays["var"], expected["var"])
    close(stats.arrays["weight"][:, 0], np.bincount(labels97, weights=w, minlength=5))


@pytest.mark.parametrize("command", ["fit-bn", "fit-centers"])
def test_cli_weights(run, tmp_path, labels97, command):
    x = make_2d()
    w = np.random.default_rng(8).uniform(0, 2, size=97)
    save(tmp_path, "x.npy", x)
    save(tmp_path, "l.npy", labels97)
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.create_dataset("w", data=w)
    args = ["fit-bn", "x.npy"] if command == "fit-bn" else \
        ["fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", 5]
    ok(run(*args, "-o", "s.npz", "--mode", "exact", "--weights", "w.h5:w"))
    arrays, meta = load(tmp_path / "s.npz")
    if command == "fit-bn":
        expected = bn_weighted_ref(x, w)
        close(arrays["mean"], expected["mean"])
        close(arrays["var"], expected["var"])
    else:
        expected = centers_exact_ref(x, labels97, 5, weights=w)
        close(arrays["centers"], expected["centers"])
        close(arrays["var"], expected["var"])
    assert meta["weighted"] is True

    # ema has no weights: a usage error, and no output
    assert "needs --mode exact" in failed(run(*args, "-o", "e.npz", "--weights", "w.h5:w"), 2)
    assert not (tmp_path / "e.npz").exists()


@pytest.mark.parametrize("bad", [-0.5, np.nan, np.inf])
@pytest.mark.parametrize("command", ["fit-bn", "fit-centers"])
def test_cli_bad_weight_names_the_weights_file_and_row(run, tmp_path, labels97, command, bad):
    save(tmp_path, "x.npy", make_2d())
    save(tmp_path, "l.npy", labels97)
    w = np.ones(97)
    w[61] = bad
    save(tmp_path, "w.npy", w)
    args = ["fit-bn", "x.npy"] if command == "fit-bn" else \
        ["fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", 5]
    line = failed(run(*args, "-o", "s.npz", "--mode", "exact", "--weights", "w.npy", "--batch-size", 8), 1)
    assert line.startswith("Error: w.npy row 61: weight "), line
    assert not (tmp_path / "s.npz").exists()


# =========================================================================================
# 6. per-group BatchNorm
# =========================================================================================


def _groups(rows, seed=21):
    """Groups in {0, 1, 2, 4} of G=5: group 3 is never seen."""
    groups = np.random.default_rng(seed).choice([0, 1, 2, 4], size=rows)
    groups[:4] = [0, 1, 2, 4]
    return groups.astype(np.int64)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("data", ["2d", "4d"])
def test_bn_groups_equal_numpy_per_group(tmp_path, data, ddof):
    x = make_2d() if data == "2d" else make_4d()
    groups = _groups(len(x))
    paths = [save(tmp_path, f"s{i}.npy", part) for i, part in enumerate(shards_of(x, 2))]
    gpaths = [save(tmp_path, f"g{i}.npy", part) for i, part in enumerate(shards_of(groups, 2))]
    stats = fit(ns.BatchNormExact(num_groups=5, ddof=ddof), paths, groups=gpaths, block_rows=6)
    kept = x.shape[1:2]
    for name in ("mean", "var", "inv_std", "count"):
        assert stats.arrays[name].shape == (5,) + kept
    np.testing.assert_array_equal(stats.arrays["group_rows"], np.bincount(groups, minlength=5))
    assert stats.arrays["group_rows"][3] == 0 and stats.meta["groups_unseen"] == 1
    assert stats.meta["groups"] == 5
    for j in (0, 1, 2, 4):
        expected = bn_exact_ref(x[groups == j], ddof=ddof)
        for name in ("mean", "var", "inv_std", "count"):
            close(stats.arrays[name][j], expected[name])
    assert stats.arrays["count"][3].sum() == 0


def _per_group_apply_ref(x, groups, mean, inv_std):
    shape = (len(x), -1) + (1,) * (x.ndim - 2)
    return (x - mean[groups].reshape(shape)) * inv_std[groups].reshape(shape)


@pytest.mark.parametrize("data", ["2d", "4d"])
def test_normalizer_with_groups_uses_each_rows_group(data):
    x = make_2d() if data == "2d" else make_4d()
    groups = _groups(len(x))
    stats = ns.BatchNormExact(num_groups=5).update(x, groups=groups).result()
    y = ns.Normalizer(stats)(x, groups=groups)
    close(y, _per_group_apply_ref(x, groups, stats.arrays["mean"], stats.arrays["inv_std"]))


@pytest.mark.parametrize("data", ["2d", "4d"])
def test_cli_fit_bn_groups_and_apply_groups(run, tmp_path, data):
    x = make_2d() if data == "2d" else make_4d()
    groups = _groups(len(x))
    save(tmp_path, "x.npy", x)
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_dataset("speaker", data=groups)
    ok(run("fit-bn", "x.npy", "-o", "s.npz", "--mode", "exact", "--groups", "g.h5:speaker",
           "--num-groups", 5))
    arrays, meta = load(tmp_path / "s.npz")
    assert arrays["mean"].shape == (5, x.shape[1])
    np.testing.assert_array_equal(arrays["group_rows"], np.bincount(groups, minlength=5))
    for j in (0, 2):
        close(arrays["mean"][j], bn_exact_ref(x[groups == j])["mean"])

    ok(run("apply", "s.npz", "x.npy", "-o", "y.npy", "--groups", "g.h5:speaker"))
    y = np.load(tmp_path / "y.npy")
    assert y.shape == x.shape
    close(y, _per_group_apply_ref(x, groups, arrays["mean"], arrays["inv_std"]))


def test_cli_apply_refuses_a_row_of_an_unseen_group(run, tmp_path):
    x = make_2d()
    groups = _groups(len(x))
    save(tmp_path, "x.npy", x)
    save(tmp_path, "g.npy", groups)
    ok(run("fit-bn", "x.npy", "-o", "s.npz", "--mode", "exact", "--groups", "g.npy", "--num-groups", 5))
    other = groups.copy()
    other[10] = 3  # group 3 had no rows at fit time
    save(tmp_path, "g3.npy", other)
    line = failed(run("apply", "s.npz", "x.npy", "-o", "y.npy", "--groups", "g3.npy"), 1)
    assert "group 3" in line
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize("case, code, text", [
    ("ema", 2, "--groups needs --mode exact"),
    ("no-num-groups", 2, "--groups needs --num-groups"),
    ("out-of-range", 1, "g.npy row 30: group 5 is outside [0, 5)"),
])
def test_cli_groups_errors(run, tmp_path, case, code, text):
    groups = _groups(97)
    if case == "out-of-range":
        groups[30] = 5
    save(tmp_path, "x.npy", make_2d())
    save(tmp_path, "g.npy", groups)
    args = {"ema": ["--num-groups", 5], "no-num-groups": ["--mode", "exact"],
            "out-of-range": ["--mode", "exact", "--num-groups", 5]}[case]
    line = failed(run("fit-bn", "x.npy", "-o", "s.npz", "--groups", "g.npy", *args), code)
    assert text in line, line


# =========================================================================================
# 4. NaN policy
# =========================================================================================


def _nan_shards(tmp_path, value=np.nan):
    """a.npy (20 rows) and b.npy (15 rows), with `value` at b.npy row 6, column 2."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 4)) + 2
    b = rng.normal(size=(15, 4)) - 1
    b[6, 2] = value
    save(tmp_path, "a.npy", a)
    save(tmp_path, "b.npy", b)
    save(tmp_path, "lab.npy", rng.integers(0, 3, size=35))
    return np.concatenate([a, b])


FITS = {
    "bn-ema": ["fit-bn", "a.npy", "b.npy", "--batch-size", 4],
    "bn-exact": ["fit-bn", "a.npy", "b.npy", "--mode", "exact", "--batch-size", 4],
    "centers-ema": ["fit-centers", "a.npy", "b.npy", "--labels", "lab.npy", "--num-classes", 3,
                    "--batch-size", 4],
    "centers-exact": ["fit-centers", "a.npy", "b.npy", "--labels", "lab.npy", "--num-classes", 3,
                      "--mode", "exact", "--batch-size", 4],
}


@pytest.mark.filterwarnings("ignore:overflow encountered in square:RuntimeWarning")  # see test_inf_*
@pytest.mark.parametrize("block_rows", [4, None], ids=["blocks-of-4", "one-block"])
@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
@pytest.mark.parametrize("fit_name", sorted(FITS))
def test_nan_error_names_shard_local_row_and_column(run, tmp_path, monkeypatch, fit_name, value, shown,
                                                    block_rows):
    if block_rows:
        monkeypatch.setattr(normstats.pipeline, "block_rows_for", lambda row_bytes, batch_size, **_: block_rows)
    _nan_shards(tmp_path, value)
    line = failed(run(*FITS[fit_name], "-o", "s.npz"), 1)
    assert line.startswith(f"Error: b.npy row 6: column 2 holds {shown}; "), line
    assert "--nan-policy omit" in line
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("block_rows", [1, 7, None], ids=["block1", "block7", "all"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_bn_exact_omit_equals_nan_aware_numpy(tmp_path, ddof, block_rows):
    x = make_4d()
    x[3, 1, 2, 2] = np.nan
    x[10, 0, :, 1] = np.inf
    x[11:14, 2] = -np.inf  # whole channel-rows gone
    paths = [save(tmp_path, f"s{i}.npy", part) for i, part in enumerate(shards_of(x, 3))]
    stats = fit(ns.BatchNormExact(ddof=ddof, nan_policy="omit"), paths, block_rows=block_rows or 61)
    clean = np.where(np.isfinite(x), x, np.nan).transpose(1, 0, 2, 3).reshape(3, -1)
    close(stats.arrays["mean"], np.nanmean(clean, axis=1))
    close(stats.arrays["var"], np.nanvar(clean, axis=1, ddof=ddof))
    np.testing.assert_array_equal(stats.arrays["count"], np.isfinite(clean).sum(axis=1))
    assert stats.meta["values_omitted"] == int((~np.isfinite(x)).sum())
    assert stats.meta["nan_policy"] == "omit"


def test_bn_ema_omit_stores_counts_and_follows_nan_aware_batches():
    x = make_2d(40, 4)
    x[2, 1] = np.nan
    x[17, 3] = np.inf
    x[20:30, 0] = np.nan  # batch 2 has only 0 finite values in column 0 -> not updated there
    stats = ns.BatchNormEMA(batch_size=10, alpha=0.3, nan_policy="omit").update(x).result()
    mean, inv_std = ema_ref(x, 10, 0.3, EPS, 1)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    np.testing.assert_array_equal(stats.arrays["count"], np.isfinite(x).sum(axis=0))
    assert stats.meta["values_omitted"] == 12

    plain = ns.BatchNormEMA(batch_size=10).update(make_2d(40, 4)).result()
    assert "count" not in plain.arrays  # ema stores counts only under omit


@pytest.mark.filterwarnings("ignore:overflow encountered in square:RuntimeWarning")  # see test_inf_*
def test_centers_exact_omit_equals_nan_aware_numpy(labels97):
    x = make_2d()
    x[[3, 50, 51, 90], [1, 2, 2, 5]] = [np.nan, np.inf, np.nan, -np.inf]
    stats = ns.CentersExact(5, nan_policy="omit").update(x[:30], labels97[:30]).update(
        x[30:], labels97[30:]).result()
    clean = np.where(np.isfinite(x), x, np.nan)
    for j in (0, 1, 2, 4):
        rows = clean[labels97 == j]
        close(stats.arrays["centers"][j], np.nanmean(rows, axis=0))
        close(stats.arrays["var"][j], np.nanvar(rows, axis=0))
        np.testing.assert_array_equal(stats.arrays["weight"][j], np.isfinite(rows).sum(axis=0))
    assert np.isnan(stats.arrays["centers"][3]).all()


def test_centers_exact_omit_reports_values_omitted(labels97):
    """Issue 3: under omit 'the per-statistic counts are stored and reported' (meta values_omitted)."""
    x = make_2d()
    x[[3, 50, 90], [1, 2, 5]] = np.nan
    stats = ns.CentersExact(5, nan_policy="omit").update(x, labels97).result()
    assert stats.meta.get("values_omitted") == 3, stats.meta


@pytest.mark.parametrize("policy", ["error", "omit"])
@pytest.mark.parametrize("estimator", ["centers-exact", "bn-exact-groups"])
def test_inf_in_per_class_or_group_statistics_raises_no_runtime_warning(estimator, policy):
    """An Inf feature must give a clean result (omit) or NonFiniteError (error), nothing on
    stderr besides: the CLI otherwise prints numpy's 'RuntimeWarning: overflow encountered in
    square' with a source line before its summary or its 'Error:' line."""
    x = make_2d(40, 3)
    x[5, 1] = np.inf
    labels = np.zeros(40, np.int64)
    state = (ns.CentersExact(2, nan_policy=policy) if estimator == "centers-exact"
             else ns.BatchNormExact(num_groups=2, nan_policy=policy))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ns.NonFiniteError) if policy == "error" else contextlib.nullcontext():
            if estimator == "centers-exact":
                state.update(x, labels)
            else:
                state.update(x, groups=labels)
    assert [str(w.message) for w in caught] == []


def test_cli_omit_bn_exact(run, tmp_path):
    x = _nan_shards(tmp_path)
    ok(run(*FITS["bn-exact"], "-o", "s.npz", "--nan-policy", "omit"))
    arrays, meta = load(tmp_path / "s.npz")
    clean = np.where(np.isfinite(x), x, np.nan)
    close(arrays["mean"], np.nanmean(clean, axis=0))
    close(arrays["var"], np.nanvar(clean, axis=0, ddof=1))
    np.testing.assert_array_equal(arrays["count"], [35, 35, 34, 35])
    assert meta["values_omitted"] == 1 and meta["nan_policy"] == "omit"


# =========================================================================================
# 7. ignore-label
# =========================================================================================


@pytest.mark.parametrize("mode", ["ema", "exact"])
def test_cli_ignore_label(run, tmp_path, labels97, mode):
    x = make_2d()
    labels = labels97.copy()
    labels[5::6] = -1
    labels[12] = -1
    x[12, 3] = np.nan  # only in an ignored row: skipped, so no NaN error
    save(tmp_path, "x.npy", x)
    save(tmp_path, "l.npy", labels)
    ignored = int((labels == -1).sum())
    options = ["--batch-size", 8, "--init", "zeros", "--alpha", 0.5] if mode == "ema" else []
    ok(run("fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", 5, "--ignore-label", -1,
           "--mode", mode, *options, "-o", "c.npz"))
    arrays, meta = load(tmp_path / "c.npz")
    keep = labels != -1
    if mode == "exact":
        expected = centers_exact_ref(x[keep], labels[keep], 5)
        close(arrays["centers"], expected["centers"])
        close(arrays["var"], expected["var"])
    else:
        expected = centers_ema_ref(x, labels, 5, 8, 0.5, np.zeros((5, 6)), ignore=-1)
        close(arrays["centers"], expected)
    np.testing.assert_array_equal(arrays["counts"], np.bincount(labels[keep], minlength=5))
    assert meta["rows_ignored"] == ignored and meta["rows_seen"] == 97 and meta["ignore_label"] == -1


# =========================================================================================
# 2. merge (CLI)
# =========================================================================================


@pytest.fixture
def bn_parts(run, tmp_path):
    """x.npy fitted whole and in 3 shards (exact), plus an ema fit of a shard."""
    x = make_4d(61)
    for i, part in enumerate(shards_of(x, 3)):
        save(tmp_path, f"x{i}.npy", part)
        ok(run("fit-bn", f"x{i}.npy", "-o", f"p{i}.npz", "--mode", "exact", "--ddof", 0, "-q"))
    save(tmp_path, "x.npy", x)
    ok(run("fit-bn", "x.npy", "-o", "single.npz", "--mode", "exact", "--ddof", 0, "-q"))
    ok(run("fit-bn", "x0.npy", "-o", "ema.npz", "-q"))
    return x


@pytest.mark.parametrize("order", [(0, 1), (1, 0), (0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_cli_merge_equals_single_fit(run, tmp_path, bn_parts, order, suffix):
    ins = [f"p{i}.npz" for i in order]
    if len(order) == 2:  # two shards: compare with one fit over just those rows
        save(tmp_path, "x01.npy", bn_parts[:SPLITS[3][1]])
        ok(run("fit-bn", "x01.npy", "-o", "single.npz", "--mode", "exact", "--ddof", 0, "--force", "-q"))
    result = run("merge", *ins, "-o", f"merged{suffix}")
    ok(result)
    assert result.stdout.startswith("merge exact:") and f"merged from {len(order)} files" in result.stdout
    merged, single = ns.read_stats(str(tmp_path / f"merged{suffix}")), ns.read_stats(str(tmp_path / "single.npz"))
    same_stats(merged, single)
    assert merged.meta["merged_from"] == ins
    assert merged.meta["rows_seen"] == single.meta["rows_seen"]
    assert merged.meta["sources"] == [f"x{i}.npy" for i in order]
    if len(order) == 3:
        expected = bn_exact_ref(bn_parts, ddof=0)
        for name in ("mean", "var", "inv_std"):
            close(merged.arrays[name], expected[name])


def test_cli_merge_centers_equals_single_fit(run, tmp_path, labels97):
    x = make_2d()
    for i, (part, lab) in enumerate(zip(shards_of(x, 3), shards_of(labels97, 3))):
        save(tmp_path, f"x{i}.npy", part)
        save(tmp_path, f"l{i}.npy", lab)
        ok(run("fit-centers", f"x{i}.npy", "--labels", f"l{i}.npy", "--num-classes", 5, "--mode", "exact",
               "-o", f"c{i}.npz", "-q"))
    ok(run("merge", "c2.npz", "c0.npz", "c1.npz", "-o", "m.npz"))
    arrays, meta = load(tmp_path / "m.npz")
    expected = centers_exact_ref(x, labels97, 5)
    close(arrays["centers"], expected["centers"])
    close(arrays["var"], expected["var"])
    np.testing.assert_array_equal(arrays["counts"], expected["counts"])
    assert meta["merged_from"] == ["c2.npz", "c0.npz", "c1.npz"] and meta["rows_seen"] == 97


@pytest.mark.parametrize("position", ["first", "last"])
def test_cli_merge_refuses_ema(run, tmp_path, bn_parts, position):
    ins = ["ema.npz", "p1.npz"] if position == "first" else ["p1.npz", "p2.npz", "ema.npz"]
    line = failed(run("merge", *ins, "-o", "m.npz"), 2)
    assert "ema.npz" in line and "cannot be merged" in line
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("case", ["axes", "row-shape", "ddof", "classes", "feature-shape", "kind", "groups"])
def test_cli_merge_refuses_mismatches(run, tmp_path, bn_parts, labels97, case):
    if case == "axes":
        ok(run("fit-bn", "x1.npy", "-o", "other.npz", "--mode", "exact", "--ddof", 0, "--axes", "0", "-q"))
    elif case == "row-shape":
        save(tmp_path, "y.npy", make_4d(20)[:, :, :3])
        ok(run("fit-bn", "y.npy", "-o", "other.npz", "--mode", "exact", "--ddof", 0, "-q"))
    elif case == "ddof":
        ok(run("fit-bn", "x1.npy", "-o", "other.npz", "--mode", "exact", "--ddof", 1, "-q"))
    elif case == "groups":
        save(tmp_path, "g.npy", np.zeros(len(np.load(tmp_path / "x1.npy")), np.int64))
        ok(run("fit-bn", "x1.npy", "-o", "other.npz", "--mode", "exact", "--ddof", 0, "--groups", "g.npy",
               "--num-groups", 2, "-q"))
    else:
        rows = {"classes": (5, 6), "feature-shape": (4, 7), "kind": (4, 6)}[case]
        x = make_2d(97, rows[1])
        save(tmp_path, "f.npy", x)
        save(tmp_path, "l.npy", labels97 % rows[0])
        save(tmp_path, "l4.npy", labels97 % 4)
        save(tmp_path, "f2.npy", make_2d(97, 6, seed=9))
        ok(run("fit-centers", "f2.npy", "--labels", "l4.npy", "--num-classes", 4, "--mode", "exact",
               "-o", "first.npz", "-q"))
        ok(run("fit-centers", "f.npy", "--labels", "l.npy", "--num-classes", rows[0], "--mode", "exact",
               "-o", "other.npz", "-q"))
        if case == "kind":
            line = failed(run("merge", "first.npz", "p0.npz", "-o", "m.npz"), 1)
            assert "p0.npz" in line
            return
        line = failed(run("merge", "first.npz", "other.npz", "-o", "m.npz"), 1)
        assert "other.npz" in line
        assert not (tmp_path / "m.npz").exists()
        return
    line = failed(run("merge", "p0.npz", "other.npz", "-o", "m.npz"), 1)
    assert "other.npz" in line and "p0.npz" in line
    assert not (tmp_path / "m.npz").exists()


# =========================================================================================
# 3. resume: --init, checkpoints, --resume
# =========================================================================================


@pytest.mark.parametrize("variant", ["bn", "bn-groups", "bn-weights", "centers", "centers-omit"])
def test_cli_init_exact_adds(run, tmp_path, labels97, variant):
    x = make_2d()
    if variant == "centers-omit":
        x[[5, 70], [2, 3]] = np.nan
    groups = _groups(97)
    w = np.random.default_rng(3).uniform(0, 2, size=97)
    for i, (part, lab, g, wp) in enumerate(zip(*(shards_of(v, 2) for v in (x, labels97, groups, w)))):
        save(tmp_path, f"x{i}.npy", part)
        save(tmp_path, f"l{i}.npy", lab)
        save(tmp_path, f"g{i}.npy", g)
        save(tmp_path, f"w{i}.npy", wp)
    for name, v in (("x", x), ("l", labels97), ("g", groups), ("w", w)):
        save(tmp_path, f"{name}.npy", v)

    def args(i):
        if variant.startswith("centers"):
            extra = ["--nan-policy", "omit"] if variant == "centers-omit" else []
            return ["fit-centers", f"x{i}.npy", "--labels", f"l{i}.npy", "--num-classes", 5, "--mode", "exact",
                    *extra]
        extra = {"bn": [], "bn-groups": ["--groups", f"g{i}.npy", "--num-groups", 5],
                 "bn-weights": ["--weights", f"w{i}.npy"]}[variant]
        return ["fit-bn", f"x{i}.npy", "--mode", "exact", *extra]

    ok(run(*args(0), "-o", "first.npz", "-q"))
    ok(run(*args(1), "--init", "first.npz", "-o", "continued.npz", "-q"))
    ok(run(*[a if not isinstance(a, str) else a.replace("0.npy", ".npy") for a in args(0)],
           "-o", "single.npz", "-q"))
    same_stats(ns.read_stats(str(tmp_path / "continued.npz")), ns.read_stats(str(tmp_path / "single.npz")))
    assert load(tmp_path / "continued.npz")[1]["rows_seen"] == 97


def test_cli_init_ema_takes_options_from_the_file_unless_given(run, tmp_path):
    x = make_2d(96, 6)
    save(tmp_path, "a.npy", x[:48])
    save(tmp_path, "b.npy", x[48:])
    ok(run("fit-bn", "a.npy", "-o", "a.npz", "--alpha", 0.2, "--eps", 1e-3, "--ddof", 0,
           "--batch-size", 8, "-q"))
    ok(run("fit-bn", "b.npy", "--init", "a.npz", "-o", "ab.npz", "-q"))
    arrays, meta = load(tmp_path / "ab.npz")
    mean, inv_std = ema_ref(x, 8, 0.2, 1e-3, 0)
    close(arrays["mean"], mean)
    close(arrays["inv_std"], inv_std)
    assert (meta["alpha"], meta["eps"], meta["ddof"], meta["batch_size"]) == (0.2, 1e-3, 0, 8)
    assert meta["rows_seen"] == 96

    # a given option wins over the file's: the first half's state, then alpha 0.5 on the second
    ok(run("fit-bn", "b.npy", "--init", "a.npz", "-o", "ab2.npz", "--alpha", 0.5, "-q"))
    arrays2, meta2 = load(tmp_path / "ab2.npz")
    first_mean, first_inv_std = ema_ref(x[:48], 8, 0.2, 1e-3, 0)
    mean2, inv_std2 = ema_ref(x[48:], 8, 0.5, 1e-3, 0, mean=first_mean, inv_std=first_inv_std)
    close(arrays2["mean"], mean2)
    close(arrays2["inv_std"], inv_std2)
    assert meta2["alpha"] == 0.5


def test_cli_init_centers_ema_continues_from_the_files_centers(run, tmp_path, labels97):
    x = make_2d(96, 6)
    labels = labels97[:96]
    save(tmp_path, "a.npy", x[:48])
    save(tmp_path, "b.npy", x[48:])
    save(tmp_path, "la.npy", labels[:48])
    save(tmp_path, "lb.npy", labels[48:])
    ok(run("fit-centers", "a.npy", "--labels", "la.npy", "--num-classes", 5, "--alpha", 0.3,
           "--batch-size", 8, "--init", "zeros", "-o", "a.npz", "-q"))
    ok(run("fit-centers", "b.npy", "--labels", "lb.npy", "--num-classes", 5, "--init", "a.npz",
           "-o", "ab.npz", "-q"))
    arrays, meta = load(tmp_path / "ab.npz")
    close(arrays["centers"], centers_ema_ref(x, labels, 5, 8, 0.3, np.zeros((5, 6))))
    np.testing.assert_array_equal(arrays["counts"], np.bincount(labels, minlength=5))
    assert meta["alpha"] == 0.3 and meta["rows_seen"] == 96


# --- checkpoints in process (interrupted through the progress callback) ------------------


def _interrupt_after(monkeypatch, blocks):
    calls = {"n": 0}

    @contextlib.contextmanager
    def progress(total_rows, *, quiet, label, initial=0):
        def advance(rows):
            calls["n"] += 1
            if calls["n"] >= blocks:
                raise KeyboardInterrupt
        yield advance
    monkeypatch.setattr(normstats.cli.commands, "progress_bar", progress)


def _small_blocks(monkeypatch, rows=10):
    """Read blocks of `rows` rows (whole batches: --batch-size must divide it)."""
    monkeypatch.setattr(normstats.pipeline, "block_rows_for", lambda row_bytes, batch_size, **_: rows)


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors", ".json"])
@pytest.mark.parametrize("case", ["bn-ema", "bn-exact", "centers-ema", "centers-exact", "bn-exact-groups"])
def test_checkpoint_resume_in_process_equals_uninterrupted(run, tmp_path, monkeypatch, labels97, case, suffix):
    x = make_2d()
    save(tmp_path, "x.npy", x[:40])
    save(tmp_path, "y.npy", x[40:])
    save(tmp_path, "l.npy", labels97)
    save(tmp_path, "g.npy", _groups(97))
    args = {
        "bn-ema": ["fit-bn", "x.npy", "y.npy", "--batch-size", 5, "--alpha", 0.2],
        "bn-exact": ["fit-bn", "x.npy", "y.npy", "--mode", "exact", "--ddof", 0, "--batch-size", 5],
        "bn-exact-groups": ["fit-bn", "x.npy", "y.npy", "--mode", "exact", "--groups", "g.npy",
                            "--num-groups", 5, "--batch-size", 5],
        "centers-ema": ["fit-centers", "x.npy", "y.npy", "--labels", "l.npy", "--num-classes", 5,
                        "--batch-size", 5, "--alpha", 0.4],
        "centers-exact": ["fit-centers", "x.npy", "y.npy", "--labels", "l.npy", "--num-classes", 5,
                          "--mode", "exact", "--batch-size", 5],
    }[case]
    _small_blocks(monkeypatch)
    ok(run(*args, "-o", f"full{suffix}", "--checkpoint", f"ck0{suffix}", "--checkpoint-every", 0))
    assert not (tmp_path / f"ck0{suffix}").exists()  # removed on success

    with monkeypatch.context() as m:
        _interrupt_after(m, 6)
        interrupted = run(*args, "-o", f"out{suffix}", "--checkpoint", f"ck{suffix}", "--checkpoint-every", 0)
    assert interrupted.exit_code == 130, (interrupted.output, interrupted.exception)
    assert not (tmp_path / f"out{suffix}").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    checkpoint = ns.read_stats(str(tmp_path / f"ck{suffix}"))
    done = checkpoint.meta["checkpoint"]["rows_done"]
    assert 0 < done < 97

    ok(run(*args, "-o", f"out{suffix}", "--resume", f"ck{suffix}"))
    resumed, full = ns.read_stats(str(tmp_path / f"out{suffix}")), ns.read_stats(str(tmp_path / f"full{suffix}"))
    same_stats(resumed, full)
    for key in ("rows_seen", "batches_seen", "batches_skipped"):
        assert resumed.meta.get(key) == full.meta.get(key), key
    assert "checkpoint" not in resumed.meta
    assert resumed.meta["bytes_read"] == (97 - done) * 6 * 8  # really continued, not restarted


def test_resume_of_an_exact_checkpoint_without_repeating_mode_is_not_a_silent_ema(run, tmp_path, monkeypatch):
    """--resume 'continues from it and ends with the same result as an uninterrupted run';
    the checkpoint records mode exact, so continuing it as ema (the default) must not pass silently."""
    x = make_2d()
    save(tmp_path, "x.npy", x)
    _small_blocks(monkeypatch)
    with monkeypatch.context() as m:
        _interrupt_after(m, 4)
        assert run("fit-bn", "x.npy", "--mode", "exact", "-o", "out.npz", "--checkpoint", "ck.npz",
                   "--checkpoint-every", 0, "--batch-size", 5).exit_code == 130
    result = run("fit-bn", "x.npy", "-o", "out.npz", "--resume", "ck.npz")
    if result.exit_code == 0:
        arrays, meta = load(tmp_path / "out.npz")
        assert meta["mode"] == "exact", meta["mode"]
        close(arrays["mean"], x.mean(axis=0))
    else:
        failed(result, 2)


@pytest.mark.parametrize("case", ["other-input", "other-rows", "not-a-checkpoint", "with-init"])
def test_cli_resume_with_other_inputs_is_refused(run, tmp_path, monkeypatch, case):
    x = make_2d()
    save(tmp_path, "x.npy", x)
    save(tmp_path, "z.npy", x)
    save(tmp_path, "short.npy", x[:50])
    _small_blocks(monkeypatch)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        assert run("fit-bn", "x.npy", "--mode", "exact", "-o", "out.npz", "--checkpoint", "ck.npz",
                   "--checkpoint-every", 0, "--batch-size", 5).exit_code == 130
    ok(run("fit-bn", "x.npy", "--mode", "exact", "-o", "plain.npz"))
    args = {
        "other-input": ["z.npy", "--resume", "ck.npz"],
        "other-rows": ["x.npy", "short.npy", "--resume", "ck.npz"],
        "not-a-checkpoint": ["x.npy", "--resume", "plain.npz"],
        "with-init": ["x.npy", "--resume", "ck.npz", "--init", "plain.npz"],
    }[case]
    failed(run("fit-bn", *args, "--mode", "exact", "-o", "out.npz"), 2)
    assert not (tmp_path / "out.npz").exists()
    assert (tmp_path / "ck.npz").exists()


# --- a real kill: the installed script under SIGKILL / SIGINT ------------------------------


BIG_ROWS, BIG_COLS = 3_000_000, 32


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    """3e6 x 32 float32 (384 MB), written once per module."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(99)
    base = (rng.standard_normal((250_000, BIG_COLS), dtype=np.float32) * np.float32(2.0)
            + np.arange(BIG_COLS, dtype=np.float32))
    path = folder / "big.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(BIG_ROWS, BIG_COLS))
    for i in range(0, BIG_ROWS, len(base)):
        out[i:i + len(base)] = base + np.float32(i / BIG_ROWS)  # each tile shifted a little
    out.flush()
    del out
    return path


def _script() -> str:
    script = Path(sys.executable).with_name("normstats")
    assert script.exists(), "the normstats console script is not installed beside the interpreter"
    return str(script)


MODES = {"ema": ["--batch-size", "16", "--alpha", "0.001"], "exact": ["--mode", "exact"]}


@pytest.fixture(scope="module")
def uninterrupted(big_file, tmp_path_factory):
    """mode -> the stats of one uninterrupted in-process CLI run over `big_file` (made once)."""
    from click.testing import CliRunner

    from normstats.cli import cli

    folder, results = tmp_path_factory.mktemp("full"), {}

    def get(mode):
        if mode not in results:
            out = folder / f"{mode}.npz"
            result = CliRunner().invoke(cli, ["fit-bn", str(big_file), *MODES[mode], "-q", "-o", str(out)])
            assert result.exit_code == 0, (result.output, result.exception)
            results[mode] = ns.read_stats(str(out))
        return results[mode]
    return get


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("mode", ["ema", "exact"])
def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path, big_file, uninterrupted, mode, signum):
    work = tmp_path / "work"
    work.mkdir()
    args = [str(big_file), *MODES[mode], "-q"]
    process = subprocess.Popen([_script(), "fit-bn", *args, "-o", "out.npz", "--checkpoint", "ck.npz",
                                "--checkpoint-every", "0"],
                               cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (work / "ck.npz").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert process.poll() is None, "the fit ended before it could be interrupted"
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        # a kill can strand a checkpoint temporary; never an output or its temporary
        leftovers = [p.name for p in work.iterdir() if p.name not in ("ck.npz",)]
        assert all(name.startswith(".ck.npz.") and name.endswith(".tmp") for name in leftovers), leftovers
    else:
        assert process.returncode == 130, stderr
        assert stderr.startswith("Error: interrupted") and "Traceback" not in stderr
        assert stdout == ""
        assert sorted(p.name for p in work.iterdir()) == ["ck.npz"]  # no output, no temporaries
    assert not (work / "out.npz").exists()

    checkpoint = ns.read_stats(str(work / "ck.npz"))  # complete and loadable
    done = checkpoint.meta["checkpoint"]["rows_done"]
    assert 0 < done < BIG_ROWS and checkpoint.meta["rows_seen"] == done

    resumed = subprocess.run([_script(), "fit-bn", *args, "-o", "out.npz", "--resume", "ck.npz"],
                             cwd=work, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    result, full = ns.read_stats(str(work / "out.npz")), uninterrupted(mode)
    same_stats(result, full)
    assert result.meta["rows_seen"] == full.meta["rows_seen"] == BIG_ROWS
    assert result.meta["batches_seen"] == full.meta["batches_seen"]
    assert result.meta["bytes_read"] == (BIG_ROWS - done) * BIG_COLS * 4


@pytest.mark.parametrize("dtype, offset, spread", [(np.float32, 1e6, 1e-2), (np.float64, 1e9, 1.0),
                                                   (np.float32, 5.0, 2.0)])
def test_variance_matches_extended_precision_under_large_offsets(dtype, offset, spread):
    """Against a long-double reference (numpy's own float64 var errs by up to 1e-9 here)."""
    x = (offset + spread * np.random.default_rng(7).standard_normal((60_000, 3))).astype(dtype)
    wide = x.astype(np.longdouble)
    reference = ((wide - wide.mean(axis=0)) ** 2).mean(axis=0)
    state = ns.BatchNormExact(ddof=0)
    for start in range(0, len(x), 7_001):
        state.update(x[start:start + 7_001])
    error = np.abs(state.result().arrays["var"].astype(np.longdouble) / reference - 1)
    assert error.max() < 1e-13, error


# --- --jobs: exact fits split over processes ---------------------------------------------


@pytest.fixture
def sharded(tmp_path):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3000, 5)) * 3 + 100).astype(np.float32)
    labels = rng.integers(0, 4, 3000)
    weights = rng.random(3000)
    for i, (a, b) in enumerate([(0, 1200), (1200, 3000)]):
        np.save(tmp_path / f"x{i}.npy", x[a:b])
        np.save(tmp_path / f"y{i}.npy", labels[a:b])
    np.save(tmp_path / "w.npy", weights)
    np.save(tmp_path / "g.npy", labels)
    return tmp_path


@pytest.mark.parametrize("extra", [[], ["--weights", "w.npy"], ["--groups", "g.npy", "--num-groups", "4"]],
                         ids=["plain", "weights", "groups"])
def test_jobs_equal_a_serial_exact_fit(run, sharded, monkeypatch, extra):
    monkeypatch.chdir(sharded)
    args = ["fit-bn", "x0.npy", "x1.npy", "--mode", "exact", *extra]
    assert run(*args, "-o", "serial.npz").exit_code == 0
    result = run(*args, "-o", "parallel.npz", "--jobs", "3")
    assert result.exit_code == 0, result.stderr
    with np.load(sharded / "serial.npz") as serial, np.load(sharded / "parallel.npz") as parallel:
        for key in ("mean", "var", "inv_std", "count"):
            close(parallel[key], serial[key], rtol=1e-12)
        meta = json.loads(str(parallel["meta"]))
    assert meta["jobs"] == 3 and meta["rows_seen"] == 3000


@pytest.mark.parametrize("extra", [["--mode", "exact"], ["--batch-size", "32"],
                                   ["--batch-size", "32", "--init", "first", "--alpha", "0.3"]],
                         ids=["exact", "ema", "ema-first"])
def test_jobs_for_centers(run, sharded, monkeypatch, extra):
    monkeypatch.chdir(sharded)
    args = ["fit-centers", "x0.npy", "x1.npy", "--labels", "y0.npy", "--labels", "y1.npy",
            "--num-classes", "4", *extra]
    assert run(*args, "-o", "serial.npz").exit_code == 0
    assert run(*args, "-o", "parallel.npz", "--jobs", "3").exit_code == 0
    with np.load(sharded / "serial.npz") as serial, np.load(sharded / "parallel.npz") as parallel:
        close(parallel["centers"], serial["centers"], rtol=1e-12)
        assert np.array_equal(parallel["counts"], serial["counts"])
        assert json.loads(str(parallel["meta"]))["jobs"] == 3


def test_jobs_report_the_first_bad_value_with_its_file(run, sharded, monkeypatch):
    monkeypatch.chdir(sharded)
    x = np.load(sharded / "x1.npy")
    x[1500, 3] = np.nan
    np.save(sharded / "x1.npy", x)
    result = run("fit-bn", "x0.npy", "x1.npy", "--mode", "exact", "--jobs", "2", "-o", "s.npz")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: x1.npy row 1500: column 3 holds nan")
    assert not (sharded / "s.npz").exists()


@pytest.mark.parametrize("args", [
    ["fit-bn", "x0.npy", "--mode", "exact", "--checkpoint", "ck.npz"],
], ids=["checkpoint"])
def test_jobs_refuse_what_cannot_be_split(run, sharded, monkeypatch, args):
    monkeypatch.chdir(sharded)
    result = run(*args, "--jobs", "2", "-o", "s.npz")
    assert result.exit_code == 2 and "--jobs" in result.stderr


@pytest.mark.parametrize("nan_policy", ["error", "omit"])
def test_ema_split_at_a_batch_boundary_and_followed_equals_one_pass(nan_policy):
    x = np.random.default_rng(12).standard_normal((1000, 3, 4))
    if nan_policy == "omit":
        x[[5, 600], 1, 2] = np.nan
    options = dict(alpha=0.05, batch_size=8, nan_policy=nan_policy, mean=0.5, inv_std=2.0)
    whole = ns.BatchNormEMA(**options).update(x).result()
    first = ns.BatchNormEMA(**options).update(x[:408])
    later = ns.BatchNormEMA(**options).zero_start().update(x[408:])
    joined = first.follow(later).result()
    assert sorted(joined.arrays) == sorted(whole.arrays)
    for key in whole.arrays:  # mean, inv_std (and count under omit)
        close(joined.arrays[key], whole.arrays[key], rtol=1e-13)
    for key in ("rows_seen", "batches_seen", "batches_skipped"):
        assert joined.meta[key] == whole.meta[key]


def test_jobs_for_ema_equal_a_serial_fit(run, sharded, monkeypatch):
    monkeypatch.chdir(sharded)
    args = ["fit-bn", "x0.npy", "x1.npy", "--batch-size", "16", "--alpha", "0.05"]
    assert run(*args, "-o", "serial.npz").exit_code == 0
    assert run(*args, "-o", "parallel.npz", "--jobs", "2").exit_code == 0
    with np.load(sharded / "serial.npz") as serial, np.load(sharded / "parallel.npz") as parallel:
        for key in ("mean", "inv_std"):
            close(parallel[key], serial[key], rtol=1e-12)
        assert json.loads(str(parallel["meta"]))["batches_seen"] == json.loads(str(serial["meta"]))["batches_seen"]
