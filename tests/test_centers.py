"""Per-class centers (``ema`` and ``exact``) against the naive references.

The label sets cover one class, classes never present, and classes absent
from some batches; features are 2-D and 3-D (centers of shape
``(K,) + row_shape``). States are fed whole, in update calls of whole
batches, and through :func:`normstats.fit_centers` reading files.
Tolerances: rtol 1e-10 for float64 input, 1e-5 otherwise.
"""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

import normstats as ns
from tests.reference import ref_centers_ema, ref_centers_ema_first, ref_centers_exact

N = 12

LABEL_SETS = {
    "K1": (1, np.zeros(N, dtype=np.int64)),
    "K3-all-present": (3, np.array([1, 0, 2, 1, 1, 0, 2, 2, 0, 1, 1, 1])),
    "K3-class1-never": (3, np.array([0, 0, 2, 0, 2, 2, 0, 0, 0, 2, 0, 2])),
    "K50-four-present": (50, np.array([7, 0, 49, 7, 13, 13, 0, 49, 49, 7, 0, 13])),
}
LABELS = [pytest.param(name, id=name) for name in LABEL_SETS]

BATCH_SIZES = [
    pytest.param(1, id="bs1"),
    pytest.param(2, id="bs2"),
    pytest.param(5, id="bs5"),
    pytest.param(N, id="bs-n"),
    pytest.param(N + 1, id="bs-n+1"),
]

ROW_SHAPES = [pytest.param((4,), id="2d"), pytest.param((2, 3), id="3d")]

DTYPES = ["float32", "float64", "int32", "int64"]


