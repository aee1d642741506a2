"""The numba-compiled loops behind :mod:`normstats.kernels` (see its docstring for
what they compute and their error bound).

Imported on first use only, so that commands that compute nothing (inspect,
merge, export) do not pay numba's start-up; compiled once per input dtype and
variant, and cached on disk (``cache=True``), in a user-wide folder when the
package folder is read-only.
"""

from __future__ import annotations

import os

import numpy as np


def _cache_dir() -> None:
    """Send numba's cache to a user-wide folder when the package folder is read-only
    (numba's own fallback only covers some layouts)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    if os.access(here if os.path.isdir(here) else os.path.dirname(here), os.W_OK):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(base, "normstats", "numba")


_cache_dir()

import numba  # noqa: E402  (after the cache folder is chosen)
from numba import types  # noqa: E402
from numba.extending import overload  # noqa: E402



# --- element access, specialized per dtype at compile time ------------------------------


def _value(x, i, e, table):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_value)
def _value_impl(x, i, e, table):
    if isinstance(table, types.NoneType):
        return lambda x, i, e, table: x[i, e]
    return lambda x, i, e, table: table[x[i, e]]  # float16 bits -> its value


def _item(row, e, table):  # pragma: no cover
    raise NotImplementedError


@overload(_item)
def _item_impl(row, e, table):
    """Element `e` of a row view (its index known to be in range: loops vectorize)."""
    if isinstance(table, types.NoneType):
        return lambda row, e, table: row[e]
    return lambda row, e, table: table[row[e]]


def _deviation(v, s):  # pragma: no cover
    raise NotImplementedError


@overload(_deviation)
def _deviation_impl(v, s):
    if isinstance(v, types.Integer):
        # The magnitude in unsigned integer arithmetic (modulo 2**64, so exact for any two
        # values of one integer type), then converted: no digit is lost before the rounding
        # of the deviation itself.
        def integer(v, s):
            if v >= s:
                return np.float64(np.uint64(v) - np.uint64(s))
            return -np.float64(np.uint64(s) - np.uint64(v))
        return integer
    return lambda v, s: np.float64(v) - s


def _finite(v):  # pragma: no cover
    raise NotImplementedError


@overload(_finite)
def _finite_impl(v):
    if isinstance(v, types.Integer):
        return lambda v: True
    return lambda v: np.isfinite(v)


def _shift_as(s, v):  # pragma: no cover
    raise NotImplementedError


@overload(_shift_as)
def _shift_as_impl(s, v):
    """A float64 shift in the arithmetic of values like `v` (integer-valued for integers)."""
    if isinstance(v, types.Integer):
        if v.signed:
            return lambda s, v: np.int64(s)
        return lambda s, v: np.uint64(s)
    return lambda s, v: s


def _shift_gap(s, v):  # pragma: no cover
    raise NotImplementedError


@overload(_shift_gap)
def _shift_gap_impl(s, v):
    """How far the float64 shift `s` lies above its integer form for values like
    `v` (a restored mean need not be an integer): 0 for floats."""
    if isinstance(v, types.Integer):
        if v.signed:
            return lambda s, v: np.float64(np.int64(s)) - s
        return lambda s, v: np.float64(np.uint64(s)) - s
    return lambda s, v: 0.0


@numba.njit(nogil=True, cache=True, inline="always")
def _merged(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan–Golub–LeVeque: the (mean, M2) of a block of weight `n_a` merged with one of
    weight `n_b` (the second alone when `n_a` is 0). The one merge of every kernel."""
    if not n_a > 0.0:
        return mean_b, m2_b
    r = n_b / (n_a + n_b)
    delta = mean_b - mean_a
    return mean_a + delta * r, m2_a + (m2_b + delta * delta * (n_a * r))


