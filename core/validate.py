"""Checks shared by the estimators and the readers (no arithmetic, no I/O)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .errors import DataError, RowError, UsageError


def check_numeric_dtype(dtype: np.dtype, what: str) -> np.dtype:
    """Return `dtype` if it is a real integer or floating type, else raise DataError."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iuf":
        return dtype
    if dtype.kind == "c":
        reason = "complex numbers have no ordering of mean and variance normstats can use"
    elif dtype.kind == "b":
        reason = "booleans are not numeric features"
    elif dtype.kind == "O":
        reason = "it holds Python objects or variable-length strings, not numbers"
    else:
        reason = "it is not numeric"
    raise DataError(f"{what} has dtype {dtype}: {reason}; convert it to float32 or float64")


# The smallest eps accepted: float32's smallest normal number. With eps at least this,
# inv_std = 1/sqrt(var + eps) <= 9.2e18 and inv_std**2 <= 8.5e37 are finite in float32 (the
# precision apply computes in for float16/float32 input, and of torch's buffers), and
# 1/inv_std**2 - eps (export) cannot overflow float64. A smaller eps, such as 1e-300, makes
# the inv_std of a constant channel 1e150: infinite in float32, so its output would be NaN.
EPS_MIN = float(np.finfo(np.float32).tiny)
# --seed feeds numpy's SeedSequence; like most tools' seeds, it is one 32-bit word.
SEED_MAX = 2**32 - 1


def check_alpha(alpha: float) -> float:
    if not 0.0 < alpha <= 1.0:  # NaN fails the comparison too
        raise UsageError(f"alpha must be a number in (0, 1], got {alpha}")
    return float(alpha)


def check_eps(eps: float) -> float:
    """Return `eps` as float if it is finite and at least :data:`EPS_MIN`, else raise UsageError."""
    if not (math.isfinite(eps) and eps >= EPS_MIN):
        raise UsageError(
            f"eps must be a finite number >= {EPS_MIN:.4g} (so that 1/sqrt(var + eps) stays finite "
            f"in float32), got {eps}"
        )
    return float(eps)


def check_finite(value: Any, what: str, *, positive: bool = False) -> Any:
    """Return `value` (a number or array) if every element is finite (and > 0
    with `positive`), else raise UsageError naming the first bad one."""
    array = np.asarray(value, dtype=np.float64)
    bad = ~np.isfinite(array)
    if positive:
        bad |= ~(array > 0)
    if bad.any():
        where = np.argwhere(bad)[0]
        at = f" at index {', '.join(map(str, where))}" if array.ndim else ""
        need = "finite and > 0" if positive else "finite"
        raise UsageError(f"{what} holds {array[tuple(where)]}{at}; it must be {need}")
    return value


def check_max_distance(max_distance: Optional[float]) -> Optional[float]:
    if max_distance is not None and not max_distance >= 0:
        raise UsageError(f"max distance must be a number >= 0, got {max_distance}")
    return None if max_distance is None else float(max_distance)


def check_seed(seed: int) -> int:
    if int(seed) != seed or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"seed must be an integer in [0, {SEED_MAX}], got {seed}")
    return int(seed)


def check_ddof(ddof: int) -> int:
    if int(ddof) != ddof or ddof < 0:
        raise UsageError(f"ddof must be a non-negative integer, got {ddof}")
    return int(ddof)


def check_batch_size(batch_size: Optional[int]) -> Optional[int]:
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    return None if batch_size is None else int(batch_size)


NAN_POLICIES = ("error", "omit")


def check_nan_policy(policy: str) -> str:
    if policy not in NAN_POLICIES:
        raise UsageError(f"nan policy must be one of {', '.join(NAN_POLICIES)}, got {policy!r}")
    return policy


def check_groups(
    groups: Optional[np.ndarray], rows: int, num_groups: int, first_row: int, what: str,
    ignore: Optional[int] = None,
) -> np.ndarray:
    """Return `groups` as int64 of length `rows`, each in ``[0, num_groups)``
    or equal to `ignore`.

    `what` ('label', 'group') and `first_row` (rows before this array) make
    the message name the first bad row of the whole stream.
    """
    if groups is None:
        raise UsageError(f"a {what} per row is required")
    groups = np.asarray(groups)
    if groups.ndim == 2 and groups.shape[1] == 1:
        groups = groups[:, 0]
    if groups.ndim != 1:
        raise DataError(f"{what}s must be one integer per row, got shape {groups.shape}")
    if groups.dtype.kind not in "iu":
        raise DataError(f"{what}s have dtype {groups.dtype}; they must be integers in [0, {num_groups})")
    if len(groups) != rows:
        raise DataError(
            f"{len(groups)} {what}s for {rows} feature rows; they must have the same number of rows"
        )
    outside = (groups < 0) | (groups >= num_groups)
    if ignore is not None:
        outside &= groups != ignore
    bad = np.flatnonzero(outside)
    if bad.size:
        row = int(bad[0])
        raise RowError(
            first_row + row,
            f"{what} {groups[row]} is outside [0, {num_groups}); check the {what}s or the "
            f"number of {what} values (--num-{'classes' if what == 'label' else 'groups'})",
            side=f"{what}s",
        )
    return groups.astype(np.int64, copy=False)


def check_weights(weights: np.ndarray, rows: int, first_row: int) -> np.ndarray:
    """Return `weights` as float64 of length `rows`, finite and non-negative."""
    weights = np.asarray(weights)
    if weights.ndim == 2 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.ndim != 1 or len(weights) != rows:
        raise DataError(
            f"weights of shape {weights.shape} for {rows} rows; give one weight per row"
        )
    check_numeric_dtype(weights.dtype, "weights")
    weights = weights.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if bad.size:
        row = int(bad[0])
        raise RowError(
            first_row + row,
            f"weight {weights[row]} is negative or not finite; weights must be finite and >= 0",
            side="weights",
        )
    return weights
