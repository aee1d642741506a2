"""Property tests of the state objects against the formulas of DESIGN.md ("Semantics").

Every reference below is plain float64 numpy written out in the test (never
the library's own helpers). Tolerances: relative `rtol`, plus an absolute
term of `rtol` times the data's scale (its largest magnitude, or its square
for variances), because means and variances of values up to 1e3 can cancel
to (almost) zero, where no relative bound holds for any summation order.
Exact-mode inv_std is checked through the variance it is made of (see
`check_exact_bn`), since 1/sqrt(var + eps) amplifies the variance's rounding
by up to 1/eps.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose, assert_array_equal

import normstats as ns

try:
    from . import strategies as S
except ImportError:  # collected without package context
    import strategies as S

FAST = settings(max_examples=60, deadline=None)
MEDIUM = settings(max_examples=100, deadline=None)


# --------------------------------------------------------------------------- helpers


def rtol_for(dtype: np.dtype) -> float:
    """float64 input: 1e-12; other dtypes are converted and computed in float64: 1e-10."""
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-10


def scale(*values) -> float:
    """Largest magnitude among `values` (arrays or scalars), at least 1."""
    top = 1.0
    for v in values:
        if v is None:
            continue
        v = np.asarray(v, dtype=np.float64)
        if v.size:
            top = max(top, float(np.nanmax(np.abs(v))))
    return top


def close(actual, expected, rtol: float, size: float, power: int = 1, what: str = ""):
    """assert_allclose with an absolute term `rtol * size**power`; NaN == NaN."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert_allclose(actual, expected, rtol=rtol, atol=rtol * size**power, err_msg=what)


def count_over(x: np.ndarray, axes: tuple[int, ...]) -> int:
    return int(np.prod([x.shape[a] for a in axes], dtype=np.int64))


def kept(x: np.ndarray, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for a, s in enumerate(x.shape) if a not in axes)


def check_exact_bn(res: ns.Stats, mean, var, count, rtol: float, size: float, eps: float):
    """Compare an exact BatchNorm result with reference mean/var/count.

    inv_std must be ``1/sqrt(var + eps)`` of the result's own var (to rtol),
    and var must match the reference within ``rtol * size**2``.
    """
    a = res.arrays
    mean_key = "mean" if "mean" in a else "moment_mean"
    close(a[mean_key], mean, rtol, size, 1, "mean")
    close(a["var"], var, rtol, size, 2, "var")
    assert_array_equal(a["count"], np.broadcast_to(float(count), np.shape(mean)))
    if "inv_std" in a:
        assert np.shape(a["inv_std"]) == np.shape(mean)
        assert_allclose(a["inv_std"], 1.0 / np.sqrt(np.asarray(a["var"]) + eps), rtol=1e-14)


def stats_equal(a: ns.Stats, b: ns.Stats):
    """Bit-identical results (used where the arithmetic must be the same)."""
    assert a.kind == b.kind
    assert a.arrays.keys() == b.arrays.keys()
    for key in a.arrays:
        assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    assert a.meta == b.meta


def naive_bn_ema(batches, axes, alpha, eps, ddof, mean0, inv0, shape):
    """Per-batch loop of DESIGN.md 'BatchNorm, mode ema'."""
    mean = None if mean0 is None else np.broadcast_to(np.asarray(mean0, np.float64), shape).copy()
    inv = None if inv0 is None else np.broadcast_to(np.asarray(inv0, np.float64), shape).copy()
    seen = skipped = 0
    for xb in batches:
        if xb.shape[0] == 0:
            continue
        seen += 1
        if count_over(xb, axes) <= ddof:
            skipped += 1
            continue
        x64 = xb.astype(np.float64)
        if mean is not None:
            mean = (1 - alpha) * mean + alpha * np.mean(x64, axis=axes)
        if inv is not None:
            inv = (1 - alpha) * inv + alpha * (1.0 / np.sqrt(np.var(x64, axis=axes, ddof=ddof) + eps))
    return mean, inv, seen, skipped


