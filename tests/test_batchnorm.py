"""BatchNorm statistics (``ema`` and ``exact``) against the naive references.

Every case is fitted through the state objects (whole array at once, and in
update calls that are whole numbers of logical batches) and through
:func:`normstats.fit_batchnorm` reading `.npy` and HDF5 files, and compared
with :mod:`tests.reference`, computed in float64 on the same input values.
Tolerances: rtol 1e-10 for float64 input, 1e-5 for every other dtype.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from tests.reference import N, SHAPES, make_data, write_h5, write_npy, ref_axes, ref_bn_ema, ref_bn_exact


BATCH_SIZES = [
    pytest.param(1, id="bs1"),
    pytest.param(2, id="bs2"),
    pytest.param(3, id="bs3-last-batch-1-row"),
    pytest.param(7, id="bs7"),
    pytest.param(N, id="bs-n"),
    pytest.param(N + 1, id="bs-n+1"),
]

FEEDS = ["whole", "chunks", "npy", "h5"]

DTYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8"]


def rtol_for(dtype):
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-5


def assert_close(actual, expected, dtype="float64"):
    rtol = rtol_for(dtype)
    assert actual is not None and np.shape(actual) == np.shape(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-3)


def batch_chunks(x, batch_size):
    """Split `x` into update calls of 1, 2, 3, ... whole batches (the last may be shorter)."""
    chunks, start, k = [], 0, 1
    while start < x.shape[0]:
        chunks.append(x[start : start + k * batch_size])
        start += k * batch_size
        k += 1
    return chunks




def feed(state, x, how, tmp_path, batch_size):
    """Fit `state` on `x` one way; return the Stats."""
    if how == "whole":
        return state.update(x).result()
    if how == "chunks":
        for chunk in batch_chunks(x, batch_size):
            state.update(chunk)
        return state.result()
    spec = write_npy(tmp_path, x) if how == "npy" else write_h5(tmp_path, x)
    with ns.open_stream([spec]) as stream:
        return ns.fit_batchnorm(state, stream, block_rows=2 * batch_size)


def n_batches(rows, batch_size):
    return -(-rows // batch_size)


# --- ema ----------------------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("shape, axes", SHAPES)
def test_ema_matches_reference(shape, axes, batch_size, how, tmp_path):
    x = make_data(shape)
    state = ns.BatchNormEMA(axes=axes, alpha=0.3, batch_size=batch_size)
    stats = feed(state, x, how, tmp_path, batch_size)
    mean, inv_std, batches, skipped = ref_bn_ema(x, batch_size, axes, alpha=0.3)
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["batches_seen"] == batches
    assert stats.meta["batches_skipped"] == skipped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", FEEDS)
def test_ema_input_dtypes(dtype, how, tmp_path):
    x = make_data((N, 2, 3, 2), dtype)
    state = ns.BatchNormEMA(alpha=0.3, batch_size=3)
    stats = feed(state, x, how, tmp_path, 3)
    mean, inv_std, _, _ = ref_bn_ema(x.astype(np.float64), 3, alpha=0.3)
    assert_close(stats.arrays["mean"], mean, dtype)
    assert_close(stats.arrays["inv_std"], inv_std, dtype)
    assert stats.meta["input_dtype"] == dtype


@pytest.mark.parametrize("alpha", [0.01, 0.3, 1.0], ids=["alpha0.01", "alpha0.3", "alpha1"])
@pytest.mark.parametrize("ddof", [0, 1], ids=["ddof0", "ddof1"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_ema_alpha_and_ddof(alpha, ddof, batch_size):
    x = make_data((N, 3, 2))
    state = ns.BatchNormEMA(alpha=alpha, ddof=ddof, eps=1e-3, batch_size=batch_size)
    stats = state.update(x).result()
    mean, inv_std, batches, skipped = ref_bn_ema(x, batch_size, alpha=alpha, ddof=ddof, eps=1e-3)
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["inv_std"], inv_std)
    assert (stats.meta["batches_seen"], stats.meta["batches_skipped"]) == (batches, skipped)
    assert stats.meta["ddof"] == ddof and stats.meta["alpha"] == alpha


def test_ema_alpha_one_is_last_batch():
    x = make_data((N, 3))
    stats = ns.BatchNormEMA(alpha=1.0, ddof=0, batch_size=4).update(x).result()
    last = x[8:]
    np.testing.assert_allclose(stats.arrays["mean"], last.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.arrays["inv_std"], 1 / np.sqrt(last.var(axis=0) + 1e-5), rtol=1e-12)


@pytest.mark.parametrize("how", FEEDS)
def test_ddof1_batch_size_1_on_2d_skips_every_batch(how, tmp_path):
    x = make_data((N, 3))
    mean0, inv_std0 = np.array([1.0, -2.0, 3.0]), np.array([0.5, 2.0, 4.0])
    state = ns.BatchNormEMA(ddof=1, batch_size=1, alpha=0.3, mean=mean0, inv_std=inv_std0)
    stats = feed(state, x, how, tmp_path, 1)
    assert stats.meta["batches_seen"] == N
    assert stats.meta["batches_skipped"] == N
    assert stats.meta["rows_seen"] == N
    np.testing.assert_array_equal(stats.arrays["mean"], mean0)
    np.testing.assert_array_equal(stats.arrays["inv_std"], inv_std0)


def test_ddof0_batch_size_1_on_2d_updates_every_batch():
    x = make_data((N, 3))
    stats = ns.BatchNormEMA(ddof=0, batch_size=1, alpha=0.3).update(x).result()
    mean, inv_std, _, skipped = ref_bn_ema(x, 1, alpha=0.3, ddof=0)
    assert skipped == 0 and stats.meta["batches_skipped"] == 0
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["inv_std"], inv_std)


@pytest.mark.parametrize("how", FEEDS)
def test_last_batch_of_one_row_is_skipped_with_ddof1(how, tmp_path):
    x = make_data((N, 3))
    stats = feed(ns.BatchNormEMA(batch_size=3, alpha=0.3), x, how, tmp_path, 3)
    mean, inv_std, batches, skipped = ref_bn_ema(x, 3, alpha=0.3)
    assert (batches, skipped) == (4, 1)
    assert (stats.meta["batches_seen"], stats.meta["batches_skipped"]) == (4, 1)
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["inv_std"], inv_std)


INITIALS = [
    pytest.param(2.5, 0.5, id="scalars"),
    pytest.param(np.array([1.0, -1.0]), np.array([0.25, 3.0]), id="arrays"),
    pytest.param(np.array([1.0, -1.0]), 0.75, id="array-mean-scalar-inv_std"),
]


@pytest.mark.parametrize("mean0, inv_std0", INITIALS)
def test_ema_initial_values(mean0, inv_std0):
    x = make_data((N, 2, 3))
    state = ns.BatchNormEMA(alpha=0.3, batch_size=4, mean=mean0, inv_std=inv_std0)
    stats = state.update(x).result()
    mean, inv_std, _, _ = ref_bn_ema(x, 4, alpha=0.3, mean=mean0, inv_std=inv_std0)
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["inv_std"], inv_std)


def test_ema_initial_array_of_wrong_shape_is_refused():
    state = ns.BatchNormEMA(mean=np.zeros(4), batch_size=2)
    with pytest.raises(ns.DataError):
        state.update(make_data((N, 3)))


@pytest.mark.parametrize("disabled", ["mean", "inv_std"])
@pytest.mark.parametrize("how", FEEDS)
def test_ema_disabled_statistic(disabled, how, tmp_path):
    x = make_data((N, 2, 3))
    options = {disabled: None}
    stats = feed(ns.BatchNormEMA(alpha=0.3, batch_size=3, **options), x, how, tmp_path, 3)
    expected = dict(zip(["mean", "inv_std"], ref_bn_ema(x, 3, alpha=0.3, **options)[:2]))
    assert disabled not in stats.arrays
    kept = "inv_std" if disabled == "mean" else "mean"
    assert_close(stats.arrays[kept], expected[kept])
    assert stats.meta["use_" + disabled] is False


def test_ema_both_disabled_is_a_usage_error():
    with pytest.raises(ns.UsageError):
        ns.BatchNormEMA(mean=None, inv_std=None)


@pytest.mark.parametrize("shape, axes", SHAPES)
@pytest.mark.parametrize("batch_size", [pytest.param(3, id="bs3"), pytest.param(N + 1, id="bs-n+1")])
def test_ema_metadata(shape, axes, batch_size):
    x = make_data(shape)
    stats = ns.BatchNormEMA(axes=axes, batch_size=batch_size).update(x).result()
    assert stats.kind == "batchnorm"
    assert stats.meta["mode"] == "ema"
    assert stats.meta["rows_seen"] == N
    _, _, batches, skipped = ref_bn_ema(x, batch_size, axes)
    assert stats.meta["batches_seen"] == batches == n_batches(N, batch_size)
    assert stats.meta["batches_skipped"] == skipped
    assert stats.meta["batch_size"] == batch_size
    assert list(stats.meta["axes"]) == list(ref_axes(axes, len(shape)))
    assert list(stats.meta["row_shape"]) == list(shape[1:])


@pytest.mark.parametrize(
    "batch_size, split",
    [
        pytest.param(2, 4, id="bs2-split4"),
        pytest.param(3, 6, id="bs3-split6-last-batch-skipped"),
        pytest.param(1, 1, id="bs1-split1"),
        pytest.param(7, 7, id="bs7-split7"),
    ],
)
@pytest.mark.parametrize("shape", [pytest.param((N, 3), id="2d"), pytest.param((N, 2, 3), id="3d")])
def test_ema_from_stats_continues_like_one_fit(shape, batch_size, split):
    x = make_data(shape)
    options = dict(alpha=0.3, eps=1e-4, ddof=1, batch_size=batch_size)
    first = ns.BatchNormEMA(**options).update(x[:split]).result()
    resumed = ns.BatchNormEMA.from_stats(first, **options).update(x[split:]).result()
    whole = ns.BatchNormEMA(**options).update(x).result()
    for name in ("mean", "inv_std"):
        np.testing.assert_allclose(resumed.arrays[name], whole.arrays[name], rtol=1e-12)
    second = ns.BatchNormEMA(**options).update(x[split:]).result()
    for counter in ("rows_seen", "batches_seen", "batches_skipped"):
        assert resumed.meta[counter] == whole.meta[counter]
        assert resumed.meta[counter] == first.meta[counter] + second.meta[counter]


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_ema_from_stats_file_continues_like_one_fit(suffix, tmp_path):
    x = make_data((N, 2, 3))
    options = dict(alpha=0.3, batch_size=2)
    path = str(tmp_path / f"first{suffix}")
    ns.write_stats(ns.BatchNormEMA(**options).update(x[:6]).result(), path)
    resumed = ns.BatchNormEMA.from_stats(ns.read_stats(path), **options).update(x[6:]).result()
    mean, inv_std, batches, skipped = ref_bn_ema(x, 2, alpha=0.3)
    assert_close(resumed.arrays["mean"], mean)
    assert_close(resumed.arrays["inv_std"], inv_std)
    assert (resumed.meta["rows_seen"], resumed.meta["batches_seen"]) == (N, batches)


@pytest.mark.parametrize(
    "batch_size, block_rows",
    [
        pytest.param(2, 5, id="bs2-block5"),
        pytest.param(3, 4, id="bs3-block4"),
        pytest.param(4, 3, id="bs4-block3"),
    ],
)
def test_ema_logical_batches_do_not_depend_on_block_rows(batch_size, block_rows, tmp_path):
    """DESIGN: the logical batch size is independent of how many rows are read at a time."""
    x = make_data((N, 3))
    with ns.open_stream([write_npy(tmp_path, x)]) as stream:
        state = ns.BatchNormEMA(alpha=0.3, batch_size=batch_size)
        stats = ns.fit_batchnorm(state, stream, block_rows=block_rows)
    mean, inv_std, batches, _ = ref_bn_ema(x, batch_size, alpha=0.3)
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["batches_seen"] == batches


def test_ema_batches_span_shard_boundaries(tmp_path):
    x = make_data((N, 3))
    specs = [write_npy(tmp_path, x[:5], "a.npy"), write_h5(tmp_path, x[5:], "b.h5")]
    with ns.open_stream(specs) as stream:
        stats = ns.fit_batchnorm(ns.BatchNormEMA(alpha=0.3, batch_size=2), stream, block_rows=4)
    mean, inv_std, _, _ = ref_bn_ema(x, 2, alpha=0.3)
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["sources"] == specs


# --- exact --------------------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("ddof", [0, 1], ids=["ddof0", "ddof1"])
@pytest.mark.parametrize("shape, axes", SHAPES)
def test_exact_matches_reference(shape, axes, ddof, how, tmp_path):
    x = make_data(shape)
    state = ns.BatchNormExact(axes=axes, ddof=ddof, batch_size=3)
    stats = feed(state, x, how, tmp_path, 3)
    mean, var, inv_std = ref_bn_exact(x, axes, eps=1e-5, ddof=ddof)
    assert_close(stats.arrays["mean"], mean)
    assert_close(stats.arrays["var"], var)
    assert_close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["rows_seen"] == N
    assert stats.meta["batches_seen"] == n_batches(N, 3)
    assert stats.meta["batches_skipped"] == 0
    assert list(stats.meta["axes"]) == list(ref_axes(axes, len(shape)))
    assert list(stats.meta["row_shape"]) == list(shape[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", FEEDS)
def test_exact_input_dtypes(dtype, how, tmp_path):
    x = make_data((N, 2, 3, 2), dtype)
    stats = feed(ns.BatchNormExact(batch_size=2), x, how, tmp_path, 2)
    mean, var, inv_std = ref_bn_exact(x.astype(np.float64))
    assert_close(stats.arrays["mean"], mean, dtype)
    assert_close(stats.arrays["var"], var, dtype)
    assert_close(stats.arrays["inv_std"], inv_std, dtype)


@pytest.mark.parametrize("shape, axes", SHAPES)
def test_exact_does_not_depend_on_batch_size(shape, axes):
    x = make_data(shape)
    results = []
    for batch_size in (1, 2, 7, N, N + 1):
        state = ns.BatchNormExact(axes=axes, batch_size=batch_size)
        for chunk in batch_chunks(x, batch_size):
            state.update(chunk)
        results.append(state.result().arrays)
    for arrays in results[1:]:
        for name in ("mean", "var", "inv_std", "count"):
            np.testing.assert_allclose(arrays[name], results[0][name], rtol=1e-12)


@pytest.mark.parametrize("split", [1, 4, 9], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("shape, axes", SHAPES)
def test_exact_merge_equals_one_fit(shape, axes, split):
    x = make_data(shape)
    a = ns.BatchNormExact(axes=axes, batch_size=2).update(x[:split])
    b = ns.BatchNormExact(axes=axes, batch_size=2).update(x[split:])
    merged = a.merge(b).result()
    mean, var, inv_std = ref_bn_exact(x, axes)
    assert_close(merged.arrays["mean"], mean)
    assert_close(merged.arrays["var"], var)
    assert_close(merged.arrays["inv_std"], inv_std)
    assert merged.meta["rows_seen"] == N
    assert merged.meta["batches_seen"] == n_batches(split, 2) + n_batches(N - split, 2)


def test_exact_merge_into_empty_state():
    x = make_data((N, 3))
    merged = ns.BatchNormExact().merge(ns.BatchNormExact().update(x)).result()
    assert_close(merged.arrays["mean"], ref_bn_exact(x)[0])
    assert merged.meta["rows_seen"] == N


@pytest.mark.parametrize("through", ["stats", ".npz", ".h5"])
@pytest.mark.parametrize("shape, axes", SHAPES)
def test_exact_from_stats_continues_like_one_fit(shape, axes, through, tmp_path):
    x = make_data(shape)
    first = ns.BatchNormExact(axes=axes, ddof=1, batch_size=2).update(x[:4]).result()
    if through != "stats":
        path = str(tmp_path / f"first{through}")
        ns.write_stats(first, path)
        first = ns.read_stats(path)
    resumed = ns.BatchNormExact.from_stats(first, batch_size=2).update(x[4:]).result()
    mean, var, inv_std = ref_bn_exact(x, axes)
    assert_close(resumed.arrays["mean"], mean)
    assert_close(resumed.arrays["var"], var)
    assert_close(resumed.arrays["inv_std"], inv_std)
    assert resumed.meta["rows_seen"] == N
    assert resumed.meta["batches_seen"] == n_batches(4, 2) + n_batches(N - 4, 2)


@pytest.mark.parametrize("disabled", ["mean", "inv_std"])
def test_exact_disabled_statistic(disabled):
    x = make_data((N, 2, 3))
    options = {"use_mean": disabled != "mean", "use_inv_std": disabled != "inv_std"}
    stats = ns.BatchNormExact(**options).update(x).result()
    mean, var, inv_std = ref_bn_exact(x)
    assert disabled not in stats.arrays
    kept, expected = ("inv_std", inv_std) if disabled == "mean" else ("mean", mean)
    assert_close(stats.arrays[kept], expected)
    assert_close(stats.arrays["var"], var)


def test_exact_disabled_mean_survives_from_stats():
    x = make_data((N, 3))
    first = ns.BatchNormExact(use_mean=False).update(x[:5]).result()
    resumed = ns.BatchNormExact.from_stats(first).update(x[5:]).result()
    assert "mean" not in resumed.arrays
    assert_close(resumed.arrays["inv_std"], ref_bn_exact(x)[2])


def test_exact_both_disabled_is_a_usage_error():
    with pytest.raises(ns.UsageError):
        ns.BatchNormExact(use_mean=False, use_inv_std=False)


# --- precision ------------------------------------------------------------------


@pytest.fixture
def offset_float32():
    """float32 data of mean 1e4 and standard deviation 1."""
    rng = np.random.default_rng(7)
    return (1e4 + rng.standard_normal((64, 3))).astype(np.float32)


@pytest.mark.parametrize("how", FEEDS)
def test_exact_precision_with_large_mean(offset_float32, how, tmp_path):
    x = offset_float32
    stats = feed(ns.BatchNormExact(batch_size=8), x, how, tmp_path, 8)
    mean, var, inv_std = ref_bn_exact(x.astype(np.float64))
    assert_close(stats.arrays["mean"], mean, "float32")
    assert_close(stats.arrays["var"], var, "float32")
    assert_close(stats.arrays["inv_std"], inv_std, "float32")
    assert np.all(np.abs(stats.arrays["var"] - 1.0) < 0.5)


@pytest.mark.parametrize("split", [1, 17, 32], ids=lambda s: f"split{s}")
def test_exact_merge_precision_with_large_mean(offset_float32, split):
    x = offset_float32
    a = ns.BatchNormExact().update(x[:split])
    merged = a.merge(ns.BatchNormExact().update(x[split:])).result()
    assert_close(merged.arrays["var"], ref_bn_exact(x.astype(np.float64))[1], "float32")


@pytest.mark.parametrize("how", FEEDS)
def test_ema_precision_with_large_mean(offset_float32, how, tmp_path):
    x = offset_float32
    stats = feed(ns.BatchNormEMA(alpha=0.3, batch_size=8), x, how, tmp_path, 8)
    mean, inv_std, _, _ = ref_bn_ema(x.astype(np.float64), 8, alpha=0.3)
    assert_close(stats.arrays["mean"], mean, "float32")
    assert_close(stats.arrays["inv_std"], inv_std, "float32")
