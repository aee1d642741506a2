"""Nearest-center assignment (``normstats.assign``, ``assign_rows``) against a brute-force
numpy reference: every pair's distance in float64, sorted with ties to the lowest class."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import normstats as ns
import normstats.assign
from normstats.errors import DataError, RowError, UsageError
from tests.reference import make_data, ref_distances, ref_nearest, write_h5, write_npy

TOL = dict(rtol=1e-12, atol=1e-12)


def assert_nearest(result, x, centers, counts, k=1, metric="euclidean", labels_too=True, **tol):
    """`result` (labels, distances) is the reference's: the same distances, each
    label's own distance, and (unless near ties make either choice right) the same labels."""
    labels, distances = result
    shape = (len(x),) if k == 1 else (len(x), k)
    assert labels.shape == distances.shape == shape
    assert labels.dtype == np.int64 and distances.dtype == np.float64
    labels, distances = labels.reshape(len(x), k), distances.reshape(len(x), k)
    ref_labels, ref_dist = ref_nearest(x, centers, counts, k, metric)
    tol = tol or TOL
    np.testing.assert_allclose(distances, ref_dist, **tol)
    classes, every = ref_distances(x, centers, counts, metric)
    own = np.take_along_axis(every, np.searchsorted(classes, labels), axis=1)
    np.testing.assert_allclose(own, distances, **tol)
    assert all(len(set(row)) == k for row in labels.tolist())
    if labels_too:
        np.testing.assert_array_equal(labels, ref_labels)


def random_centers(K, row_shape, seed=1, scale=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(offset, scale, size=(K,) + tuple(row_shape))


# --- against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("K, row_shape, rows, k", [
    (1, (5,), 7, 1),
    (2, (3,), 9, 2),
    (10, (64,), 40, 1),
    (10, (64,), 40, 3),
    (37, (2, 3), 25, 5),
    (300, (16,), 30, 300),
])
def test_matches_brute_force(metric, K, row_shape, rows, k):
    centers = random_centers(K, row_shape)
    counts = np.full(K, 3)
    x = make_data((rows,) + row_shape, "float32", seed=K)
    nearest = ns.NearestCenters(centers, counts, metric=metric, top_k=k)
    assert_nearest(nearest(x), x, centers, counts, k, metric)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int16", "int64", "uint8"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_every_numeric_dtype(dtype, metric):
    x = make_data((50, 8), dtype, seed=3)
    centers = make_data((6, 8), "float64", seed=4) * 40  # the integer data spans about -60..200
    counts = np.ones(6, int)
    assert_nearest(ns.NearestCenters(centers, counts, metric=metric, top_k=2)(x), x, centers, counts, 2, metric)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 4])
def test_tiles_of_rows_and_centers_change_nothing(monkeypatch, metric, k):
    """Sub-blocks of 1-3 rows and chunks of 3 centers (fewer than k=4: the first chunk
    alone cannot bound the k-th distance) give the one-tile answer."""
    centers, counts = random_centers(20, (6,)), np.arange(20) % 5
    x = make_data((23, 6), "float32", seed=5)
    whole = ns.NearestCenters(centers, counts, metric=metric, top_k=k)(x)
    for rows, chunk in [(1, 3), (2, 3), (3, 7), (23, 20)]:
        monkeypatch.setattr(normstats.assign, "ROW_CHUNK", rows)
        monkeypatch.setattr(normstats.assign, "CENTER_CHUNK", chunk)
        tiled = ns.NearestCenters(centers, counts, metric=metric, top_k=k)(x)
        np.testing.assert_array_equal(tiled[0], whole[0])
        np.testing.assert_array_equal(tiled[1], whole[1])
    assert_nearest(whole, x, centers, counts, k, metric)


def test_top_k_is_sorted_nearest_first():
    centers = np.arange(6, dtype=np.float64)[:, None] * [1.0, 0.0]  # on a line: 0, 1, ..., 5
    labels, distances = ns.NearestCenters(centers, np.ones(6), top_k=6)(np.array([[3.2, 0.0]]))
    np.testing.assert_array_equal(labels, [[3, 4, 2, 5, 1, 0]])
    np.testing.assert_allclose(distances, [[0.2, 0.8, 1.2, 1.8, 2.2, 3.2]], **TOL)


# --- ties and precision ------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ties_go_to_the_lowest_class(metric):
    centers = np.array([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 0.0], [0.0, 3.0]])  # equidistant / on a duplicate
    labels, distances = ns.NearestCenters(centers, np.ones(5), metric=metric, top_k=4)(x)
    if metric == "euclidean":
        np.testing.assert_array_equal(labels[:, :4], [[1, 2, 3, 4], [1, 2, 3, 4], [1, 3, 2, 4], [2, 4, 1, 3]])
    else:  # [9, 9] points along [1, 1]: nearest for the first two rows
        np.testing.assert_array_equal(labels, [[0, 1, 2, 3], [0, 1, 2, 3], [1, 3, 0, 2], [2, 4, 0, 1]])
    assert np.all(np.diff(distances, axis=1) >= 0)


