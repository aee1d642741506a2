"""The grouped shifted-moments kernel and the estimators folded over it,
against the plain-NumPy references of tests/reference.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import normstats as ns
from normstats.kernels import Layout, accumulate, slot_rows
from tests.reference import (SHAPES, make_data, ref_axes, ref_bn_ema, ref_bn_exact, ref_centers_ema,
                       ref_centers_exact)

DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int64", "uint64"]


def close(actual, expected, rtol=1e-12, atol=0.0):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, equal_nan=True)


def _one_group(x, axes):
    layout = Layout.of(x.shape[1:], axes)
    sums = accumulate(x, layout, np.zeros(len(x), np.int64), np.zeros(1, np.int64),
                      np.zeros((1, layout.stats)), np.ones(1, bool))
    return layout, sums


@pytest.mark.parametrize("shape, axes", SHAPES)
def test_kernel_sums_match_numpy_for_every_rank_and_axes(shape, axes):
    x = make_data(shape, "float64", seed=3)
    resolved = ref_axes(axes, x.ndim)
    layout, sums = _one_group(x, resolved)
    mean = x.mean(axis=resolved).reshape(-1)
    m2 = (x.var(axis=resolved) * (x.size / mean.size)).reshape(-1)
    assert layout.stats == mean.size and layout.per_stat * layout.stats == x[0].size
    close(sums.means(layout.per_stat)[0], mean)
    close(sums.m2(layout.per_stat)[0], m2, rtol=1e-11)
    assert sums.rows.tolist() == [len(x)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axes", [SHAPES[1], SHAPES[3], SHAPES[7]])
def test_kernel_reads_every_dtype_in_place(dtype, shape, axes):
    x = make_data(shape, dtype, seed=5)
    resolved = ref_axes(axes, x.ndim)
    _, sums = _one_group(x, resolved)
    wide = x.astype(np.float64)
    close(sums.means(Layout.of(x.shape[1:], resolved).per_stat)[0], wide.mean(axis=resolved).reshape(-1),
          rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("code", ["f2", "f4", "f8", "i2", "i8"])
def test_native_data_named_with_an_explicit_byte_order_is_not_copied(code):
    # HDF5 reports little-endian data as '<f4', whose byteorder is '<' and not '=': read
    # in place all the same (a copy of every block halved fit-bn's speed on HDF5).
    from normstats.kernels import _as_rows

    native = "<" if np.little_endian else ">"
    x = make_data((16, 3, 4), np.dtype(code), seed=2)
    x = x.view(x.dtype.newbyteorder(native))  # as h5py makes it (np.dtype('<f4') would be '=f4')
    flat, _ = _as_rows(x)
    assert np.shares_memory(flat, x)
    swapped = x.astype(x.dtype.newbyteorder(">" if native == "<" else "<"))
    flat, table = _as_rows(swapped)
    assert not np.shares_memory(flat, swapped) and flat.dtype.isnative
    _, a = _one_group(x, (0,))
    _, b = _one_group(swapped, (0,))
    close(a.means(Layout.of(x.shape[1:], (0,)).per_stat), b.means(Layout.of(x.shape[1:], (0,)).per_stat),
          rtol=0, atol=0)


@pytest.mark.parametrize("shape, axes", SHAPES)
def test_exact_batchnorm_over_blocks_equals_the_reference(shape, axes):
    x = make_data((37,) + shape[1:], "float32", seed=8)
    state = ns.BatchNormExact(axes=axes, ddof=1)
    for start in range(0, len(x), 5):
        state.update(x[start:start + 5])
    mean, var, inv_std = ref_bn_exact(x, axes, ddof=1)
    result = state.result().arrays
    close(result["mean"], mean, rtol=1e-12)
    close(result["var"], var, rtol=1e-10)
    close(result["inv_std"], inv_std, rtol=1e-10)


@pytest.mark.parametrize("batch_size", [1, 2, 7, 37, 38])
@pytest.mark.parametrize("shape, axes", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[8]])
def test_ema_batchnorm_for_any_batch_size_equals_the_reference(batch_size, shape, axes):
    x = make_data((37,) + shape[1:], "float64", seed=9)
    state = ns.BatchNormEMA(axes=axes, alpha=0.2, batch_size=batch_size, ddof=1)
    mean, inv_std, batches, skipped = ref_bn_ema(x, batch_size, axes, alpha=0.2, ddof=1)
    result = state.update(x).result()
    close(result.arrays["mean"], mean)
    close(result.arrays["inv_std"], inv_std)
    assert (result.meta["batches_seen"], result.meta["batches_skipped"]) == (batches, skipped)


@pytest.mark.parametrize("num_classes", [1, 3, 50])  # K = 1, K < rows, K > rows
def test_exact_centers_equal_the_reference_for_any_number_of_classes(num_classes):
    rng = np.random.default_rng(4)
    x = make_data((23, 2, 3), "float32", seed=4)
    labels = rng.integers(0, num_classes, 23)
    state = ns.CentersExact(num_classes)
    for start in range(0, 23, 6):
        state.update(x[start:start + 6], labels[start:start + 6])
    centers, counts, var = ref_centers_exact(x, labels, num_classes)
    result = state.result().arrays
    close(result["centers"], centers, rtol=1e-12)
    close(result["var"], var, rtol=1e-9, atol=1e-12)
    assert np.array_equal(result["counts"], counts)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 23, 24])
@pytest.mark.parametrize("num_classes", [1, 4, 40])
def test_ema_centers_equal_the_reference(batch_size, num_classes):
    rng = np.random.default_rng(6)
    x = make_data((23, 3), "float64", seed=6)
    labels = rng.integers(0, num_classes, 23)
    state = ns.CentersEMA(num_classes, alpha=0.3, init="zeros", batch_size=batch_size)
    state.update(x, labels)
    centers, counts = ref_centers_ema(x, labels, num_classes, batch_size, alpha=0.3)
    result = state.result().arrays
    close(result["centers"], centers, rtol=1e-12, atol=1e-15)
    assert np.array_equal(result["counts"], counts)


def test_groups_present_in_one_block_only_keep_their_statistics():
    rng = np.random.default_rng(10)
    x = make_data((60, 4), "float64", seed=10)
    groups = np.r_[np.zeros(20, int), np.full(20, 2), rng.integers(0, 3, 20)]
    groups[:20] = 1  # group 1 only in the first block, group 2 only in the second
    groups[20:40] = 2
    groups[40:] = 0
    state = ns.BatchNormExact(num_groups=4, ddof=0)
    for start in range(0, 60, 20):
        state.update(x[start:start + 20], groups=groups[start:start + 20])
    result = state.result()
    for g in range(3):
        mean, var, _ = ref_bn_exact(x[groups == g], ddof=0)
        close(result.arrays["mean"][g], mean)
        close(result.arrays["var"][g], var, rtol=1e-10)
    assert result.meta["groups_unseen"] == 1 and result.arrays["group_rows"].tolist() == [20, 20, 20, 0]


def test_slot_rows_numbers_batch_class_pairs_in_order():
    lookup = np.full(5, -1, np.int64)
    slots, keys = slot_rows(np.array([3, 1, 3, -1, 1, 4]), 5, lookup, batch=3)
    assert slots.tolist() == [0, 1, 0, -1, 2, 3]
    assert keys.tolist() == [3, 1, 5 + 1, 5 + 4]
    assert (lookup == -1).all()  # the scratch is left clean


def test_large_offsets_keep_their_variance():
    rng = np.random.default_rng(0)
    x = 1e15 + rng.normal(0.0, 5.0, (20_000, 2))
    stats = ns.BatchNormExact(ddof=1).update(x).result()
    reference = np.var(x - 1e15, axis=0, ddof=1)  # the subtraction is exact (Sterbenz)
    close(stats.arrays["var"], reference, rtol=1e-12)
    assert stats.meta["near_constant_count"] == 0
    assert np.all(np.abs(stats.arrays["inv_std"] - 0.2) < 0.002)


def test_int64_near_2_62_keeps_every_digit_of_its_spread():
    x = (np.int64(2) ** 62 + np.arange(1000, dtype=np.int64)).reshape(-1, 1)
    stats = ns.BatchNormExact(ddof=0).update(x[:400]).update(x[400:]).result()
    close(stats.arrays["var"], np.var(np.arange(1000.0)), rtol=1e-13)
    assert stats.meta["near_constant_count"] == 0


def test_weighted_and_omitted_values_match_numpy():
    x = make_data((40, 3), "float64", seed=12)
    x[[2, 9], [1, 0]] = np.nan
    w = np.random.default_rng(12).uniform(0, 2, 40)
    m = ns.Moments((0,), nan_policy="omit").update(x[:13], w[:13]).update(x[13:], w[13:])
    finite = np.isfinite(x)
    ww = np.where(finite, w[:, None], 0.0)
    xx = np.where(finite, x, 0.0)
    mean = (ww * xx).sum(0) / ww.sum(0)
    close(m.count, ww.sum(0))
    close(m.mean, mean)
    close(m.m2, (ww * (xx - mean) ** 2).sum(0), rtol=1e-11)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), cut=st.integers(0, 30), groups=st.integers(1, 6), seed=st.integers(0, 99))
def test_split_and_merged_grouped_moments_equal_one_pass(rows, cut, groups, seed):
    """Invariant: any split of the rows, fitted apart and merged, is one fit."""
    rng = np.random.default_rng(seed)
    x = 1e6 + rng.standard_normal((rows, 2, 3)).astype(np.float32)
    g = rng.integers(0, groups, rows)
    cut = min(cut, rows)
    whole = ns.GroupedMoments(groups, (0, 2)).update(x, g)
    a = ns.GroupedMoments(groups, (0, 2)).update(x[:cut], g[:cut])
    b = ns.GroupedMoments(groups, (0, 2)).update(x[cut:], g[cut:])
    merged = a.merge(b)
    assert np.array_equal(merged.rows, whole.rows) and np.array_equal(merged.count, whole.count)
    close(merged.mean, whole.mean, rtol=1e-13)
    close(merged.m2, whole.m2, rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), seed=st.integers(0, 99))
def test_kernel_counts_every_row_once(rows, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 5, rows)
    lookup = np.full(5, -1, np.int64)
    slots, keys = slot_rows(labels, 5, lookup)
    layout = Layout.of((2,), (0,))
    sums = accumulate(rng.standard_normal((rows, 2)), layout, slots, keys, np.zeros((len(keys), 2)),
                      np.ones(len(keys), bool))
    assert sums.rows.sum() == np.count_nonzero(labels >= 0)
    assert dict(zip(keys.tolist(), sums.rows.tolist())) == {
        int(k): int(np.sum(labels == k)) for k in np.unique(labels[labels >= 0])}


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".json", ".safetensors"])
def test_stats_files_keep_a_single_runs_precision_at_1e15(tmp_path, suffix):
    x = 1e15 + np.random.default_rng(3).normal(0.0, 5.0, (30_000, 3))
    one = ns.BatchNormExact().update(x).result()
    halves = [ns.BatchNormExact().update(part).result() for part in (x[:11_000], x[11_000:])]
    paths = [str(tmp_path / f"{name}{suffix}") for name in "ab"]
    for stats, path in zip(halves, paths):
        ns.write_stats(stats, path)
    merged = ns.merge_stats([ns.read_stats(p) for p in paths])
    continued = ns.BatchNormExact.from_stats(ns.read_stats(paths[0])).update(x[11_000:]).result()
    for stats in (merged, continued):
        close(stats.arrays["var"], one.arrays["var"], rtol=1e-14)
        close(stats.arrays["mean"] + stats.arrays["mean_low"], one.arrays["mean"] + one.arrays["mean_low"],
              rtol=1e-16)


def test_old_files_without_mean_low_still_continue():
    x = np.random.default_rng(2).normal(3.0, 1.0, (500, 2))
    first = ns.BatchNormExact().update(x[:200]).result()
    del first.arrays["mean_low"]
    continued = ns.BatchNormExact.from_stats(first).update(x[200:]).result()
    _, var, _ = ref_bn_exact(x)
    close(continued.arrays["var"], var, rtol=1e-12)


def test_groups_too_small_for_ddof_are_reported_not_fatal():
    x = np.random.default_rng(1).normal(size=(30, 2))
    groups = np.zeros(30, np.int64)
    groups[7] = 1  # one row: no variance with ddof=1
    stats = ns.BatchNormExact(num_groups=3, ddof=1).update(x, groups=groups).result()
    assert stats.meta["groups_too_small"] == 1 and stats.meta["groups_too_small_list"] == [1]
    assert stats.meta["groups_unseen"] == 1
    assert np.isnan(stats.arrays["var"][1]).all() and np.isfinite(stats.arrays["var"][0]).all()
    _, var, _ = ref_bn_exact(x[groups == 0])
    close(stats.arrays["var"][0], var)


def test_all_zero_weights_and_all_nan_features_end_in_one_clear_error():
    x = np.random.default_rng(1).normal(size=(20, 2))
    with pytest.raises(ns.DataError, match="every weight is 0"):
        ns.BatchNormExact().update(x, weights=np.zeros(20)).result()
    with pytest.raises(ns.DataError, match="every weight is 0"):
        ns.CentersExact(2).update(x, np.zeros(20, int), np.zeros(20)).result()
    with pytest.raises(ns.DataError, match="left out"):
        ns.BatchNormExact(nan_policy="omit").update(np.full((20, 2), np.nan)).result()
    partly = x.copy()
    partly[:, 1] = np.nan
    stats = ns.BatchNormExact(nan_policy="omit").update(partly).result()
    assert stats.meta["too_small_count"] == 1 and stats.meta["too_small"] == [1]


def test_an_ema_batch_spanning_updates_equals_one_batch():
    x = make_data((50, 3), "float64", seed=21)
    whole = ns.BatchNormEMA(alpha=0.3, batch_size=20).update(x).result()
    pieces = ns.BatchNormEMA(alpha=0.3, batch_size=20)
    for start in range(0, 50, 7):
        pieces.update(x[start:start + 7], more=True)
    assert pieces.open_rows == 10
    assert pieces.result().meta["batches_seen"] == 3 and pieces.open_rows == 10  # result leaves it open
    stats = pieces.close().result()
    for key in ("mean", "inv_std"):
        close(stats.arrays[key], whole.arrays[key])
    assert stats.meta["batches_seen"] == whole.meta["batches_seen"] == 3


def test_a_fit_with_batches_larger_than_a_block_reads_blocks_not_batches(tmp_path, monkeypatch):
    import normstats.stream as read_blocks

    x = make_data((300, 40), "float32", seed=22)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", 16 * 40 * 4)  # 16-row blocks, 64-row batches
    seen = []
    original = ns.BatchNormEMA.update

    def spy(self, block, **kwargs):
        seen.append(len(block))
        return original(self, block, **kwargs)

    monkeypatch.setattr(ns.BatchNormEMA, "update", spy)
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        stats = ns.run_fit(ns.BatchNormEMA(alpha=0.2, batch_size=64), stream)
    assert max(seen) == 16
    mean, inv_std, batches, _ = ref_bn_ema(x, 64, alpha=0.2)
    close(stats.arrays["mean"], mean)
    close(stats.arrays["inv_std"], inv_std)
    assert stats.meta["batches_seen"] == batches


def test_numba_cache_goes_to_a_user_folder_when_the_package_is_read_only(monkeypatch, tmp_path):
    from normstats import compiled

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(compiled.os, "access", lambda path, mode: False)
    compiled._cache_dir()
    assert compiled.os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "normstats" / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/elsewhere")  # a folder the user chose wins
    compiled._cache_dir()
    assert compiled.os.environ["NUMBA_CACHE_DIR"] == "/elsewhere"


def test_column_halves_in_threads_give_the_single_thread_numbers(monkeypatch):
    import normstats.kernels as kernels

    rng = np.random.default_rng(30)
    x = make_data((500, 130), "float32", seed=30)
    labels = rng.integers(0, 7, 500)
    single = ns.CentersExact(7).update(x, labels).result().arrays
    monkeypatch.setattr(kernels, "PARALLEL_STATE_BYTES", 0)
    monkeypatch.setattr(kernels, "PARALLEL_ELEMENTS", 0)
    assert kernels._columns_in_threads(x, np.zeros((7, 130)))
    threaded = ns.CentersExact(7).update(x[:200], labels[:200]).update(x[200:], labels[200:]).result().arrays
    centers, counts, var = ref_centers_exact(x, labels, 7)
    close(threaded["centers"], centers, rtol=1e-12)
    close(threaded["var"], var, rtol=1e-9)
    close(threaded["centers"], single["centers"], rtol=1e-13)


def test_optional_parts_compile_no_variant_of_their_own():
    """Weights or none, squares or none, a read-only or a writable block, terms or
    statistics left out: the kernels already loaded for a dtype and layout serve
    them all (each variant is some 0.4 s of compiling on a cold cache)."""
    from normstats import compiled, compiled_fold

    kernels = [getattr(compiled, name) for name in ("_accumulate", "_update_groups", "_normalize_rows")]
    kernels.append(compiled_fold._ema_fold)
    x = np.random.default_rng(5).normal(size=(6, 4)).astype(np.float32)
    frozen = x.copy()
    frozen.flags.writeable = False
    labels = np.array([0, 1, 0, 2, 1, 0])

    def run(block, *, weights=None, **options):
        layout = Layout.of((4,), (0,))
        accumulate(block, layout, np.zeros(6, np.int64), np.zeros(1, np.int64), None, np.ones(1, bool),
                   weights=weights, squares=options.get("squares", True))
        ns.CentersExact(3).update(block, labels, weights)
        ns.BatchNormEMA(batch_size=3, mean=options.get("mean", 0.0)).update(block)
        stats = ns.BatchNormExact().update(x).result()
        ns.Normalizer(stats, beta=options.get("beta", 0.0))(block)

    run(x)
    before = [set(kernel.signatures) for kernel in kernels]
    run(frozen, weights=np.full(6, 0.5), squares=False, mean=None, beta=1.0)
    assert [set(kernel.signatures) for kernel in kernels] == before


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), groups=st.integers(1, 400), seed=st.integers(0, 999),
       dtype=st.sampled_from(["float16", "float32", "int8", "int64"]), weighted=st.booleans(),
       cut=st.integers(0, 40), threads=st.booleans())
def test_rows_folded_in_runs_of_their_group_match_numpy(rows, groups, seed, dtype, weighted, cut, threads):
    """Rows sorted by group (a counting sort for few groups, a comparison sort for
    many), each group's run merged once, in one thread or two column halves: the
    weighted mean and M2 of every group (zero weights inside a run, skipped rows,
    groups absent from one of two blocks) as plain NumPy gives them."""
    with pytest.MonkeyPatch.context() as patch:
        if threads:
            patch.setattr("normstats.kernels.PARALLEL_STATE_BYTES", 0)
            patch.setattr("normstats.kernels.PARALLEL_ELEMENTS", 0)
        _check_runs(rows, groups, seed, dtype, weighted, cut)


def _check_runs(rows, groups, seed, dtype, weighted, cut):
    rng = np.random.default_rng(seed)
    x = make_data((rows, 70), dtype, seed=seed)
    g = rng.integers(-1, min(groups, 5) if seed % 2 else groups, rows)  # few groups: long runs
    w = np.where(rng.random(rows) < 0.3, 0.0, rng.uniform(0.1, 3.0, rows)) if weighted else None
    cut = min(cut, rows)
    state = ns.GroupedMoments(groups, (0,))
    for part in (slice(0, cut), slice(cut, rows)):
        state.update(x[part], g[part], None if w is None else w[part])
    values = x.astype(np.float64)
    weight = np.ones(rows) if w is None else w
    for k in range(groups):
        mine = (g == k) & (weight > 0)
        assert state.rows[k] == np.count_nonzero(g == k)
        if not mine.any():
            assert np.all(state.count[k] == 0)
            continue
        total = weight[mine].sum()
        mean = (weight[mine, None] * values[mine]).sum(0) / total
        m2 = (weight[mine, None] * (values[mine] - mean) ** 2).sum(0)
        close(state.count[k], np.full(70, total), rtol=1e-14)
        close(state.mean[k], mean, rtol=1e-12, atol=1e-12)
        close(state.m2[k], m2, rtol=1e-9, atol=1e-9 * (1 + np.abs(mean).max()) ** 2)


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(-3, 9), max_size=60))
def test_the_counting_sort_is_a_stable_sort_with_skipped_rows_first(labels):
    from normstats.kernels import compiled_kernels

    groups = np.array(labels, np.int64)
    start = np.zeros(11, np.int64)
    order = np.empty(len(groups), np.int64)
    compiled_kernels()._order_by_group(groups, start, order)
    key = np.where(groups < 0, -1, groups)
    assert np.array_equal(order, np.argsort(key, kind="stable"))
    assert not start.any()  # the scratch is left as found