def make_features(row_shape, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(1.0, 3.0, size=(N,) + row_shape).astype(dtype)
    return rng.integers(-50, 100, size=(N,) + row_shape).astype(dtype)


def make_init(K, row_shape, seed=1):
    return np.random.default_rng(seed).uniform(-2, 2, size=(K,) + row_shape)


def rtol_for(dtype):
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-5


def assert_close(actual, expected, dtype="float64"):
    rtol = rtol_for(dtype)
    assert np.shape(actual) == np.shape(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-3)


def batch_chunks(n, batch_size):
    """Slices of update calls of 1, 2, 3, ... whole batches."""
    chunks, start, k = [], 0, 1
    while start < n:
        chunks.append(slice(start, start + k * batch_size))
        start += k * batch_size
        k += 1
    return chunks


def fit(state, x, labels, how):
    if how == "whole":
        return state.update(x, labels).result()
    for chunk in batch_chunks(x.shape[0], state.batch_size):
        state.update(x[chunk], labels[chunk])
    return state.result()


def write(tmp_path, array, fmt, name):
    if fmt == "npy":
        path = tmp_path / f"{name}.npy"
        np.save(path, array)
        return str(path)
    path = tmp_path / f"{name}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=array)
    return f"{path}:{name}"


def n_batches(rows, batch_size):
    return -(-rows // batch_size)


def row_in_message(row, message):
    return re.search(rf"\b{row}\b", message) is not None


# --- ema ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "chunks"])
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("labels_name", LABELS)
def test_ema_zeros_matches_reference(labels_name, batch_size, row_shape, how):
    K, labels = LABEL_SETS[labels_name]
    x = make_features(row_shape)
    state = ns.CentersEMA(K, alpha=0.3, init="zeros", batch_size=batch_size)
    stats = fit(state, x, labels, how)
    centers, counts = ref_centers_ema(x, labels, K, batch_size, alpha=0.3)
    assert_close(stats.arrays["centers"], centers)
    np.testing.assert_array_equal(stats.arrays["counts"], counts)


@pytest.mark.parametrize("init_shape", ["K-by-row-shape", "K-by-D"])
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("labels_name", LABELS)
def test_ema_array_init_matches_reference(labels_name, batch_size, row_shape, init_shape):
    K, labels = LABEL_SETS[labels_name]
    x = make_features(row_shape)
    init = make_init(K, row_shape)
    given = init if init_shape == "K-by-row-shape" else init.reshape(K, -1)
    state = ns.CentersEMA(K, init=given, batch_size=batch_size)
    stats = fit(state, x, labels, "chunks")
    centers, counts = ref_centers_ema(x, labels, K, batch_size, alpha=0.9, init_centers=init)
    assert_close(stats.arrays["centers"], centers)
    np.testing.assert_array_equal(stats.arrays["counts"], counts)
    unseen = counts == 0
    np.testing.assert_array_equal(stats.arrays["centers"][unseen], init[unseen])


@pytest.mark.parametrize("how", ["whole", "chunks"])
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("labels_name", LABELS)
def test_ema_first_matches_reference(labels_name, batch_size, row_shape, how):
    K, labels = LABEL_SETS[labels_name]
    x = make_features(row_shape)
    state = ns.CentersEMA(K, alpha=0.3, init="first", batch_size=batch_size)
    stats = fit(state, x, labels, how)
    centers, counts = ref_centers_ema_first(x, labels, K, batch_size, alpha=0.3)
    assert_close(stats.arrays["centers"], centers)
    assert np.all(np.isnan(stats.arrays["centers"][counts == 0]))
    assert not np.any(np.isnan(stats.arrays["centers"][counts > 0]))


@pytest.mark.parametrize("alpha", [0.01, 0.5, 1.0], ids=["alpha0.01", "alpha0.5", "alpha1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_input_dtypes_and_alpha(dtype, alpha):
    K, labels = LABEL_SETS["K3-all-present"]
    x = make_features((2, 3), dtype)
    stats = ns.CentersEMA(K, alpha=alpha, init="zeros", batch_size=5).update(x, labels).result()
    centers, _ = ref_centers_ema(x.astype(np.float64), labels, K, 5, alpha=alpha)
    assert_close(stats.arrays["centers"], centers, dtype)
    assert stats.meta["input_dtype"] == dtype


def random_fit(K, labels, x, seed, batch_size=2):
    state = ns.CentersEMA(K, init="random", seed=seed, batch_size=batch_size)
    return state.update(x, labels).result()


@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("labels_name", ["K3-class1-never", "K50-four-present"])
def test_ema_random_init_range_on_unseen_classes(labels_name, row_shape):
    K, labels = LABEL_SETS[labels_name]
    x = make_features(row_shape)
    stats = random_fit(K, labels, x, seed=3)
    bound = 1.0 / np.sqrt(np.prod(row_shape))
    unseen = stats.arrays["centers"][stats.arrays["counts"] == 0]
    assert unseen.size > 0
    assert np.all(np.abs(unseen) <= bound)
    assert np.ptp(unseen) > 0


@pytest.mark.parametrize("row_shape", ROW_SHAPES)
def test_ema_random_init_reproducible_with_seed(row_shape):
    K, labels = LABEL_SETS["K50-four-present"]
    x = make_features(row_shape)
    a, b = random_fit(K, labels, x, seed=5), random_fit(K, labels, x, seed=5)
    np.testing.assert_array_equal(a.arrays["centers"], b.arrays["centers"])
    other = random_fit(K, labels, x, seed=6)
    assert not np.array_equal(a.arrays["centers"], other.arrays["centers"])
    assert a.meta["seed"] == 5


def test_ema_random_init_default_seed_is_0():
    K, labels = LABEL_SETS["K3-class1-never"]
    x = make_features((4,))
    default = ns.CentersEMA(K, batch_size=2).update(x, labels).result()
    np.testing.assert_array_equal(default.arrays["centers"], random_fit(K, labels, x, seed=0).arrays["centers"])


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_ema_random_init_does_not_depend_on_data(batch_size):
    """The initial centers seen through unseen classes start the EMA of seen ones."""
    K, labels = LABEL_SETS["K3-all-present"]
    x = make_features((4,))
    init = np.empty((K, 4))
    for j in range(K):
        other = (j + 1) % K
        probe = random_fit(K, np.full(2, other), x[:2], seed=9)
        init[j] = probe.arrays["centers"][j]
    stats = random_fit(K, labels, x, seed=9, batch_size=batch_size)
    centers, _ = ref_centers_ema(x, labels, K, batch_size, alpha=0.9, init_centers=init)
    assert_close(stats.arrays["centers"], centers)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("labels_name", LABELS)
def test_ema_metadata(labels_name, batch_size):
    K, labels = LABEL_SETS[labels_name]
    x = make_features((2, 3))
    stats = ns.CentersEMA(K, batch_size=batch_size).update(x, labels).result()
    assert stats.kind == "centers"
    assert stats.meta["mode"] == "ema"
    assert stats.meta["rows_seen"] == N
    assert stats.meta["batches_seen"] == n_batches(N, batch_size)
    assert stats.meta["num_classes"] == K
    assert list(stats.meta["row_shape"]) == [2, 3]
    assert stats.meta["classes_unseen"] == int(np.sum(np.bincount(labels, minlength=K) == 0))
    assert stats.arrays["centers"].shape == (K, 2, 3)


def test_ema_merge_is_refused():
    K, labels = LABEL_SETS["K3-all-present"]
    x = make_features((4,))
    with pytest.raises(ns.UsageError):
        ns.CentersEMA(K).update(x, labels).merge(ns.CentersEMA(K).update(x, labels))


# --- exact --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("labels_name", LABELS)
def test_exact_matches_reference(labels_name, batch_size, row_shape, dtype):
    K, labels = LABEL_SETS[labels_name]
    x = make_features(row_shape, dtype)
    stats = fit(ns.CentersExact(K, batch_size=batch_size), x, labels, "chunks")
    centers, counts, var = ref_centers_exact(x.astype(np.float64), labels, K)
    assert_close(stats.arrays["centers"], centers, dtype)
    assert_close(stats.arrays["var"], var, dtype)
    np.testing.assert_array_equal(stats.arrays["counts"], counts)
    assert np.all(np.isnan(stats.arrays["centers"][counts == 0]))
    assert stats.meta["rows_seen"] == N
    assert stats.meta["batches_seen"] == n_batches(N, batch_size)
    assert stats.meta["classes_unseen"] == int(np.sum(counts == 0))


@pytest.mark.parametrize("split", [1, 5, 11], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("labels_name", LABELS)
def test_exact_merge_equals_one_fit(labels_name, row_shape, split):
    K, labels = LABEL_SETS[labels_name]
    x = make_features(row_shape)
    a = ns.CentersExact(K).update(x[:split], labels[:split])
    b = ns.CentersExact(K).update(x[split:], labels[split:])
    merged = a.merge(b).result()
    single = ns.CentersExact(K).update(x, labels).result()
    for name in ("centers", "var"):
        np.testing.assert_allclose(merged.arrays[name], single.arrays[name], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(merged.arrays["counts"], single.arrays["counts"])
    centers = ref_centers_exact(x, labels, K)[0]
    assert_close(merged.arrays["centers"], centers)
    assert merged.meta["rows_seen"] == N


def test_exact_merge_into_empty_state():
    K, labels = LABEL_SETS["K3-class1-never"]
    x = make_features((4,))
    merged = ns.CentersExact(K).merge(ns.CentersExact(K).update(x, labels)).result()
    assert_close(merged.arrays["centers"], ref_centers_exact(x, labels, K)[0])


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_exact_from_stats_continues_like_one_fit(suffix, tmp_path):
    K, labels = LABEL_SETS["K50-four-present"]
    x = make_features((2, 3))
    path = str(tmp_path / f"first{suffix}")
    ns.write_stats(ns.CentersExact(K).update(x[:5], labels[:5]).result(), path)
    resumed = ns.CentersExact.from_stats(ns.read_stats(path)).update(x[5:], labels[5:]).result()
    centers, counts, var = ref_centers_exact(x, labels, K)
    assert_close(resumed.arrays["centers"], centers)
    assert_close(resumed.arrays["var"], var)
    np.testing.assert_array_equal(resumed.arrays["counts"], counts)
    assert resumed.meta["rows_seen"] == N


# --- labels -------------------------------------------------------------------


STATES = [
    pytest.param(lambda K: ns.CentersEMA(K, batch_size=2), id="ema"),
    pytest.param(lambda K: ns.CentersExact(K, batch_size=2), id="exact"),
]


@pytest.mark.parametrize("bad_label", [3, 17, -1], ids=["K", "K+14", "negative"])
@pytest.mark.parametrize("make_state", STATES)
def test_first_label_out_of_range_reports_its_row(make_state, bad_label):
    labels = np.array([0, 1, 2, 0, 1, 2, bad_label, 11])
    with pytest.raises(ns.DataError) as caught:
        make_state(3).update(make_features((4,))[:8], labels)
    assert row_in_message(6, str(caught.value))
    assert not row_in_message(7, str(caught.value))


@pytest.mark.parametrize("make_state", STATES)
def test_label_out_of_range_in_later_update_reports_global_row(make_state):
    x = make_features((4,))
    state = make_state(3)
    state.update(x[:7], np.array([0, 1, 2, 0, 1, 2, 0]))
    labels = np.array([1, 2, 5, 0, 1])
    with pytest.raises(ns.DataError) as caught:
        state.update(x[7:], labels)
    message = str(caught.value)
    assert row_in_message(9, message)
    assert not row_in_message(2, message)


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param(np.array([0.0, 1.0, 2.0, 0.0]), id="float-integral"),
        pytest.param(np.array([0.5, 1.0, 2.0, 0.0]), id="float"),
        pytest.param(np.array([True, False, True, False]), id="bool"),
        pytest.param(np.array(["0", "1", "2", "0"]), id="str"),
    ],
)
@pytest.mark.parametrize("make_state", STATES)
def test_non_integer_labels_are_refused(make_state, labels):
    with pytest.raises(ns.DataError):
        make_state(3).update(make_features((4,))[:4], labels)


# --- fit_centers over files -------------------------------------------------------


@pytest.mark.parametrize("block_rows", [2, 4, 5, N], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("formats", [("npy", "npy"), ("h5", "npy"), ("npy", "h5"), ("h5", "h5")],
                         ids=lambda f: f"x-{f[0]}-labels-{f[1]}")
def test_fit_centers_exact_from_files(formats, block_rows, tmp_path):
    K, labels = LABEL_SETS["K50-four-present"]
    x = make_features((2, 3), "float32")
    with ns.open_stream([write(tmp_path, x, formats[0], "x")]) as features, \
            ns.open_stream([write(tmp_path, labels, formats[1], "labels")]) as label_stream:
        stats = ns.fit_centers(ns.CentersExact(K, batch_size=1), features, label_stream,
                               block_rows=block_rows)
    centers, counts, var = ref_centers_exact(x.astype(np.float64), labels, K)
    assert_close(stats.arrays["centers"], centers, "float32")
    assert_close(stats.arrays["var"], var, "float32")
    np.testing.assert_array_equal(stats.arrays["counts"], counts)


@pytest.mark.parametrize(
    "batch_size, block_rows",
    [
        pytest.param(2, 4, id="bs2-block4"),
        pytest.param(5, 10, id="bs5-block10"),
        pytest.param(1, 3, id="bs1-block3"),
        pytest.param(2, 5, id="bs2-block5"),
        pytest.param(5, 4, id="bs5-block4"),
    ],
)
@pytest.mark.parametrize("formats", [("npy", "npy"), ("h5", "h5")], ids=lambda f: f"{f[0]}")
def test_fit_centers_ema_from_files(formats, batch_size, block_rows, tmp_path):
    """Logical batches must not depend on how many rows are read at a time."""
    K, labels = LABEL_SETS["K3-all-present"]
    x = make_features((4,))
    with ns.open_stream([write(tmp_path, x, formats[0], "x")]) as features, \
            ns.open_stream([write(tmp_path, labels, formats[1], "labels")]) as label_stream:
        state = ns.CentersEMA(K, alpha=0.3, init="zeros", batch_size=batch_size)
        stats = ns.fit_centers(state, features, label_stream, block_rows=block_rows)
    centers, counts = ref_centers_ema(x, labels, K, batch_size, alpha=0.3)
    assert_close(stats.arrays["centers"], centers)
    np.testing.assert_array_equal(stats.arrays["counts"], counts)


def test_fit_centers_row_count_mismatch(tmp_path):
    K, labels = LABEL_SETS["K3-all-present"]
    x = make_features((4,))
    with ns.open_stream([write(tmp_path, x, "npy", "x")]) as features, \
            ns.open_stream([write(tmp_path, labels[:-1], "npy", "labels")]) as label_stream:
        with pytest.raises(ns.DataError):
            ns.fit_centers(ns.CentersExact(K), features, label_stream)


@pytest.mark.parametrize("block_rows", [3, 4, N], ids=lambda b: f"block{b}")
def test_fit_centers_bad_label_reports_global_row(block_rows, tmp_path):
    K, labels = LABEL_SETS["K3-all-present"]
    labels = labels.copy()
    labels[10] = 7
    x = make_features((4,))
    with ns.open_stream([write(tmp_path, x, "npy", "x")]) as features, \
            ns.open_stream([write(tmp_path, labels, "npy", "labels")]) as label_stream:
        with pytest.raises(ns.DataError) as caught:
            ns.fit_centers(ns.CentersEMA(K, batch_size=1), features, label_stream, block_rows=block_rows)
    assert row_in_message(10, str(caught.value))


def test_fit_centers_float_labels_file(tmp_path):
    K, labels = LABEL_SETS["K3-all-present"]
    x = make_features((4,))
    with ns.open_stream([write(tmp_path, x, "npy", "x")]) as features, \
            ns.open_stream([write(tmp_path, labels.astype(np.float32), "npy", "labels")]) as label_stream:
        with pytest.raises(ns.DataError):
            ns.fit_centers(ns.CentersExact(K), features, label_stream)