# --- the kernel ------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _accumulate(x, table, e0, run, kmap, kfirst, slots, weights, shift, fresh, count0,
                rows, weight, count, s1, s2):
    """See :func:`accumulate`. `count` (and `count0`) and `kmap` are None or
    arrays, so that numba compiles only the variant used (its branches are
    pruned at compile time), where that changes the inner loop: `count` None
    = NaN / Inf propagate, else they are left out and counted per element;
    `kmap` None = each element is its own statistic (the vectorized loop).
    Where it saves only a test per row, an empty array stands for the missing
    part instead (one variant fewer to compile for each): `weights` empty =
    weight 1; `s2` empty = no squares."""
    nrows, width = x.shape
    weighted = weights.shape[0] > 0
    squares = s2.shape[0] > 0
    for i in range(nrows):
        p = slots[i]
        if p < 0:
            continue
        w = weights[i] if weighted else 1.0
        rows[p] += 1
        weight[p] += w
        first = fresh[p]
        if count is None:
            fresh[p] = False
        if kmap is None:
            if count is None:
                # Row views (not s1[p, e0 + e]): indices the compiler knows are in range let
                # it vectorize the loop, 5-7x faster.
                h = shift[p, e0:e0 + width]
                r1 = s1[p, e0:e0 + width]
                if first:
                    for e in range(width):
                        h[e] = _value(x, i, e, table)
                if squares:
                    r2 = s2[p, e0:e0 + width]
                    for e in range(width):
                        d = _deviation(_value(x, i, e, table), h[e])
                        r1[e] += w * d
                        r2[e] += w * d * d
                else:
                    for e in range(width):
                        r1[e] += w * _deviation(_value(x, i, e, table), h[e])
            else:
                for e in range(width):
                    v = _value(x, i, e, table)
                    k = e0 + e
                    if _finite(v):
                        if first and count0[p, k] + count[p, k] == 0.0:
                            shift[p, k] = v
                        d = _deviation(v, shift[p, k])
                        count[p, k] += w
                        s1[p, k] += w * d
                        if squares:
                            s2[p, k] += w * d * d
            continue
        e = 0
        while e < width:  # runs of `run` consecutive elements share one statistic
            r = (e0 + e) // run
            stop = min(width, (r + 1) * run - e0)
            k = kmap[r]
            t1 = 0.0
            t2 = 0.0
            if count is None:
                if first and kfirst[r] and (e0 + e) % run == 0:
                    shift[p, k] = _value(x, i, e, table)  # the statistic's first element in the row
                sk = shift[p, k]
                for q in range(e, stop):
                    d = _deviation(_value(x, i, q, table), sk)
                    t1 += d
                    t2 += d * d
            else:
                tn = 0.0
                for q in range(e, stop):
                    v = _value(x, i, q, table)
                    if _finite(v):
                        if first and count0[p, k] + count[p, k] + tn == 0.0:
                            shift[p, k] = v
                        d = _deviation(v, shift[p, k])
                        tn += 1.0
                        t1 += d
                        t2 += d * d
                count[p, k] += w * tn
            s1[p, k] += w * t1
            if squares:
                s2[p, k] += w * t2
            e = stop


