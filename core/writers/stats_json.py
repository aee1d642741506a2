"""`.json` stats files: arrays as nested lists with dtype and shape, strict JSON."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from ..errors import StatsFileError
from ..limits import JSON_MAX_BYTES


# A `.json` stats file is {"format": JSON_FORMAT, "version": 1, "meta": {...},
# "arrays": {name: {"dtype": ..., "shape": [...], "data": nested lists}}}.
JSON_FORMAT = "normstats-stats"
JSON_VERSION = 1
# JSON has no NaN or infinity (Python's json writes bare NaN, which other parsers
# reject), so non-finite array values are written as these strings.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
JSON_DTYPES = frozenset(
    np.dtype(name).name
    for name in ("bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "uint16", "uint32", "uint64")
)


def _write_stats_json(arrays: dict[str, np.ndarray], meta: dict[str, Any], path: str) -> None:
    # allow_nan=False: strict JSON that any parser reads. One line per part and
    # per array, so that a person can read the file and diff two of them.
    def dump(value: Any) -> str:
        return json.dumps(value, allow_nan=False, sort_keys=True)

    entries = [f"  {dump(name)}: " + dump({"dtype": a.dtype.name, "shape": list(a.shape), "data": _json_values(a)})
               for name, a in arrays.items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'{{"format": {dump(JSON_FORMAT)}, "version": {JSON_VERSION},\n "meta": {dump(meta)},\n'
                f' "arrays": {{\n' + ",\n".join(entries) + "}}\n")


def _json_values(array: np.ndarray) -> Any:
    """`array` as nested lists; non-finite floats as their NON_FINITE names."""
    values = array.tolist()
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return values

    def encode(value: Any) -> Any:
        if isinstance(value, list):
            return [encode(v) for v in value]
        if math.isnan(value):
            return "NaN"
        return value if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")

    return encode(values)


def _read_stats_json(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > JSON_MAX_BYTES:
            raise StatsFileError(f"{path} is a {size}-byte JSON stats file, beyond the {JSON_MAX_BYTES} bytes "
                                 "normstats parses; write large statistics as .npz or .h5")
        document = json.loads(f.read())
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise StatsFileError(f'{path} is JSON but not a normstats stats file (no "format": "{JSON_FORMAT}")')
    if document.get("version") != JSON_VERSION:
        raise StatsFileError(
            f"{path} is a normstats JSON file of version {document.get('version')!r}; "
            f"this normstats reads version {JSON_VERSION}"
        )
    meta, entries = document.get("meta"), document.get("arrays")
    if not isinstance(meta, dict) or not isinstance(entries, dict):
        raise StatsFileError(f'{path} lacks the "meta" and "arrays" objects of a normstats JSON file')
    return {name: _json_array(entry, f"{path}: array {name!r}") for name, entry in entries.items()}, meta


def _json_array(entry: Any, where: str) -> np.ndarray:
    """Decode one ``{"dtype", "shape", "data"}`` entry, checking every part."""
    if not isinstance(entry, dict):
        raise StatsFileError(f"{where} is not an object with dtype, shape and data")
    name, shape, data = entry.get("dtype"), entry.get("shape"), entry.get("data")
    if name not in JSON_DTYPES:
        raise StatsFileError(f"{where} has dtype {name!r}; expected one of {', '.join(sorted(JSON_DTYPES))}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise StatsFileError(f"{where} has shape {shape!r}; expected a list of non-negative integers")
    level = [data]
    for size in shape:  # level by level, without recursion
        if not all(isinstance(node, list) and len(node) == size for node in level):
            raise StatsFileError(f"{where}: its data do not have the shape {tuple(shape)}")
        level = [item for node in level for item in node]
    dtype = np.dtype(name)
    if dtype.kind == "f":
        level = [NON_FINITE.get(v, v) if isinstance(v, str) else v for v in level]
        scalar = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in level)
    elif dtype.kind == "b":
        scalar = all(isinstance(v, bool) for v in level)
    else:
        scalar = all(isinstance(v, int) and not isinstance(v, bool) for v in level)
    if not scalar:
        raise StatsFileError(f"{where} holds values that are not {name} numbers")
    try:
        return np.array(level, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as error:
        raise StatsFileError(f"{where} holds values that do not fit {name} ({error})") from None
