"""Stats files: `.npz` / `.h5` / `.safetensors` / `.json` round trips and refusal of
unsafe or damaged files.

A stats file must give back the arrays and metadata it was written with;
anything that is not a normstats stats file raises
:class:`normstats.StatsFileError` (a missing path :class:`normstats.UsageError`),
and pickled objects are never loaded.
"""

from __future__ import annotations

import gc
import json
import os

import h5py
import numpy as np
import pytest
import safetensors.numpy

import normstats as ns

N = 12
SUFFIXES = [".npz", ".h5", ".safetensors", ".json"]


def data(shape, seed=0):
    return np.random.default_rng(seed).normal(1.0, 2.0, size=shape)


def bn_ema():
    return ns.BatchNormEMA(alpha=0.3, batch_size=4).update(data((N, 3))).result()


def bn_ema_no_batch_size():
    return ns.BatchNormEMA(mean=None).update(data((N, 2, 3, 2))).result()


def bn_exact_4d():
    return ns.BatchNormExact(axes=(0, 1, 3), ddof=0).update(data((N, 2, 3, 2))).result()


def bn_ema_no_inv_std():
    return ns.BatchNormEMA(inv_std=None, batch_size=5).update(data((N, 3))).result()


def bn_exact_no_mean():
    return ns.BatchNormExact(use_mean=False).update(data((N, 3))).result()


def bn_exact_1d():
    return ns.BatchNormExact().update(data((N,))).result()


def centers_ema_first():
    labels = np.array([0, 2, 0, 2, 4, 0, 2, 4, 0, 0, 2, 4])
    return ns.CentersEMA(5, init="first", batch_size=3).update(data((N, 2, 3)), labels).result()


def centers_exact():
    labels = np.array([0, 2, 0, 2, 4, 0, 2, 4, 0, 0, 2, 4])
    return ns.CentersExact(5).update(data((N, 4)).astype(np.float32), labels).result()


def bn_exact_groups():
    groups = np.array([0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2])  # group 1 unseen: NaN statistics
    return ns.BatchNormExact(num_groups=3).update(data((N, 3)), groups).result()


def bn_non_finite():
    stats = bn_exact_4d()
    stats.arrays["mean"][0] = np.inf
    stats.arrays["mean"][1] = -np.inf
    stats.arrays["var"][2] = np.nan
    return stats


def centers_exact_weighted_omit():
    x = data((N, 4)).astype(np.float32)
    x[3, 1] = np.nan
    labels = np.array([0, 2, 0, 2, 4, 0, 2, 4, 0, 0, 2, 4])
    weights = np.linspace(0.5, 2.0, N)
    return ns.CentersExact(5, nan_policy="omit").update(x, labels, weights).result()


def bn_from_file(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, data((N, 3)).astype(np.float32))
    with ns.open_stream([str(path)]) as stream:
        return ns.fit_batchnorm(ns.BatchNormExact(batch_size=4), stream)


