"""The types of a stats file's metadata and arrays, checked as the file is read.

A stats file may be hand-edited (JSON above all): a string where a number
belongs, a list for a flag, a nested object for a shape. Every key that
normstats uses is checked here, so that a bad value is reported as
``stats file 'x.json': key 'eps': ...`` when the file is read, never as a
traceback deep inside a command. Keys normstats does not know are kept as
they are.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .errors import StatsFileError
from .stats import CENTER_RULES, check_counts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _positive(value: Any) -> bool:
    return _is_int(value) and value > 0


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _count_list(value: Any) -> bool:
    return isinstance(value, list) and all(_count(v) for v in value)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _dtype_name(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return np.dtype(value).kind in "biuf"
    except (TypeError, ValueError):
        return False


def _checkpoint(value: Any) -> bool:
    return isinstance(value, dict) and all(_count(value[key]) for key in ("rows_done", "rows_total")
                                           if key in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


# key: (check, what it must be)
META_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (lambda v: v in ("batchnorm", "centers"), "'batchnorm' or 'centers'"),
    "mode": (lambda v: v in ("ema", "exact"), "'ema' or 'exact'"),
    "axes": (_int_list, "a list of integers"),
    "channel_axis": (_optional(_positive), "a positive integer (the axis the statistics keep) or null"),
    "row_shape": (_count_list, "a list of non-negative integers"),
    "input_dtype": (_dtype_name, "a numeric dtype name such as 'float32'"),
    "rows_seen": (_count, "a non-negative integer"),
    "batches_seen": (_count, "a non-negative integer"),
    "batches_skipped": (_count, "a non-negative integer"),
    "bytes_read": (_count, "a non-negative integer"),
    "rows_read": (_count, "a non-negative integer"),
    "near_constant_count": (_count, "a non-negative integer"),
    "classes_unseen": (_count, "a non-negative integer"),
    "groups_unseen": (_count, "a non-negative integer"),
    "rows_ignored": (_count, "a non-negative integer"),
    "values_omitted": (_optional(_count), "a non-negative integer"),
    "near_constant": (_count_list, "a list of non-negative integers"),
    "batch_size": (_optional(_positive), "a positive integer or null"),
    "num_classes": (_positive, "a positive integer"),
    "groups": (_optional(_positive), "a positive integer or null"),
    "ddof": (_count, "a non-negative integer"),
    "eps": (lambda v: _is_number(v) and v >= 0, "a finite non-negative number"),
    "alpha": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "rule": (lambda v: v in CENTER_RULES, " or ".join(f"'{rule}'" for rule in CENTER_RULES)),
    "reference": (lambda v: isinstance(v, str), "a string (the reference layer's name)"),
    "seconds": (lambda v: _is_number(v) and v >= 0, "a finite non-negative number"),
    "seed": (_optional(_is_int), "an integer or null"),
    "ignore_label": (_optional(_is_int), "an integer or null"),
    "use_mean": (lambda v: isinstance(v, bool), "true or false"),
    "use_inv_std": (lambda v: isinstance(v, bool), "true or false"),
    "weighted": (lambda v: isinstance(v, bool), "true or false"),
    "nan_policy": (lambda v: isinstance(v, str), "a string"),
    "init": (_optional(lambda v: isinstance(v, str)), "a string"),
    "normstats_version": (lambda v: isinstance(v, str), "a string"),
    "sources": (_str_list, "a list of strings"),
    "labels_sources": (_str_list, "a list of strings"),
    "groups_sources": (_str_list, "a list of strings"),
    "group_names": (_str_list, "a list of strings (the groups' keys)"),
    "weights_sources": (_str_list, "a list of strings"),
    "merged_from": (_str_list, "a list of strings"),
    "imported_from": (lambda v: isinstance(v, str), "a string"),
    "checkpoint": (_checkpoint, "an object whose rows_done and rows_total are non-negative integers"),
}


def check_meta(meta: Any, path: str) -> dict[str, Any]:
    """Return `meta` if every key normstats knows has a value of its type.

    Raises
    ------
    StatsFileError
        ``stats file 'PATH': key 'KEY': expected ..., got ...``.
    """
    if not isinstance(meta, dict):
        raise StatsFileError(f"stats file {path!r}: its metadata is a {type(meta).__name__}, not an object")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise StatsFileError(f"stats file {path!r}: metadata key {key!r} is not a string")
        check = META_TYPES.get(key)
        if check is not None and not check[0](value):
            raise StatsFileError(f"stats file {path!r}: key {key!r}: expected {check[1]}, got {_shown(value)}; "
                                 "re-create the file (or fix that value)")
    return meta


def check_arrays(arrays: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Return `arrays` if each is numeric; counts must be finite and non-negative."""
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise StatsFileError(f"stats file {path!r}: key {name!r}: holds {array.dtype} values, not numbers")
    check_counts(arrays, f"stats file {path!r}")
    return arrays


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