def naive_centers_ema(batches, k, alpha, init):
    """Per-batch loop of DESIGN.md 'Center, mode ema' on flattened features.

    `init` is (K, F) float64, or the string 'first' (classes take their first
    batch mean; unseen classes stay NaN).
    """
    centers = None
    initialized = None
    for xb, lb in batches:
        flat = xb.reshape(xb.shape[0], -1).astype(np.float64) if xb.shape[0] else None
        if centers is None:
            f = int(np.prod(xb.shape[1:], dtype=np.int64))
            if isinstance(init, str):
                centers = np.full((k, f), np.nan)
                initialized = np.zeros(k, bool)
            else:
                centers = np.array(init, np.float64).reshape(k, f)
                initialized = np.ones(k, bool)
        if flat is None:
            continue
        lb = np.asarray(lb).astype(np.int64)
        for j in np.unique(lb):
            m = flat[lb == j].mean(axis=0)
            if initialized[j]:
                centers[j] = alpha * m + (1 - alpha) * centers[j]
            else:
                centers[j] = m
                initialized[j] = True
    return centers


def ema_batches(x, cuts, batch_size):
    """The logical batches an EMA state sees for chunks `cuts` of x."""
    if batch_size is None:
        return [c for c in np.split(x, cuts) if c.shape[0]]
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


def init_values(draw, shape, lo, hi):
    """None, a scalar, or an array of the statistic's shape."""
    kind = draw(st.sampled_from(["none", "default", "scalar", "array"]))
    if kind == "none":
        return None
    if kind == "default":
        return "default"
    if kind == "scalar":
        return draw(st.floats(lo, hi))
    return draw(hnp.arrays(np.float64, shape, elements=st.floats(lo, hi)))


# --------------------------------------------------------------------------- exact BatchNorm


@MEDIUM
@given(data=st.data(), b=S.batches(), ddof=st.sampled_from([0, 1, 2]), eps=S.epsilons())
def test_exact_batchnorm_is_batching_independent(data, b, ddof, eps):
    """Exact mode: updating chunk by chunk (any chunks, even empty ones) equals one update."""
    x, axes = b.x, b.axes_resolved
    assume(count_over(x, axes) > ddof)
    cuts = data.draw(S.splits(x.shape[0]), label="cuts")
    batch_size = data.draw(st.one_of(st.none(), S.batch_sizes()), label="batch_size")

    whole = ns.BatchNormExact(axes=b.axes, ddof=ddof, eps=eps).update(x).result()
    state = ns.BatchNormExact(axes=b.axes, ddof=ddof, eps=eps, batch_size=batch_size)
    for part in S.chunks(x, cuts):
        assert state.update(part) is state
    chunked = state.result()

    assert chunked.arrays.keys() == whole.arrays.keys()
    a = whole.arrays
    check_exact_bn(chunked, a["mean"], a["var"], count_over(x, axes), rtol_for(x.dtype), scale(x), eps)
    assert chunked.meta["rows_seen"] == whole.meta["rows_seen"] == x.shape[0]


@MEDIUM
@given(
    data=st.data(),
    b=S.batches(),
    ddof=st.sampled_from([0, 1]),
    eps=S.epsilons(),
    use=st.sampled_from([(True, True), (True, False), (False, True)]),
)
def test_exact_batchnorm_equals_numpy(data, b, ddof, eps, use):
    """Exact mode = np.mean / np.var(ddof) in float64 over the axes of the whole array."""
    x, axes = b.x, b.axes_resolved
    n = count_over(x, axes)
    assume(n > ddof)
    cuts = data.draw(S.splits(x.shape[0]), label="cuts")
    state = ns.BatchNormExact(axes=b.axes, ddof=ddof, eps=eps, use_mean=use[0], use_inv_std=use[1])
    for part in S.chunks(x, cuts):
        state.update(part)
    res = state.result()

    x64 = x.astype(np.float64)
    mean = np.mean(x64, axis=axes)
    var = np.var(x64, axis=axes, ddof=ddof)
    assert np.shape(mean) == kept(x, axes)
    assert ("mean" in res.arrays) == use[0]
    assert ("inv_std" in res.arrays) == use[1]
    check_exact_bn(res, mean, var, n, rtol_for(x.dtype), scale(x), eps)
    if use[1]:
        # inv_std against numpy directly, where var dominates its own rounding.
        ref = 1.0 / np.sqrt(var + eps)
        well = var + eps > 1e-6 * scale(x) ** 2
        assert_allclose(res.arrays["inv_std"][well], ref[well], rtol=1e-9)
    assert res.meta["axes"] == list(axes)
    assert res.meta["mode"] == "exact"


