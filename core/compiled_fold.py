"""The compiled fold of a block's batch sums into a moving average (BatchNorm EMA).

:meth:`normstats.batchnorm.BatchNormEMA._fold` in one loop: per batch and statistic
the count, mean and M2 of :class:`normstats.kernels.Sums`, then the closed-form
EMA of the valid batches. The same arithmetic in the same order as that method's
NumPy code (sums over the batches taken first to last, the powers of
``1 - alpha`` from one table made by NumPy), so both give the same bits; this
one costs some 20 us a block of 32 batches x 256 statistics instead of ~0.4 ms
of small NumPy calls, which ran on the thread folding blocks in stream order
while the reader threads wanted both cores.

Imported on first use, cached on disk as :mod:`normstats.compiled`.
"""

from __future__ import annotations

import math

import numpy as np

from .compiled import numba  # imported there once numba's cache folder is chosen


@numba.njit(nogil=True, cache=True, error_model="numpy")  # x / 0 gives inf or NaN, as in NumPy
def _ema_fold(s1, s2, base, residual, counts, weight, per_stat, ddof, eps, alpha, powers, mean, inv_std, count,
              decay, later, totals):
    """Fold the batches of one block (rows of `s1`) into `mean`, `inv_std`, `count`
    and `decay` (flat, one value per statistic; `mean` / `inv_std` empty when not
    fitted), in place; returns how many batches had a statistic with more than
    `ddof` elements.

    `counts` is the elements per (batch, statistic), or empty when they are
    ``weight[b] * per_stat``; `residual` empty for float data; ``powers[j] = (1 -
    alpha) ** j``. `later` (batches, statistics) int64 and `totals` (4, statistics)
    float64 are scratch (allocating here would load numba's array library with
    the kernel, some 0.1 s of every fit's start-up). Empty arrays, not None, for
    the parts left out: one variant to compile instead of one per combination
    (the tests they cost are per value of a fold of some 8 000 values a block).
    """
    batches, stats = s1.shape
    elementwise = counts.shape[0] > 0
    rounded = residual.shape[0] > 0
    fit_mean = mean.shape[0] > 0
    fit_inv_std = inv_std.shape[0] > 0
    used = 0
    for b in range(batches):
        for k in range(stats):
            if (counts[b, k] if elementwise else weight[b] * per_stat) > ddof:
                used += 1
                break
    if used == 0:  # as the NumPy fold: nothing is touched
        return 0
    # per statistic, the valid batches after each (they set its weight), counted from the last
    sum_mean, sum_inv, sum_n, valid_after = totals[0], totals[1], totals[2], totals[3]
    for k in range(stats):
        valid_after[k] = 0.0
    for b in range(batches - 1, -1, -1):
        for k in range(stats):
            later[b, k] = int(valid_after[k])
            if (counts[b, k] if elementwise else weight[b] * per_stat) > ddof:
                valid_after[k] += 1.0
    for b in range(batches):  # batches outer, statistics inner: the inner loop vectorizes
        for k in range(stats):
            n = counts[b, k] if elementwise else weight[b] * per_stat
            valid = n > ddof
            w = alpha * powers[later[b, k]]
            term_n = n if valid else 0.0
            term_mean = 0.0
            term_inv = 0.0
            if fit_mean:
                if rounded:
                    value = w * (base[b, k] + (s1[b, k] / n + residual[b, k]))
                else:
                    value = w * (base[b, k] + (s1[b, k] / n + 0.0))
                term_mean = value if valid else 0.0
            if fit_inv_std:
                m2 = s2[b, k] - s1[b, k] * (s1[b, k] / n)
                m2 = m2 if m2 > 0.0 or m2 != m2 else 0.0  # np.maximum(m2, 0): NaN stays NaN
                value = w * (1.0 / math.sqrt(m2 / (n - ddof) + eps))
                term_inv = value if valid else 0.0
            if b == 0:  # NumPy's sum over axis 0 starts from the first term
                sum_mean[k], sum_inv[k], sum_n[k] = term_mean, term_inv, term_n
            else:
                sum_mean[k] += term_mean
                sum_inv[k] += term_inv
                sum_n[k] += term_n
    for k in range(stats):
        step = powers[int(valid_after[k])]
        decay[k] = decay[k] * step
        count[k] += sum_n[k]
        if fit_mean:
            mean[k] = step * mean[k] + sum_mean[k]
        if fit_inv_std:
            inv_std[k] = step * inv_std[k] + sum_inv[k]
    return used


from .kernel_cache import load_cached_quickly  # noqa: E402

load_cached_quickly([_ema_fold])


def warm_up() -> None:
    """Load (or compile) the fold of a fit-bn's EMA without omissions, on a tiny input."""
    one, zero, none = np.ones((1, 1)), np.zeros((1, 1)), np.empty((0, 0))
    _ema_fold(zero, one, zero, none, none, np.ones(1), 2, 1, 1e-5, 0.5, np.ones(2), np.zeros(1), np.ones(1),
              np.zeros(1), np.ones(1), np.empty((1, 1), np.int64), np.empty((4, 1)))
