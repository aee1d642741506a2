"""Hand-edited stats files: every key of a valid file of each format set to
wrong values; only NormstatsError subclasses may escape, and the message
names the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import normstats as ns
from normstats.inspection import describe

FORMATS = (".npz", ".h5", ".safetensors", ".json")
BAD_VALUES = [None, "abc", -1, 2**70, 1.5, [], {"a": [1, None]}, [["x"]], True, [1, "2"]]


def _valid(kind: str, mode: str) -> ns.Stats:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    if kind == "batchnorm":
        state = ns.BatchNormExact() if mode == "exact" else ns.BatchNormEMA(batch_size=8)
        return state.update(x).result()
    labels = rng.integers(0, 4, size=40)
    labels[:4] = np.arange(4)
    state = ns.CentersExact(4) if mode == "exact" else ns.CentersEMA(4)
    return state.update(x, labels).result()


def _read_and_use(path: str) -> None:
    stats = ns.read_stats(path)
    describe(stats)


def _tries(path: Path) -> tuple[int, int]:
    """(files read, files refused); anything else escaping fails the test."""
    try:
        _read_and_use(str(path))
        return 1, 0
    except ns.NormstatsError as error:
        assert "\n" not in str(error)
        return 0, 1


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("kind, mode", [("batchnorm", "exact"), ("batchnorm", "ema"), ("centers", "exact"),
                                        ("centers", "ema")])
def test_every_metadata_key_with_wrong_values(tmp_path: Path, suffix: str, kind: str, mode: str) -> None:
    valid = _valid(kind, mode)
    path = tmp_path / f"s{suffix}"
    refused = 0
    for key in list(valid.meta) + ["checkpoint"]:
        for value in BAD_VALUES:
            meta = dict(valid.meta, **{key: value})
            try:
                ns.write_stats(ns.Stats(valid.kind, dict(valid.arrays), meta), str(path))
            except (TypeError, ValueError):
                continue  # a value this format cannot even store
            _, no = _tries(path)
            refused += no
    assert refused > len(valid.meta)  # most wrong values are caught


def _error_of(path: Path) -> str:
    with pytest.raises(ns.NormstatsError) as raised:
        _read_and_use(str(path))
    return str(raised.value)


@pytest.mark.parametrize("suffix", FORMATS)
def test_named_key_in_the_message(tmp_path: Path, suffix: str) -> None:
    valid = _valid("batchnorm", "exact")
    for key, value in (("eps", "abc"), ("rows_seen", -3), ("axes", [["x"]]), ("near_constant", {"a": 1}),
                       ("ddof", 1.5), ("row_shape", "3")):
        path = tmp_path / f"{key}{suffix}"
        ns.write_stats(ns.Stats(valid.kind, dict(valid.arrays), dict(valid.meta, **{key: value})), str(path))
        message = _error_of(path)
        assert f"key {key!r}" in message and str(path) in message, message


@pytest.mark.parametrize("suffix", (".npz", ".h5", ".json"))
@pytest.mark.parametrize("kind, mode", [("batchnorm", "exact"), ("centers", "exact"), ("centers", "ema")])
def test_every_array_with_wrong_contents(tmp_path: Path, suffix: str, kind: str, mode: str) -> None:
    valid = _valid(kind, mode)
    path = tmp_path / f"s{suffix}"
    for name in valid.arrays:
        for value in (np.array(["a", "b"]), np.zeros((0,)), np.full(valid.arrays[name].shape, np.nan),
                      np.full(valid.arrays[name].shape, -1.0), np.zeros((2, 2, 2)), np.array(5.0),
                      np.ones(valid.arrays[name].shape, bool)):
            try:
                ns.write_stats(ns.Stats(valid.kind, dict(valid.arrays, **{name: value}), dict(valid.meta)),
                               str(path))
            except (TypeError, ValueError):
                continue
            _tries(path)


JSON_MUTATIONS = [
    lambda d: d.update(meta=[1, 2]),
    lambda d: d.update(arrays=[]),
    lambda d: d["arrays"]["mean"].update(dtype="complex128"),
    lambda d: d["arrays"]["mean"].update(dtype=5),
    lambda d: d["arrays"]["mean"].update(shape=[10**12]),
    lambda d: d["arrays"]["mean"].update(shape=[-1]),
    lambda d: d["arrays"]["mean"].update(shape="3"),
    lambda d: d["arrays"]["mean"].update(data="123"),
    lambda d: d["arrays"]["mean"].update(data=[1, 2, {"x": 1}]),
    lambda d: d["arrays"]["mean"].update(data=[[1], [2], [3]]),
    lambda d: d["arrays"]["count"].update(dtype="int64", data=[2**70, 1, 1]),
    lambda d: d["arrays"]["count"].update(data=["Infinity", 1, 1]),
    lambda d: d["arrays"].update(mean=[1, 2, 3]),
    lambda d: d["arrays"].update(mean=None),
    lambda d: d.update(version="1"),
    lambda d: d["meta"].update(checkpoint={"rows_done": "many", "rows_total": 40, "sources": ["x"]}),
    lambda d: d["meta"].pop("eps"),
    lambda d: d["meta"].update(eps=float("nan")),
]


def test_hand_edited_json_documents(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    ns.write_stats(_valid("batchnorm", "exact"), str(path))
    original = json.loads(path.read_text())
    refused = 0
    for mutate in JSON_MUTATIONS:
        document = json.loads(json.dumps(original))
        mutate(document)
        path.write_text(json.dumps(document))
        refused += _tries(path)[1]
    assert refused == len(JSON_MUTATIONS)


def test_hand_edited_json_stats_in_the_cli_is_one_line(run, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    ns.write_stats(_valid("batchnorm", "exact"), str(path))
    document = json.loads(path.read_text())
    document["meta"]["eps"] = "small"
    path.write_text(json.dumps(document))
    np.save(tmp_path / "x.npy", np.ones((4, 3)))
    for args in (["inspect", path], ["apply", path, tmp_path / "x.npy", "-o", tmp_path / "y.npy"],
                 ["export", path, "--to", "torch", "-o", tmp_path / "bn.safetensors"]):
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == f"Error: stats file {str(path)!r}: key 'eps': expected a finite " \
                                        "non-negative number, got 'small'; re-create the file (or fix that value)"