@numba.njit(nogil=True, cache=True)
def _update_groups(x, table, run, kmap, groups, weights, shift, offset, m2, rows, weight, count,
                   t1, t2, tn):
    """Fold each row straight into its group's moments (no per-block scratch of
    groups x statistics, so many groups cost what few do), for statistics of
    several elements (`kmap`) or values left out (`count`); every element its
    own statistic with none left out is :func:`_fold_runs`.

    A row's shifted sums around its group's shift, per statistic, form a block
    of one row (count ``w n_e``, mean ``t1 / n_e``, M2 ``w (t2 - t1**2 / n_e)``),
    merged by Chan–Golub–LeVeque into ``offset`` and ``m2``. A group's first row
    with weight sets its shift. `count` None: counts are ``weight * per_stat``;
    an array: per element (NaN / Inf are left out). `kmap` empty: each element is
    its own statistic; `weights` empty: weight 1 (empty arrays, not None, where a
    variant of its own would save only a test per row or a loop the compiler
    unswitches: fewer variants to compile). `t1`, `t2`, `tn` are scratch of one
    row's statistics.
    """
    width = x.shape[1]
    stats = shift.shape[1]
    per_stat = width // stats
    elementwise = kmap.shape[0] == 0
    weighted = weights.shape[0] > 0
    check = 0.0  # sum of the squared deviations met: not finite iff a NaN / Inf or an overflow
    for i in range(groups.shape[0]):
        g = groups[i]
        if g < 0:
            continue
        rows[g] += 1
        w = weights[i] if weighted else 1.0
        if not w > 0.0:
            continue
        fresh = weight[g] == 0.0
        for k in range(stats):
            t1[k] = 0.0
            t2[k] = 0.0
            tn[k] = 0.0
        for e in range(width):
            k = e if elementwise else kmap[e // run]
            v = _value(x, i, e, table)
            if count is None:
                if fresh and tn[k] == 0.0:
                    shift[g, k] = v
            else:
                if not _finite(v):
                    continue
                if count[g, k] == 0.0 and tn[k] == 0.0:
                    shift[g, k] = v
            d = _deviation(v, _shift_as(shift[g, k], v)) + _shift_gap(shift[g, k], v)
            tn[k] += 1.0
            t1[k] += d
            t2[k] += d * d
            check += d * d
        for k in range(stats):
            if tn[k] == 0.0:
                continue
            n_a = weight[g] * per_stat if count is None else count[g, k]
            n_b = w * tn[k]
            mean_b = t1[k] / tn[k]
            m2_b = w * max(t2[k] - t1[k] * mean_b, 0.0)
            offset[g, k], m2[g, k] = _merged(n_a, offset[g, k], m2[g, k], n_b, mean_b, m2_b)
            if count is not None:
                count[g, k] += n_b
        weight[g] += w
    return check


@numba.njit(nogil=True, cache=True)
def _slot_rows(groups, batch, first_batch, num_groups, lookup, slots, keys):
    """Number the (batch, group) pairs present in `groups` in order of first
    appearance: ``slots[i]`` is row i's pair (-1 for a negative group), ``keys``
    the pairs as ``batch * num_groups + group``. `lookup` (size num_groups, all
    -1) is used as scratch and left all -1. Returns the number of pairs."""
    present = 0
    start = 0  # first pair of the current batch
    current = -1
    for i in range(groups.shape[0]):
        b = first_batch + i // batch
        if b != current:
            for q in range(start, present):
                lookup[keys[q] % num_groups] = -1
            start = present
            current = b
        g = groups[i]
        if g < 0:
            slots[i] = -1
            continue
        p = lookup[g]
        if p < 0:
            p = present
            lookup[g] = p
            keys[p] = b * num_groups + g
            present += 1
        slots[i] = p
    for q in range(start, present):
        lookup[keys[q] % num_groups] = -1
    return present


@numba.njit(nogil=True, cache=True)
def _fold_exact(keys, base, residual, weight, count, s1, s2, per_stat, integer,
                shift, offset, m2, state_weight, state_count):
    """Chan–Golub–LeVeque merge of block sums into the state rows `keys`, then
    each mean is re-centred: its shift becomes the rounded mean (an integer for
    integer data), its offset the exact remainder (TwoSum), so the next block's
    deviations are taken around the mean itself. `residual` (what float64 dropped
    from integer shifts) is empty for float data."""
    elementwise = state_count.shape[0] > 0
    rounded = residual.shape[0] > 0
    for p in range(keys.shape[0]):
        g = keys[p]
        for k in range(s1.shape[1]):
            n_b = count[p, k] if elementwise else weight[p] * per_stat
            if not n_b > 0.0:
                continue
            n_a = state_count[g, k] if elementwise else state_weight[g] * per_stat
            off_b = s1[p, k] / n_b
            m2_b = max(s2[p, k] - s1[p, k] * off_b, 0.0)
            if rounded:
                off_b += residual[p, k]
            if n_a > 0.0:
                # The kernel's shift is the state's, unless integer arithmetic rounded it
                # (a restored non-integer mean): then the difference is small and exact.
                off_b += base[p, k] - shift[g, k]
            else:
                shift[g, k] = base[p, k]
            offset[g, k], m2[g, k] = _merged(n_a, offset[g, k], m2[g, k], n_b, off_b, m2_b)
            a = shift[g, k]
            b = offset[g, k]
            t = a + b
            if integer:
                t = np.rint(t)
                low = (a - t) + b
            else:
                bb = t - a
                low = (a - (t - bb)) + (b - bb)
            if np.isfinite(t):
                shift[g, k] = t
                offset[g, k] = low
            if elementwise:
                state_count[g, k] += n_b
        if not elementwise:
            state_weight[g] += weight[p]


# --- Python side -----------------------------------------------------------------------


EMA_SKIP, EMA_BLEND, EMA_SET, EMA_FIRST = 0, 1, 2, 4  # what a (batch, class) pair does (see _ema_plan)


@numba.njit(nogil=True, cache=True)
def _ema_plan(keys, num_classes, weight, alpha, per_row, initialized, decay, first_seen, keep_first, plan):
    """The per-class bookkeeping of :func:`_fold_centers_ema`, in batch order, and
    what each (batch, class) pair does there: skipped (no weight), blended into
    its class's center, or setting it (a class not yet initialized), plus
    EMA_FIRST when it is the first mean of its class to keep (`keep_first`).
    ``decay`` of each class is multiplied by ``1 - a`` per pair."""
    for p in range(keys.shape[0]):
        j = keys[p] % num_classes
        n = weight[p]
        if not n > 0.0:
            plan[p] = EMA_SKIP
            continue
        a = alpha * n if per_row else alpha
        plan[p] = EMA_BLEND if initialized[j] else EMA_SET
        initialized[j] = True
        decay[j] *= 1.0 - a
        if keep_first and not first_seen[j]:
            plan[p] |= EMA_FIRST
            first_seen[j] = True


@numba.njit(nogil=True, cache=True)
def _fold_centers_ema(keys, num_classes, base, residual, s1, weight, alpha, per_row, plan, lo, hi, centers,
                      first_mean):
    """The moving average of every (batch, class) mean, in batch order (`keys` are
    ``batch * K + class``, batch-major), columns ``lo:hi`` only, as `plan` says
    (:func:`_ema_plan`): ``C <- (1 - a) C + a mean``, or ``C <- mean`` for a
    class not yet initialized; ``a`` is `alpha`, or with `per_row` ``alpha * n``
    for the n rows of the class in the batch (each row adding ``alpha * (x -
    C_old)``). Column ranges touch disjoint memory: they may run in threads.
    `residual` (what float64 dropped from integer shifts) is empty for floats."""
    rounded = residual.shape[0] > 0
    for p in range(keys.shape[0]):
        step = plan[p]
        if step == EMA_SKIP:
            continue
        j = keys[p] % num_classes
        n = weight[p]
        a = alpha * n if per_row else alpha
        c = centers[j, lo:hi]  # row views: see _accumulate
        b = base[p, lo:hi]
        t = s1[p, lo:hi]
        r = residual[p, lo:hi] if rounded else b  # (not read unless rounded)
        if step & EMA_BLEND:
            for e in range(hi - lo):
                c[e] = (1.0 - a) * c[e] + a * (b[e] + (t[e] / n + (r[e] if rounded else 0.0)))
        else:
            for e in range(hi - lo):
                c[e] = b[e] + (t[e] / n + (r[e] if rounded else 0.0))
        if step & EMA_FIRST:
            f = first_mean[j, lo:hi]
            for e in range(hi - lo):
                f[e] = b[e] + (t[e] / n + (r[e] if rounded else 0.0))


@numba.njit(nogil=True, cache=True)
def _fold_ema_batches(x, table, batch, slots, keys, num_classes, alpha, per_row, kfirst, no_residual, centers,
                      initialized, decay, first_mean, first_seen, shift, s1, fresh, local, rows, weight, plan,
                      lead, check):
    """Moving-average centers of the consecutive batches of `x`, each batch's
    (batch, class) means folded at once (:func:`_ema_plan`, :func:`_fold_centers_ema`);
    float data only (shifts in float64). `slots` and `keys` are :func:`_slot_rows`'
    numbering (pairs batch by batch).

    A class met once in a batch (most of them, with many classes) has its row as
    its mean: the row is blended in where it lies. The others' sums are taken
    (:func:`_accumulate`) into scratch the size of one batch, which stays in the
    cache. The same numbers either way (a one-row mean is ``row + 0 / 1``).
    Returns -1 when every batch was folded, else the first row of the first
    batch whose means are not finite (a NaN / Inf, or float64's overflow): it
    and the batches after it are left out, the state holds those before.
    The other arguments are scratch of one batch (`check`: one row)."""
    nrows, width = x.shape
    pairs = keys.shape[0]
    keep_first = first_mean.shape[0] > 0
    p0 = 0
    for b0 in range(0, nrows, batch):
        b1 = min(nrows, b0 + batch)
        b = b0 // batch
        p1 = p0
        while p1 < pairs and keys[p1] // num_classes == b:
            p1 += 1
        n = p1 - p0
        if n == 0:
            continue
        for q in range(n):
            rows[q] = 0
            lead[q] = -1
        for i in range(b0, b1):
            if slots[i] >= 0:
                q = slots[i] - p0
                rows[q] += 1
                if lead[q] < 0:
                    lead[q] = i
        for i in range(b0, b1):  # only the rows of classes met more than once are summed
            q = slots[i] - p0
            local[i - b0] = q if slots[i] >= 0 and rows[q] > 1 else -1
        for q in range(n):
            fresh[q] = True
            weight[q] = 1.0 if rows[q] == 1 else 0.0
            if rows[q] > 1:
                rows[q] = 0
                r = s1[q]
                for e in range(width):
                    r[e] = 0.0
        # (int64 scalars: a literal 0 or 1 would be a variant of its own, beside the one
        # accumulate() calls; weight[:0] and no_residual: no weights, no squares)
        _accumulate(x[b0:b1], table, np.int64(0), np.int64(1), None, kfirst, local[:b1 - b0], weight[:0], shift[:n],
                    fresh[:n], None, rows[:n], weight[:n], None, s1[:n], no_residual)
        for e in range(width):
            check[e] = 0.0
        for q in range(n):
            if fresh[q]:  # a one-row class (its sums untouched)
                xi = x[lead[q]]
                for e in range(width):
                    check[e] += _item(xi, e, table) * 0.0  # stays 0 unless NaN / Inf (per element: vectorized)
            else:
                r = s1[q]
                for e in range(width):
                    check[e] += r[e] * 0.0
        total = 0.0
        for e in range(width):
            total += check[e]
        if total != 0.0:  # (NaN)
            return b0
        _ema_plan(keys[p0:p1], num_classes, weight[:n], alpha, per_row, initialized, decay, first_seen,
                  keep_first, plan[:n])
        for q in range(n):
            if not fresh[q] or plan[q] == EMA_SKIP:
                continue
            j = keys[p0 + q] % num_classes
            a = alpha  # (per row: alpha times the one row)
            xi = x[lead[q]]
            c = centers[j]
            if plan[q] & EMA_BLEND:
                for e in range(width):
                    c[e] = (1.0 - a) * c[e] + a * _item(xi, e, table)
            else:
                for e in range(width):
                    c[e] = _item(xi, e, table)
            if plan[q] & EMA_FIRST:
                f = first_mean[j]
                for e in range(width):
                    f[e] = _item(xi, e, table)
            plan[q] = EMA_SKIP  # folded
        _fold_centers_ema(keys[p0:p1], num_classes, shift[:n], no_residual, s1[:n], weight[:n], alpha, per_row,
                          plan[:n], np.int64(0), width, centers, first_mean)
        p0 = p1
    return -1


@numba.njit(nogil=True, cache=True)
def _order_by_group(groups, start, order):
    """A counting sort: `order` the rows by group, stable, negative groups first.
    `start` (one more than the groups, all 0) is scratch, left all 0. O(rows +
    groups), where a comparison sort is O(rows log rows) (11 % of a fit of 1 000
    classes)."""
    n = groups.shape[0]
    first = 0  # rows of a negative group, put first
    for i in range(n):
        g = groups[i]
        if g < 0:
            first += 1
        else:
            start[g + 1] += 1
    start[0] = first
    for g in range(1, start.shape[0]):
        start[g] += start[g - 1]
    skipped = 0
    for i in range(n):
        g = groups[i]
        if g < 0:
            order[skipped] = i
            skipped += 1
        else:
            order[start[g]] = i
            start[g] += 1
    for g in range(start.shape[0]):
        start[g] = 0


@numba.njit(nogil=True, cache=True)
def _group_runs(order, groups, weights, rows, weight, runs, before, total):
    """Cut the rows, taken in `order` (sorted by group, stable), into runs of one
    group each, and count them into `rows` and `weight`: run r is the rows
    ``order[runs[r]:runs[r + 1]]``, ``before[r]`` its group's weight before it and
    ``total[r]`` its own (rows of weight <= 0, or NaN, count as rows only;
    `weights` empty: weight 1). Rows of a negative group (sorted first) are
    skipped. Returns the number of runs; :func:`_fold_runs` folds them."""
    n = order.shape[0]
    weighted = weights.shape[0] > 0
    i = 0
    while i < n and groups[order[i]] < 0:
        i += 1
    r = 0
    while i < n:
        g = groups[order[i]]
        runs[r] = i
        before[r] = weight[g]
        t = 0.0
        while i < n and groups[order[i]] == g:
            rows[g] += 1
            w = weights[order[i]] if weighted else 1.0
            if w > 0.0:
                t += w
            i += 1
        total[r] = t
        weight[g] += t
        r += 1
    runs[r] = i
    return r


@numba.njit(nogil=True, cache=True)
def _fold_runs(x, table, lo, hi, order, groups, weights, nruns, runs, before, total, shift, offset, m2,
               t1, t2, c):
    """Fold the runs of :func:`_group_runs` into columns ``lo:hi`` of their groups'
    shift, offset (mean of ``x - shift``) and M2, every element its own statistic,
    no values left out (`weights` empty: weight 1).

    A run of one row is West's weighted update. A longer run (a group met several
    times in the block) sums ``w (x - s)`` and ``w (x - s)**2`` over its rows in
    float64, s the group's shift (its first value, or a restored mean), and merges
    that block by Chan–Golub–LeVeque: the group's state is read and written once
    per run, not once per row (few groups cost what one does). With s a value of
    the group, the one-pass M2 of a run, ``t2 - t1**2 / W``, loses only the digits
    of ``(mean - s)**2 / var`` (relative error about ``n eps (1 + (mean - s)**2 /
    var)``), not those of the data's offset from zero.
    Column ranges touch disjoint memory, so they may run in parallel threads;
    `t1`, `t2`, `c` are scratch of ``hi - lo``. Returns the sum of the squared
    deviations met (not finite iff a NaN / Inf or an overflow)."""
    width = hi - lo
    weighted = weights.shape[0] > 0
    for e in range(width):
        c[e] = 0.0
    for r in range(nruns):
        whole = total[r]
        if not whole > 0.0:
            continue
        a = runs[r]
        b = runs[r + 1]
        g = groups[order[a]]
        n_a = before[r]
        h = shift[g, lo:hi]
        o = offset[g, lo:hi]
        q = m2[g, lo:hi]
        if b - a == 1:
            _west_row(x[order[a], lo:hi], table, n_a, whole, h, o, q, c)
            continue
        for e in range(width):
            t1[e] = 0.0
            t2[e] = 0.0
        fresh = n_a == 0.0
        for j in range(a, b):
            i = order[j]
            w = weights[i] if weighted else 1.0
            if not w > 0.0:
                continue
            xi = x[i, lo:hi]
            if fresh:
                for e in range(width):
                    h[e] = _item(xi, e, table)
                fresh = False
            for e in range(width):
                v = _item(xi, e, table)
                d = _deviation(v, _shift_as(h[e], v)) + _shift_gap(h[e], v)
                t1[e] += w * d
                t2[e] += w * d * d
        inverse = 1.0 / whole
        for e in range(width):
            c[e] += t2[e]  # (weighted: finite iff the deviations and their sum are)
            mean_b = t1[e] * inverse
            o[e], q[e] = _merged(n_a, o[e], q[e], whole, mean_b, max(t2[e] - t1[e] * mean_b, 0.0))
    check = 0.0
    for e in range(width):
        check += c[e]
    return check


@numba.njit(nogil=True, cache=True, inline="always")
def _west_row(xi, table, n_a, w, h, o, q, c):
    """West's weighted update of a group's shift `h`, offset `o` and M2 `q` (row
    views of one column range) by the row `xi` of weight `w`, the group's weight
    before it `n_a` (0: the row sets the shift); `c` gathers the squared
    deviations per element (not one running sum: the loop stays vectorized)."""
    if n_a == 0.0:
        for e in range(xi.shape[0]):
            h[e] = _item(xi, e, table)
            o[e] = 0.0
            q[e] = 0.0
    r = w / (n_a + w)
    for e in range(xi.shape[0]):
        v = _item(xi, e, table)
        d = _deviation(v, _shift_as(h[e], v)) + _shift_gap(h[e], v)
        delta = d - o[e]
        o[e] += delta * r
        q[e] += w * delta * (d - o[e])
        c[e] += d * d


@numba.njit(nogil=True, cache=True)
def _unshuffle(planes, skip, out):
    """Undo HDF5's shuffle filter: byte k of element j is ``planes[k, j]``; elements
    ``skip:skip + len(out)`` go to `out` (unsigned integers of the element's size),
    assembled from their bytes (little-endian) one plane at a time: row views, so
    the compiler vectorizes each pass (15 GB/s against 0.7 for a strided copy)."""
    n = out.shape[0]
    t = out.dtype.type
    for j in range(n):
        out[j] = 0
    for k in range(planes.shape[0]):
        plane = planes[k, skip:skip + n]
        shift = t(8 * k)
        for j in range(n):
            out[j] |= t(plane[j]) << shift


@numba.njit(nogil=True, cache=True)
def _normalize_rows(x, mean, scale, beta, out, seen):
    """``out = (x - mean) * scale + beta`` row by row, each term one value per element of a
    row, in the arithmetic of `out`'s dtype, in one pass. A term not fitted is given as
    the identity of its operation (mean +0, scale 1, beta -0: ``v + -0.0`` is `v` for
    every `v`, -0 included), which gives the same bits as leaving it out; as arrays
    always, not None, the kernel has one variant per dtype instead of one per
    combination of terms. ``seen`` (one value per element, zeros) gathers ``0 * out``, so
    it stays finite iff every output is finite (an overflow to infinity included),
    without a branch in the loop."""
    t = out.dtype.type
    for i in range(x.shape[0]):
        xi = x[i]
        oi = out[i]
        for e in range(xi.shape[0]):
            v = (t(xi[e]) - mean[e]) * scale[e] + beta[e]
            oi[e] = v
            seen[e] += v * t(0)


# Cached kernels load without numba's full context refresh (~0.1 s of each command's start).
from .kernel_cache import load_cached_quickly  # noqa: E402

load_cached_quickly(value for value in list(globals().values()) if isinstance(value, numba.core.dispatcher.Dispatcher))