@MEDIUM
@given(data=st.data(), b=S.batches(), ddof=st.sampled_from([0, 1]), eps=S.epsilons())
def test_exact_batchnorm_merge_equals_concatenation(data, b, ddof, eps):
    """Fitting shards (2 or 3, some possibly empty) and merging them in any order
    equals one fit on all rows."""
    x, axes = b.x, b.axes_resolved
    assume(count_over(x, axes) > ddof)
    parts_n = data.draw(st.integers(2, 3), label="shards")
    cuts = data.draw(S.splits(x.shape[0], max_cuts=parts_n - 1).filter(
        lambda c: len(c) == parts_n - 1), label="cuts")
    shards = []
    for part in S.chunks(x, cuts):
        state = ns.BatchNormExact(axes=b.axes, ddof=ddof, eps=eps)
        if part.shape[0] or data.draw(st.booleans(), label="update empty shard"):
            state.update(part)
        shards.append(state)
    order = data.draw(st.permutations(range(parts_n)), label="order")
    if data.draw(st.booleans(), label="into fresh state"):
        merged = ns.BatchNormExact(axes=b.axes, ddof=ddof, eps=eps)
    else:
        merged, order = shards[order[0]], order[1:]
    for i in order:
        assert merged.merge(shards[i]) is merged
    res = merged.result()

    whole = ns.BatchNormExact(axes=b.axes, ddof=ddof, eps=eps).update(x).result()
    a = whole.arrays
    check_exact_bn(res, a["mean"], a["var"], count_over(x, axes), rtol_for(x.dtype), scale(x), eps)
    assert res.meta["rows_seen"] == x.shape[0]


# --------------------------------------------------------------------------- Moments


@MEDIUM
@given(data=st.data(), b=S.batches(allow_auto=False))
def test_moments_merge_equals_concatenation_and_numpy(data, b):
    """Moments of shards merged in any order = moments of all rows = numpy."""
    x, axes = b.x, b.axes_resolved
    parts_n = data.draw(st.integers(2, 3), label="shards")
    assume(x.shape[0] >= parts_n)
    cuts = data.draw(S.splits(x.shape[0], max_cuts=parts_n - 1, allow_empty=False).filter(
        lambda c: len(c) == parts_n - 1), label="cuts")
    shards = [ns.Moments(axes).update(part) for part in S.chunks(x, cuts)]
    order = data.draw(st.permutations(range(parts_n)), label="order")
    merged = ns.Moments(axes)
    for i in order:
        assert merged.merge(shards[i]) is merged
    whole = ns.Moments(axes).update(x)

    rtol, size = rtol_for(x.dtype), scale(x)
    x64 = x.astype(np.float64)
    n = count_over(x, axes)
    for m in (merged, whole):
        assert_array_equal(m.count, np.full(kept(x, axes), float(n)))
        close(m.mean, np.mean(x64, axis=axes), rtol, size, 1, "mean")
        close(m.m2, np.var(x64, axis=axes) * n, rtol, size * np.sqrt(n), 2, "m2")  # atol n*size^2
        close(m.variance(0), np.var(x64, axis=axes), rtol, size, 2, "variance(0)")
    close(merged.mean, whole.mean, rtol, size, 1, "merged mean")
    close(merged.m2, whole.m2, rtol, size * np.sqrt(n), 2, "merged m2")
    # variance is NaN exactly where count <= ddof
    assert np.isnan(whole.variance(n)).all()


# --------------------------------------------------------------------------- merge_moments


@st.composite
def moment_sides(draw, shape, allow_zero=True):
    """A (count, mean, m2) triple of `shape`; where count is 0, mean/m2 hold garbage."""
    counts = draw(hnp.arrays(np.float64, shape, elements=st.integers(0 if allow_zero else 1, 1000)))
    means = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e3, 1e3)))
    m2 = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1e8)))
    garbage = st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -7.0])
    junk_mean = draw(hnp.arrays(np.float64, shape, elements=garbage))
    junk_m2 = draw(hnp.arrays(np.float64, shape, elements=garbage))
    means = np.where(counts == 0, junk_mean, means)
    m2 = np.where(counts == 0, junk_m2, m2)
    return counts, means, m2