def test_many_duplicate_centers_keep_the_lowest_classes():
    """More identical centers than any screening margin could separate: the exact
    distances tie and the lowest classes win, over several chunks of centers."""
    centers = np.repeat([[1.0, 2.0, 3.0], [1.0, 2.0, 3.5]], [40, 5], axis=0)[::-1]  # 5 far, then 40 tied
    labels, _ = ns.NearestCenters(centers, np.ones(45), top_k=3)(np.array([[1.0, 2.0, 3.0]] * 4))
    np.testing.assert_array_equal(labels, [[5, 6, 7]] * 4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
def test_near_ties_below_float32_resolution(dtype, offset):
    """Two centers whose distances to the rows differ by ~1e-9 relative: the float32
    screening cannot tell them apart, the exact float64 distances can."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    x = (offset + base + rng.normal(scale=0.5, size=(30, 16))).astype(dtype)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    centers = np.stack([offset + base + 1e-7 * direction, offset + base - 1e-7 * direction,
                        offset + base + 3.0])
    counts = np.ones(3)
    result = ns.NearestCenters(centers, counts, top_k=2)(x)
    _, every = ref_distances(x, centers, counts)
    expected = np.where(every[:, 0] < every[:, 1], 0, 1)
    np.testing.assert_array_equal(result[0][:, 0], expected)
    assert_nearest(result, x, centers, counts, 2, labels_too=False, rtol=1e-12, atol=1e-9 * (1 + offset))


@pytest.mark.parametrize("offset", [1e3, 1e6, 1e8])
def test_large_offsets_keep_float64_precision(offset):
    x = offset + make_data((40, 32), "float64", seed=6)
    centers = offset + random_centers(50, (32,), seed=7)
    counts = np.ones(50)
    assert_nearest(ns.NearestCenters(centers, counts, top_k=3)(x), x, centers, counts, 3,
                   rtol=1e-9, atol=1e-9)


def test_values_beyond_float32_are_screened_in_float64():
    x = make_data((20, 4), "float64", seed=8) * 1e30
    centers = random_centers(7, (4,), seed=9) * 1e30
    counts = np.ones(7)
    assert_nearest(ns.NearestCenters(centers, counts, top_k=2)(x), x, centers, counts, 2, rtol=1e-12, atol=0)


def test_cosine_of_nearly_parallel_vectors_is_not_cancelled():
    """1 - cos loses every digit near 0; the distance is computed as |a - b|^2 / 2 of unit vectors."""
    c = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x = np.array([[1.0, 1e-6, 0.0]])  # angle 1e-6: distance 5e-13
    labels, distances = ns.NearestCenters(c, np.ones(2), metric="cosine")(x)
    assert labels[0] == 0
    np.testing.assert_allclose(distances[0], 0.5e-12, rtol=1e-6)


def test_cosine_with_zero_vectors():
    """A zero row or a zero center has no direction: cosine distance 1 to everything."""
    centers = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    x = np.array([[0.0, 0.0], [2.0, 0.0], [-3.0, 0.0], [0.0, 5.0]])
    labels, distances = ns.NearestCenters(centers, np.ones(3), metric="cosine", top_k=3)(x)
    np.testing.assert_array_equal(labels, [[0, 1, 2], [1, 0, 2], [2, 0, 1], [0, 1, 2]])
    np.testing.assert_allclose(distances, [[1, 1, 1], [0, 1, 2], [0, 1, 2], [1, 1, 1]], **TOL)
    assert_nearest((labels, distances), x, centers, np.ones(3), 3, "cosine")


# --- classes that cannot be assigned -------------------------------------------------------


def test_classes_never_seen_are_never_assigned():
    """An ema fit's unseen class keeps its initial center (here the nearest one); an exact
    fit's is NaN. Neither is ever a label."""
    x = np.array([[0.0, 0.0], [10.0, 0.0]])
    centers = np.array([[0.0, 0.1], [10.0, 0.0], [0.0, 0.0], [np.nan, np.nan]])
    counts = np.array([4, 4, 0, 0])
    nearest = ns.NearestCenters(centers, counts, top_k=2)
    np.testing.assert_array_equal(nearest.classes, [0, 1])
    np.testing.assert_array_equal(nearest.excluded, [2, 3])
    labels, _ = nearest(x)
    np.testing.assert_array_equal(labels, [[0, 1], [1, 0]])
    with pytest.raises(UsageError, match="between 1 and the 2 usable classes"):
        ns.NearestCenters(centers, counts, top_k=3)


def test_from_an_exact_centers_fit_with_an_empty_class():
    x = make_data((30, 5), "float32", seed=10)
    y = np.arange(30) % 3  # class 3 never occurs
    stats = ns.CentersExact(4).update(x, y).result()
    nearest = ns.NearestCenters.from_stats(stats)
    assert nearest.excluded.tolist() == [3]
    assert_nearest(nearest(x), x, stats.arrays["centers"], stats.arrays["counts"])


def test_no_usable_class_is_a_data_error():
    with pytest.raises(DataError, match="no usable class"):
        ns.NearestCenters(np.full((3, 2), np.nan), np.zeros(3))
    with pytest.raises(DataError, match="no usable class"):
        ns.NearestCenters(np.ones((3, 2)), np.zeros(3))


@pytest.mark.parametrize("options, message", [
    ({"metric": "manhattan"}, "metric"),
    ({"top_k": 0}, "top-k"),
    ({"top_k": 1.5}, "top-k"),
    ({"max_distance": -1.0}, "max distance"),
    ({"max_distance": float("nan")}, "max distance"),
])
def test_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        ns.NearestCenters(np.eye(3), np.ones(3), **options)


def test_batchnorm_stats_are_not_centers():
    stats = ns.BatchNormExact().update(np.ones((4, 3)) * [[1], [2], [3], [4]]).result()
    with pytest.raises(DataError, match="not centers"):
        ns.NearestCenters.from_stats(stats)


def test_rows_of_another_shape_are_refused():
    with pytest.raises(DataError, match=r"shape \(4,\).*shape \(3,\)"):
        ns.NearestCenters(np.eye(3), np.ones(3))(np.ones((2, 4)))


# --- rejection, bad rows -------------------------------------------------------------------


def test_max_distance_rejects_far_entries():
    centers = np.array([[0.0], [10.0]])
    x = np.array([[0.5], [4.0], [7.0]])
    labels, distances = ns.NearestCenters(centers, np.ones(2), top_k=2, max_distance=3.5)(x)
    np.testing.assert_array_equal(labels, [[0, -1], [-1, -1], [1, -1]])
    np.testing.assert_allclose(distances, [[0.5, 9.5], [4.0, 6.0], [3.0, 7.0]], **TOL)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_row_with_nan_or_inf_is_named(metric, value):
    x = np.ones((6, 3), np.float32)
    x[4, 2] = value
    with pytest.raises(RowError, match=f"row 4: column 2 holds {value}"):
        ns.NearestCenters(np.eye(3), np.ones(3), metric=metric)(x)


# --- streamed through files ----------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [1, 2, 29, 30, None])
@pytest.mark.parametrize("k", [1, 3])
def test_assign_rows_writes_every_block(tmp_path, block_rows, k):
    x = make_data((29, 2, 4), "float32", seed=11)  # n = 29 rows: blocks of 1, 2, n, n+1
    centers, counts = random_centers(9, (2, 4), seed=12), np.r_[np.ones(8), 0]
    spec = write_h5(tmp_path, x)
    out = tmp_path / "out.h5"
    with ns.open_stream([spec]) as stream:
        result = ns.assign_rows(ns.NearestCenters(centers, counts, top_k=k), stream, str(out),
                                block_rows=block_rows, meta={"centers": "c.npz"})
    assert result["rows"] == 29 and result["classes"] == 8 and result["excluded"] == 1
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["distances", "labels"]
        labels, distances = f["labels"][()], f["distances"][()]
        attrs = dict(f.attrs)
    assert_nearest((labels, distances), x, centers, counts, k)
    assert attrs["metric"] == "euclidean" and attrs["top_k"] == k and attrs["centers"] == "c.npz"
    assert (attrs["classes_used"], attrs["classes_excluded"], attrs["rows"]) == (8, 1, 29)


def test_assign_rows_names_the_shard_and_row_of_a_nan(tmp_path):
    x = np.ones((10, 3), np.float32)
    x[7, 1] = np.nan
    first, second = write_npy(tmp_path, x[:5], "a.npy"), write_npy(tmp_path, x[5:], "b.npy")
    with ns.open_stream([first, second]) as stream:
        with pytest.raises(RowError, match=r"b\.npy row 2: column 1 holds nan"):
            ns.assign_rows(ns.NearestCenters(np.eye(3), np.ones(3)), stream, str(tmp_path / "o.h5"),
                           block_rows=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]  # nothing written


# --- any small data set --------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(data=st.data(), metric=st.sampled_from(["euclidean", "cosine"]))
def test_any_small_problem_matches_brute_force(data, metric):
    """Small integer-valued features and centers: many exact ties, zero vectors and
    duplicate centers. Euclidean distances are then exact in float64, so the labels
    (ties to the lowest class) must be the reference's too."""
    K = data.draw(st.integers(1, 12), label="K")
    D = data.draw(st.integers(1, 5), label="D")
    rows = data.draw(st.integers(1, 20), label="rows")
    small = st.integers(-3, 3)
    centers = data.draw(hnp.arrays(np.float64, (K, D), elements=small), label="centers")
    x = data.draw(hnp.arrays(np.int16, (rows, D), elements=small), label="x")
    counts = data.draw(hnp.arrays(np.int64, K, elements=st.integers(0, 2)), label="counts")
    usable = int(np.sum(counts > 0))
    assume(usable > 0)
    k = data.draw(st.integers(1, usable), label="k")
    result = ns.NearestCenters(centers, counts, metric=metric, top_k=k)(x)
    # cosine: c/|c| of parallel centers may round apart, so a tie may break either way
    assert_nearest(result, x, centers, counts, k, metric, labels_too=metric == "euclidean",
                   rtol=1e-12, atol=1e-12)
