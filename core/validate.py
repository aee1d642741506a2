"""Checks shared by the estimators and the readers (no arithmetic, no I/O)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import DataError, UsageError


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
        reason = "object arrays are never loaded (they would need unpickling)"
    else:
        reason = "it is not numeric"
    raise DataError(f"{what} has dtype {dtype}: {reason}; convert it to float32 or float64")


def check_alpha(alpha: float) -> float:
    if not 0.0 < alpha <= 1.0:
        raise UsageError(f"alpha must be in (0, 1], got {alpha}")
    return float(alpha)


def check_eps(eps: float) -> float:
    if not eps > 0.0:
        raise UsageError(f"eps must be > 0, got {eps}")
    return float(eps)


def check_ddof(ddof: int) -> int:
    if int(ddof) != ddof or ddof < 0:
        raise UsageError(f"ddof must be a non-negative integer, got {ddof}")
    return int(ddof)


def check_batch_size(batch_size: Optional[int]) -> Optional[int]:
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    return None if batch_size is None else int(batch_size)


def check_mode(mode: str) -> str:
    if mode not in ("ema", "exact"):
        raise UsageError(f"mode must be 'ema' or 'exact', got {mode!r}")
    return mode