@MEDIUM
@given(data=st.data(), shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
def test_merge_moments_zero_count_side_returns_the_other(data, shape):
    """Where one side's count is 0 (whatever its mean/m2 hold, even NaN), the merge
    returns the other side's (count, mean, m2) unchanged; a scalar 0 count too."""
    a = data.draw(moment_sides(shape), label="a")
    b = data.draw(moment_sides(shape), label="b")
    for first, second in ((a, b), (b, a)):
        count, mean, m2 = ns.merge_moments(*first, *second)
        only_second = (first[0] == 0) & (second[0] > 0)
        only_first = (second[0] == 0) & (first[0] > 0)
        assert_array_equal(count[only_second], second[0][only_second])
        assert_array_equal(mean[only_second], second[1][only_second])
        assert_array_equal(m2[only_second], second[2][only_second])
        assert_array_equal(count[only_first], first[0][only_first])
        assert_array_equal(mean[only_first], first[1][only_first])
        assert_array_equal(m2[only_first], first[2][only_first])
        both = (first[0] > 0) & (second[0] > 0)
        assert np.isfinite(mean[both]).all() and np.isfinite(m2[both]).all()

    # a scalar zero count on one side (e.g. a fresh accumulator)
    full = data.draw(moment_sides(shape, allow_zero=False), label="full")
    empty = (0, np.full(shape, np.nan), np.full(shape, np.nan))
    for args in ((*empty, *full), (*full, *empty)):
        count, mean, m2 = ns.merge_moments(*args)
        assert_array_equal(count, full[0])
        assert_array_equal(mean, full[1])
        assert_array_equal(m2, full[2])


@MEDIUM
@given(data=st.data(), shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
def test_merge_moments_is_commutative(data, shape):
    """merge(a, b) == merge(b, a) up to rounding (counts exactly)."""
    a = data.draw(moment_sides(shape), label="a")
    b = data.draw(moment_sides(shape), label="b")
    ab = ns.merge_moments(*a, *b)
    ba = ns.merge_moments(*b, *a)
    assert_array_equal(ab[0], ba[0])
    seen = ab[0] > 0
    size = scale(np.where(a[0] > 0, a[1], 0), np.where(b[0] > 0, b[1], 0))
    close(ab[1][seen], ba[1][seen], 1e-12, size, 1, "mean")
    close(ab[2][seen], ba[2][seen], 1e-12, 1.0, 1, "m2")


# --------------------------------------------------------------------------- EMA BatchNorm


@MEDIUM
@given(
    data=st.data(),
    b=S.batches(),
    batch_size=S.batch_sizes(),
    alpha=S.alphas(),
    ddof=st.sampled_from([0, 1, 2]),
    eps=S.epsilons(),
)
def test_ema_batchnorm_independent_of_whole_batch_chunking(data, b, batch_size, alpha, ddof, eps):
    """EMA: any grouping of whole batches into update calls gives the one-call result."""
    x = b.x
    cuts = data.draw(S.batch_splits(x.shape[0], batch_size), label="cuts")
    opts = dict(axes=b.axes, alpha=alpha, ddof=ddof, eps=eps, batch_size=batch_size)
    whole = ns.BatchNormEMA(**opts).update(x).result()
    state = ns.BatchNormEMA(**opts)
    for part in S.chunks(x, cuts):
        assert state.update(part) is state
    chunked = state.result()

    rtol = 1e-12
    close(chunked.arrays["mean"], whole.arrays["mean"], rtol, scale(x), 1, "mean")
    close(chunked.arrays["inv_std"], whole.arrays["inv_std"], rtol, 0.0, 1, "inv_std")
    for key in ("rows_seen", "batches_seen", "batches_skipped"):
        assert chunked.meta[key] == whole.meta[key], key


@MEDIUM
@given(
    data=st.data(),
    b=S.batches(),
    batch_size=st.one_of(st.none(), S.batch_sizes()),
    alpha=S.alphas(),
    ddof=st.sampled_from([0, 1, 2]),
    eps=S.epsilons(),
)
def test_ema_batchnorm_equals_naive_loop(data, b, batch_size, alpha, ddof, eps):
    """EMA = the per-batch recurrence of DESIGN.md, batch by batch in float64.

    With a batch size, chunks hold whole batches; without one, every update
    call is one batch."""
    x, axes = b.x, b.axes_resolved
    shape = kept(x, axes)
    mean0 = init_values(data.draw, shape, -10.0, 10.0)
    inv0 = init_values(data.draw, shape, 0.01, 10.0)
    assume(not (mean0 is None and inv0 is None))
    if batch_size is None:
        cuts = data.draw(S.splits(x.shape[0]), label="cuts")
    else:
        cuts = data.draw(S.batch_splits(x.shape[0], batch_size), label="cuts")
    opts = dict(axes=b.axes, alpha=alpha, ddof=ddof, eps=eps, batch_size=batch_size)
    if not isinstance(mean0, str):  # "default": leave the constructor's default (0.0)
        opts["mean"] = mean0
    if not isinstance(inv0, str):  # "default": 1.0
        opts["inv_std"] = inv0
    state = ns.BatchNormEMA(**opts)
    for part in S.chunks(x, cuts):
        state.update(part)
    res = state.result()

    ref_mean0 = 0.0 if isinstance(mean0, str) else mean0
    ref_inv0 = 1.0 if isinstance(inv0, str) else inv0
    mean, inv, seen, skipped = naive_bn_ema(
        ema_batches(x, cuts, batch_size), axes, alpha, eps, ddof, ref_mean0, ref_inv0, shape
    )
    assert ("mean" in res.arrays) == (mean is not None)
    assert ("inv_std" in res.arrays) == (inv is not None)
    rtol = 1e-9
    if mean is not None:
        close(res.arrays["mean"], mean, rtol, scale(x, ref_mean0), 1, "mean")
    if inv is not None:
        close(res.arrays["inv_std"], inv, rtol, 0.0, 1, "inv_std")
    assert res.meta["batches_seen"] == seen
    assert res.meta["batches_skipped"] == skipped
    assert res.meta["rows_seen"] == x.shape[0]


# --------------------------------------------------------------------------- centers


@st.composite
def center_inits(draw, k, row_shape, allow_random=False):
    choices = ["zeros", "first", "array"] + (["random"] if allow_random else [])
    kind = draw(st.sampled_from(choices))
    if kind != "array":
        return kind
    f = int(np.prod(row_shape, dtype=np.int64))
    shape = draw(st.sampled_from([(k, f), (k,) + tuple(row_shape)]))
    return draw(hnp.arrays(np.float64, shape, elements=st.floats(-10, 10)))


@MEDIUM
@given(
    data=st.data(),
    d=S.labelled(),
    batch_size=st.one_of(st.none(), S.batch_sizes()),
    alpha=S.alphas(),
)
def test_centers_ema_equals_naive_loop(data, d, batch_size, alpha):
    """Center EMA = for each batch and each class present,
    C[j] <- alpha * mean_j + (1 - alpha) * C[j]; absent classes unchanged."""
    x, lab, k = d.x, d.labels, d.k
    init = data.draw(center_inits(k, x.shape[1:]), label="init")
    if batch_size is None:
        cuts = data.draw(S.splits(x.shape[0], allow_empty=False), label="cuts")
    else:
        cuts = data.draw(S.batch_splits(x.shape[0], batch_size, allow_empty=False), label="cuts")
    state = ns.CentersEMA(k, alpha=alpha, init=init, batch_size=batch_size)
    for part, lb in S.chunks(x, cuts, lab):
        assert state.update(part, lb) is state
    res = state.result()

    if batch_size is None:
        batches = S.chunks(x, cuts, lab)
    else:
        batches = [(x[i : i + batch_size], lab[i : i + batch_size])
                   for i in range(0, x.shape[0], batch_size)]
    f = int(np.prod(x.shape[1:], dtype=np.int64))
    ref_init = np.zeros((k, f)) if isinstance(init, str) and init == "zeros" else init
    ref = naive_centers_ema(batches, k, alpha, ref_init)

    centers = res.arrays["centers"]
    assert centers.shape == (k,) + x.shape[1:]
    close(centers.reshape(k, -1), ref, 1e-9, scale(x, 10.0), 1, "centers")
    assert_array_equal(res.arrays["counts"], np.bincount(lab.astype(np.int64), minlength=k))
    assert res.meta["rows_seen"] == x.shape[0]
    assert res.meta["batches_seen"] == len(batches)


@MEDIUM
@given(data=st.data(), d=S.labelled(), batch_size=S.batch_sizes(), alpha=S.alphas())
def test_centers_ema_independent_of_whole_batch_chunking(data, d, batch_size, alpha):
    """Center EMA: grouping whole batches into update calls does not matter."""
    x, lab, k = d.x, d.labels, d.k
    init = data.draw(center_inits(k, x.shape[1:], allow_random=True), label="init")
    cuts = data.draw(S.batch_splits(x.shape[0], batch_size, allow_empty=False), label="cuts")
    whole = ns.CentersEMA(k, alpha=alpha, init=init, batch_size=batch_size).update(x, lab).result()
    state = ns.CentersEMA(k, alpha=alpha, init=init, batch_size=batch_size)
    for part, lb in S.chunks(x, cuts, lab):
        state.update(part, lb)
    chunked = state.result()
    close(chunked.arrays["centers"], whole.arrays["centers"], 1e-12, scale(x, 10.0), 1, "centers")
    assert_array_equal(chunked.arrays["counts"], whole.arrays["counts"])
    assert chunked.meta["batches_seen"] == whole.meta["batches_seen"]


@MEDIUM
@given(data=st.data(), d=S.labelled())
def test_centers_exact_equals_numpy_and_merges(data, d):
    """Exact centers = per-class float64 mean (var with ddof 0, NaN and count 0 for
    unseen classes), whether fitted in chunks or as merged shards in any order."""
    x, lab, k = d.x, d.labels, d.k
    cuts = data.draw(S.splits(x.shape[0], allow_empty=False), label="cuts")
    chunked = ns.CentersExact(k)
    for part, lb in S.chunks(x, cuts, lab):
        chunked.update(part, lb)

    shards = [ns.CentersExact(k).update(part, lb) for part, lb in S.chunks(x, cuts, lab)]
    shards += [ns.CentersExact(k)] * data.draw(st.integers(0, 1), label="empty shards")
    order = data.draw(st.permutations(range(len(shards))), label="order")
    merged = ns.CentersExact(k)
    for i in order:
        assert merged.merge(shards[i]) is merged

    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    lab64 = lab.astype(np.int64)
    counts = np.bincount(lab64, minlength=k)
    ref_c = np.full((k, flat.shape[1]), np.nan)
    ref_v = np.full((k, flat.shape[1]), np.nan)
    for j in range(k):
        if counts[j]:
            ref_c[j] = flat[lab64 == j].mean(axis=0)
            ref_v[j] = flat[lab64 == j].var(axis=0)
    rtol, size = rtol_for(x.dtype), scale(x)
    for res in (chunked.result(), merged.result()):
        assert res.arrays["centers"].shape == (k,) + x.shape[1:]
        close(res.arrays["centers"].reshape(k, -1), ref_c, rtol, size, 1, "centers")
        close(res.arrays["var"].reshape(k, -1), ref_v, rtol, size, 2, "var")
        assert_array_equal(res.arrays["counts"], counts)
        assert res.meta["classes_unseen"] == int(np.sum(counts == 0))
        assert res.meta["rows_seen"] == x.shape[0]


@FAST
@given(
    data=st.data(),
    d=S.labelled(min_rows=1),
    mode=st.sampled_from(["exact", "ema"]),
)
def test_centers_accept_an_empty_update(data, d, mode):
    """A zero-row update (an empty block or shard, anywhere in the stream) is a
    no-op, as it is for BatchNorm: same result as without it."""
    x, lab, k = d.x, d.labels, d.k
    at = data.draw(st.integers(0, x.shape[0]), label="empty update before row")
    make = (lambda: ns.CentersExact(k)) if mode == "exact" else (
        lambda: ns.CentersEMA(k, init="zeros", alpha=0.5))
    ref = make()
    for part, lb in S.chunks(x, [at], lab):
        if part.shape[0]:
            ref.update(part, lb)
    state = make()
    if at:
        state.update(x[:at], lab[:at])
    state.update(x[at:at], lab[at:at])  # the empty block
    if at < x.shape[0]:
        state.update(x[at:], lab[at:])
    stats_equal(state.result(), ref.result())


# --------------------------------------------------------------------------- finiteness


@MEDIUM
@given(
    b=S.batches(wide=True),
    batch_size=st.one_of(st.none(), S.batch_sizes()),
    alpha=S.alphas(),
    eps=S.epsilons(),
    ddof=st.sampled_from([0, 1]),
)
def test_batchnorm_results_are_finite(b, batch_size, alpha, eps, ddof):
    """Finite input (any magnitude float16/float32 can hold) gives finite statistics
    and a positive, finite inv_std, in both modes; eps <= 0 is refused."""
    x, axes = b.x, b.axes_resolved
    ema = ns.BatchNormEMA(axes=b.axes, alpha=alpha, eps=eps, ddof=ddof, batch_size=batch_size)
    results = [ema.update(x).result()]
    if count_over(x, axes) > ddof:
        results.append(ns.BatchNormExact(axes=b.axes, eps=eps, ddof=ddof).update(x).result())
    for res in results:
        for key, value in res.arrays.items():
            assert np.isfinite(value).all(), key
        assert (res.arrays["inv_std"] > 0).all()
        assert res.meta["eps"] > 0
        if "var" in res.arrays:
            assert (res.arrays["var"] >= 0).all()
    for bad in (0.0, -eps):
        with pytest.raises(ns.UsageError):
            ns.BatchNormEMA(eps=bad)
        with pytest.raises(ns.UsageError):
            ns.BatchNormExact(eps=bad)
    with pytest.raises(ns.UsageError):
        ns.BatchNormEMA(mean=None, inv_std=None)


@MEDIUM
@given(
    data=st.data(),
    d=S.labelled(),
    batch_size=st.one_of(st.none(), S.batch_sizes()),
    alpha=S.alphas(),
)
def test_centers_never_nan_for_seen_classes(data, d, batch_size, alpha):
    """Every class that occurs in the labels has a finite center in every mode/init;
    exact mode marks unseen classes with NaN and count 0 (never a silent zero)."""
    x, lab, k = d.x, d.labels, d.k
    seen = np.bincount(lab.astype(np.int64), minlength=k) > 0
    states = [ns.CentersExact(k, batch_size=batch_size)] + [
        ns.CentersEMA(k, alpha=alpha, init=init, batch_size=batch_size)
        for init in ("random", "zeros", "first")
    ]
    for state in states:
        res = state.update(x, lab).result()
        centers = res.arrays["centers"].reshape(k, -1)
        assert np.isfinite(centers[seen]).all(), (state.mode, getattr(state, "init", None))
        assert_array_equal(res.arrays["counts"] > 0, seen)
    exact = states[0].result().arrays
    assert np.isnan(exact["centers"].reshape(k, -1)[~seen]).all()
    assert np.isnan(exact["var"].reshape(k, -1)[~seen]).all()


# --------------------------------------------------------------------------- axes


@FAST
@given(b=S.batches(), ddof=st.sampled_from([0, 1]))
def test_axes_spelling_does_not_matter(b, ddof):
    """Negative and permuted axes (and 'auto') mean their sorted non-negative form;
    statistics have the kept axes' shape."""
    x, axes = b.x, b.axes_resolved
    for cls in (ns.BatchNormEMA, ns.BatchNormExact):
        if cls is ns.BatchNormExact and count_over(x, axes) <= ddof:
            continue
        spelled = cls(axes=b.axes, ddof=ddof, batch_size=3).update(x).result()
        plain = cls(axes=axes, ddof=ddof, batch_size=3).update(x).result()
        stats_equal(spelled, plain)
        for key in ("mean", "inv_std"):
            assert spelled.arrays[key].shape == kept(x, axes)


# --------------------------------------------------------------------------- pickling


def _bn_ema():
    return ns.BatchNormEMA(axes="auto", alpha=0.3, batch_size=3)


def _bn_exact():
    return ns.BatchNormExact(axes="auto", ddof=0)


STATE_MAKERS = {
    "BatchNormEMA": (_bn_ema, False),
    "BatchNormExact": (_bn_exact, False),
    "CentersEMA": (lambda: ns.CentersEMA(4, alpha=0.4, init="first", batch_size=3), True),
    "CentersExact": (lambda: ns.CentersExact(4), True),
}


@pytest.mark.parametrize("name", sorted(STATE_MAKERS))
@FAST
@given(data=st.data(), x=S.arrays(shape=S.shapes(max_rank=4, min_rows=1)))
def test_pickled_state_continues_identically(name, data, x):
    """A state pickled mid-stream (as sent to a Dask worker) and continued gives
    exactly the result of the original continued the same way."""
    make, labelled = STATE_MAKERS[name]
    lab = data.draw(S.labels(x.shape[0], 4), label="labels") if labelled else None
    cut = data.draw(st.integers(0, x.shape[0]), label="pickle after row")
    cut = cut - cut % 3 if name.endswith("EMA") else cut  # whole batches before the pickle

    def feed(state, lo, hi):
        if hi > lo:
            if labelled:
                state.update(x[lo:hi], lab[lo:hi])
            else:
                state.update(x[lo:hi])

    original = make()
    feed(original, 0, cut)
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is type(original)
    feed(copy, cut, x.shape[0])
    feed(original, cut, x.shape[0])
    stats_equal(copy.result(), original.result())

    # the copy is independent of the original: feeding the original again changes only it
    before = copy.result()
    feed(original, 0, x.shape[0])
    stats_equal(copy.result(), before)


@FAST
@given(data=st.data(), b=S.batches(allow_auto=False))
def test_pickled_moments_continue_identically(data, b):
    x, axes = b.x, b.axes_resolved
    cut = data.draw(st.integers(1, x.shape[0]), label="pickle after row")
    original = ns.Moments(axes).update(x[:cut])
    copy = pickle.loads(pickle.dumps(original))
    if cut < x.shape[0]:
        original.update(x[cut:])
        copy.update(x[cut:])
    for name in ("count", "mean", "m2"):
        assert_array_equal(getattr(copy, name), getattr(original, name), err_msg=name)


# --------------------------------------------------------------------------- resume

RESUMABLE = {
    "BatchNormEMA": (
        lambda: ns.BatchNormEMA(alpha=0.3, batch_size=3),
        lambda stats: ns.BatchNormEMA.from_stats(stats, alpha=0.3, batch_size=3),
        False,
    ),
    "BatchNormExact": (
        lambda: ns.BatchNormExact(ddof=1, batch_size=3),
        lambda stats: ns.BatchNormExact.from_stats(stats, batch_size=3),
        False,
    ),
    "CentersEMA": (
        lambda: ns.CentersEMA(4, alpha=0.4, init="first", batch_size=3),
        lambda stats: ns.CentersEMA.from_stats(stats, alpha=0.4, batch_size=3),
        True,
    ),
    "CentersExact": (
        lambda: ns.CentersExact(4, batch_size=3),
        lambda stats: ns.CentersExact.from_stats(stats, batch_size=3),
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
@FAST
@given(data=st.data(), x=S.arrays(shape=S.shapes(max_rank=4, min_rows=4)))
def test_resume_from_result_continues_the_fit(name, data, x):
    """Continuing from a mid-stream result (the stats file's content, cut at whole
    batches) gives the uninterrupted fit: same arrays up to rounding, same counters."""
    make, resume, labelled = RESUMABLE[name]
    lab = data.draw(S.labels(x.shape[0], 4), label="labels") if labelled else None
    cut = 3 * data.draw(st.integers(1, (x.shape[0] - 1) // 3), label="batches before resume")

    def feed(state, lo, hi):
        return state.update(x[lo:hi], lab[lo:hi]) if labelled else state.update(x[lo:hi])

    first = feed(make(), 0, cut)
    if name == "BatchNormExact":
        assume(count_over(x[:cut], first.axes) > 1)
    resumed = feed(resume(first.result()), cut, x.shape[0]).result()
    whole = feed(make(), 0, x.shape[0]).result()

    assert resumed.arrays.keys() == whole.arrays.keys()
    size = scale(x)
    for key, value in whole.arrays.items():
        power = 2 if key == "var" else 1
        close(resumed.arrays[key], value, 1e-10, size if key != "inv_std" else 0.0, power, key)
    for key in ("rows_seen", "batches_seen", "batches_skipped", "classes_unseen", "axes"):
        assert resumed.meta.get(key) == whole.meta.get(key), key