STATS = [
    pytest.param(lambda tmp: bn_ema(), id="bn-ema"),
    pytest.param(lambda tmp: bn_ema_no_batch_size(), id="bn-ema-mean-none-no-batch-size"),
    pytest.param(lambda tmp: bn_exact_4d(), id="bn-exact-4d-axes0,1,3"),
    pytest.param(lambda tmp: bn_exact_no_mean(), id="bn-exact-mean-none"),
    pytest.param(lambda tmp: bn_ema_no_inv_std(), id="bn-ema-inv-std-none"),
    pytest.param(lambda tmp: bn_exact_1d(), id="bn-exact-1d-scalar-stats"),
    pytest.param(lambda tmp: centers_ema_first(), id="centers-ema-first-nan"),
    pytest.param(lambda tmp: centers_exact(), id="centers-exact"),
    pytest.param(lambda tmp: bn_exact_groups(), id="bn-exact-groups-unseen-nan"),
    pytest.param(lambda tmp: bn_non_finite(), id="bn-inf-and-nan"),
    pytest.param(lambda tmp: centers_exact_weighted_omit(), id="centers-exact-weighted-omit"),
    pytest.param(bn_from_file, id="bn-fit-from-file-provenance"),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("make", STATS)
def test_round_trip(make, suffix, tmp_path):
    stats = make(tmp_path)
    path = str(tmp_path / f"stats{suffix}")
    ns.write_stats(stats, path)
    back = ns.read_stats(path)
    assert back.kind == stats.kind
    assert sorted(back.arrays) == sorted(stats.arrays)
    for name, array in stats.arrays.items():
        got = np.asarray(back.arrays[name])
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    assert back.meta == dict(stats.meta, kind=stats.kind)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_write_leaves_only_the_output(suffix, tmp_path):
    ns.write_stats(bn_ema(), str(tmp_path / f"stats{suffix}"))
    assert os.listdir(tmp_path) == [f"stats{suffix}"]


class _Trap:
    """Unpickling it creates the directory `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_npz_with_object_meta_is_refused(tmp_path):
    path = tmp_path / "stats.npz"
    np.savez(path, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ns.StatsFileError):
        ns.read_stats(str(path))


@pytest.mark.parametrize("where", ["meta", "array"])
def test_npz_objects_are_never_unpickled(where, tmp_path):
    marker = tmp_path / "unpickled"
    trap = np.array([_Trap(str(marker))], dtype=object)
    meta = np.array(json.dumps({"kind": "batchnorm", "mode": "exact", "axes": [0]}))
    arrays = {"meta": trap} if where == "meta" else {"meta": meta, "mean": trap}
    path = tmp_path / "stats.npz"
    np.savez(path, **arrays)
    with pytest.raises(ns.StatsFileError):
        ns.read_stats(str(path))
    assert not marker.exists()


def _truncated(tmp_path, suffix):
    path = tmp_path / f"stats{suffix}"
    ns.write_stats(bn_ema(), str(path))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def _random_bytes(tmp_path, suffix):
    path = tmp_path / f"stats{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return path


def _empty(tmp_path, suffix):
    path = tmp_path / f"stats{suffix}"
    path.write_bytes(b"")
    return path


def _npy(tmp_path, suffix):
    path = tmp_path / "stats.npy"
    np.save(path, np.arange(3.0))
    return path


def _npz_without_meta(tmp_path, suffix):
    path = tmp_path / "stats.npz"
    np.savez(path, mean=np.zeros(3), inv_std=np.ones(3))
    return path


def _npz_meta_without_kind(tmp_path, suffix):
    path = tmp_path / "stats.npz"
    np.savez(path, meta=np.array(json.dumps({"axes": [0]})), mean=np.zeros(3))
    return path


def _npz_meta_not_json(tmp_path, suffix):
    path = tmp_path / "stats.npz"
    np.savez(path, meta=np.array("not json {"), mean=np.zeros(3))
    return path


def _npz_meta_a_list(tmp_path, suffix):
    path = tmp_path / "stats.npz"
    np.savez(path, meta=np.array(json.dumps(["kind", "mode"])), mean=np.zeros(3))
    return path


def _safetensors_without_meta(tmp_path, suffix):
    path = tmp_path / "stats.safetensors"
    safetensors.numpy.save_file({"running_mean": np.zeros(3)}, path, metadata={"format": "pt"})
    return path


def _safetensors_meta_not_json(tmp_path, suffix):
    path = tmp_path / "stats.safetensors"
    safetensors.numpy.save_file({"mean": np.zeros(3)}, path, metadata={"normstats_meta": "{not json"})
    return path


def _json_file(text):
    def make(tmp_path, suffix):
        path = tmp_path / "stats.json"
        path.write_text(text)
        return path
    return make


def _json_stats_with(**entry):
    """A JSON stats file whose `mean` entry is changed by `entry`."""
    def make(tmp_path, suffix):
        path = tmp_path / "stats.json"
        ns.write_stats(bn_ema(), str(path))
        document = json.loads(path.read_text())
        document["arrays"]["mean"].update(entry)
        path.write_text(json.dumps(document))
        return path
    return make


def _h5_without_attributes(tmp_path, suffix):
    path = tmp_path / "stats.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("mean", data=np.zeros(3))
    return path


BAD_FILES = [
    pytest.param(_random_bytes, ".npz", id="random-bytes-npz"),
    pytest.param(_random_bytes, ".h5", id="random-bytes-h5"),
    pytest.param(_empty, ".npz", id="empty"),
    pytest.param(_truncated, ".npz", id="truncated-npz"),
    pytest.param(_truncated, ".h5", id="truncated-h5"),
    pytest.param(_npy, ".npy", id="single-npy"),
    pytest.param(_npz_without_meta, ".npz", id="npz-without-meta"),
    pytest.param(_npz_meta_without_kind, ".npz", id="npz-meta-without-kind"),
    pytest.param(_npz_meta_not_json, ".npz", id="npz-meta-not-json"),
    pytest.param(_h5_without_attributes, ".h5", id="h5-without-metadata"),
    pytest.param(_npz_meta_a_list, ".npz", id="npz-meta-a-list"),
    pytest.param(_random_bytes, ".safetensors", id="random-bytes-safetensors"),
    pytest.param(_random_bytes, ".json", id="random-bytes-json"),
    pytest.param(_empty, ".safetensors", id="empty-safetensors"),
    pytest.param(_empty, ".json", id="empty-json"),
    pytest.param(_truncated, ".safetensors", id="truncated-safetensors"),
    pytest.param(_truncated, ".json", id="truncated-json"),
    pytest.param(_safetensors_without_meta, ".safetensors", id="safetensors-state-dict-without-meta"),
    pytest.param(_safetensors_meta_not_json, ".safetensors", id="safetensors-meta-not-json"),
    pytest.param(_json_file("[1, 2, 3]"), ".json", id="json-not-an-object"),
    pytest.param(_json_file('{"format": "other"}'), ".json", id="json-other-format"),
    pytest.param(_json_file('{"format": "normstats-stats", "version": 2, "meta": {}, "arrays": {}}'), ".json",
                 id="json-future-version"),
    pytest.param(_json_file('{"format": "normstats-stats", "version": 1, "meta": [], "arrays": {}}'), ".json",
                 id="json-meta-a-list"),
    pytest.param(_json_stats_with(shape=[4]), ".json", id="json-data-not-of-shape"),
    pytest.param(_json_stats_with(shape=[-3]), ".json", id="json-negative-shape"),
    pytest.param(_json_stats_with(shape="3"), ".json", id="json-shape-a-string"),
    pytest.param(_json_stats_with(dtype="object"), ".json", id="json-dtype-object"),
    pytest.param(_json_stats_with(data=[1.0, "abc", 2.0]), ".json", id="json-value-a-string"),
    pytest.param(_json_stats_with(data=[1.0, True, 2.0]), ".json", id="json-value-a-bool"),
    pytest.param(_json_stats_with(data=[1.0, [2.0], 2.0]), ".json", id="json-ragged"),
    pytest.param(_json_stats_with(data=[1, 2**70, 3], dtype="int64"), ".json", id="json-int-overflow"),
    pytest.param(_json_stats_with(data=[1, 2.5, 3], dtype="int64"), ".json", id="json-float-for-int"),
    pytest.param(_json_stats_with(data=[1.0, 2.0, 3.0, 4.0], shape=[4]), ".json", id="json-shape-unlike-meta"),
]


def error_of(call, *args):
    """The exception `call(*args)` raises, stripped of its traceback, after a
    garbage collection, so that a file handle leaked on the way out is
    reported (as an unraisable ResourceWarning) by this test and not later."""
    try:
        call(*args)
    except Exception as error:  # noqa: BLE001 - the type is what is checked
        raised = error
    else:
        return None
    for link in (raised, raised.__context__, raised.__cause__):
        if link is not None:
            link.__traceback__ = None
    gc.collect()
    return raised


@pytest.mark.parametrize("make, suffix", BAD_FILES)
def test_not_a_stats_file(make, suffix, tmp_path):
    path = make(tmp_path, suffix)
    raised = error_of(ns.read_stats, str(path))
    assert isinstance(raised, ns.StatsFileError), f"expected StatsFileError, got {raised!r}"
    assert str(path) in str(raised)


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(ns.UsageError):
        ns.read_stats(str(tmp_path / "missing.npz"))


def test_directory_is_a_usage_error(tmp_path):
    with pytest.raises(ns.UsageError):
        ns.read_stats(str(tmp_path))


# --- the safetensors and JSON layouts, read by other tools ------------------------------


def test_safetensors_file_is_plain_tensors_with_json_metadata(tmp_path):
    stats = bn_exact_groups()
    path = tmp_path / "stats.safetensors"
    ns.write_stats(stats, str(path))
    tensors = safetensors.numpy.load_file(path)
    assert sorted(tensors) == sorted(stats.arrays)
    for name, array in stats.arrays.items():
        np.testing.assert_array_equal(tensors[name], array)
    with safetensors.safe_open(path, framework="np") as f:
        meta = json.loads(f.metadata()["normstats_meta"])
    assert meta == dict(stats.meta, kind="batchnorm")


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def test_json_file_is_strict_json_with_named_non_finite_values(tmp_path):
    stats = bn_non_finite()
    path = tmp_path / "stats.json"
    ns.write_stats(stats, str(path))
    document = json.loads(path.read_text(), parse_constant=_refuse_constant)  # no bare NaN / Infinity
    assert document["format"] == "normstats-stats" and document["version"] == 1
    assert document["meta"] == dict(stats.meta, kind="batchnorm")
    mean = document["arrays"]["mean"]
    assert mean["dtype"] == "float64" and mean["shape"] == [3]
    assert mean["data"][:2] == ["Infinity", "-Infinity"]
    assert mean["data"][2] == stats.arrays["mean"][2]
    assert document["arrays"]["var"]["data"][2] == "NaN"


@pytest.mark.parametrize("written, renamed", [(".json", "stats.dat"), (".safetensors", "stats.json"),
                                              (".npz", "stats.safetensors"), (".h5", "stats.npz")])
def test_format_is_recognized_by_content(written, renamed, tmp_path):
    ns.write_stats(centers_ema_first(), str(tmp_path / f"x{written}"))
    os.rename(tmp_path / f"x{written}", tmp_path / renamed)
    back = ns.read_stats(str(tmp_path / renamed))
    np.testing.assert_array_equal(back.arrays["centers"], centers_ema_first().arrays["centers"])
