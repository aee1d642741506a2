"""The ``normstats`` command line: numbers written against plain numpy references,
metadata, summaries, and every user error mapped to ``Error: ...`` with an exit code."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import h5py
import numpy as np
import pytest
import safetensors.numpy

import normstats
import normstats.cli.commands
import normstats.pipeline
import normstats.writers.rows
import normstats.writers.stats_h5
from normstats.cli import cli
from tests.reference import (
    ref_bn_ema, ref_bn_exact, ref_centers_ema, ref_centers_ema_first, ref_centers_exact, ref_nearest,
)

RTOL = 1e-5
BN_META_KEYS = {
    "mode", "axes", "alpha", "eps", "ddof", "batch_size", "rows_seen", "batches_seen",
    "batches_skipped", "row_shape", "input_dtype", "sources", "normstats_version",
}


# --- helpers -------------------------------------------------------------------------


def _attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_stats(path) -> tuple[dict, dict]:
    """Arrays and metadata of a stats file, read with plain numpy / h5py (never unpickling)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files if name != "meta"}
            meta = json.loads(str(archive["meta"]))
        return arrays, meta
    with h5py.File(path, "r") as f:
        arrays = {name: f[name][()] for name in f}
        meta = {key: _attr(value) for key, value in f.attrs.items()}
    return arrays, meta


def save_h5(path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
    return Path(path)


def ok(result, output=None) -> str:
    """Assert a successful run with exactly one summary line naming `output`; return it."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout.endswith("\n"), result.stdout
    if output is not None:
        assert lines[0].endswith(f"-> {output}"), lines[0]
    return lines[0]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def snapshot(folder: Path) -> dict:
    """Every file below `folder` with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def files(tmp_path, npy4d, h5file, h5single, features_npy, labels_npy):
    return SimpleNamespace(tmp=tmp_path, npy4d=npy4d, h5=h5file, h5single=h5single,
                           features_npy=features_npy, labels_npy=labels_npy)


# --- help and version --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_with_an_example(run, name):
    result = run(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout
    assert f"normstats {name} " in result.stdout
    assert result.stderr == ""


def test_group_help_lists_every_command(run):
    result = run("--help")
    assert result.exit_code == 0
    for name in cli.commands:
        assert name in result.stdout


def test_version(run):
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"normstats, version {normstats.__version__}"
    assert normstats.__version__ == importlib.metadata.version("normstats")


# --- fit-bn: numbers --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_bn_npy_matches_numpy_ema(run, files, x4d, suffix):
    out = files.tmp / f"stats{suffix}"
    line = ok(run("fit-bn", files.npy4d, "-o", out, "--batch-size", 8), out)
    arrays, meta = load_stats(out)
    mean, inv_std, batches, _ = ref_bn_ema(x4d, batch_size=8)
    assert arrays["mean"].shape == (3,)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    assert meta["batches_seen"] == batches == 5
    assert "37 rows" in line and "fit-bn" in line


@pytest.mark.parametrize("form", ["colon", "dataset-option", "single-dataset"])
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_bn_hdf5_input_forms(run, files, features, form, suffix):
    args = {"colon": [f"{files.h5}:x"], "dataset-option": [files.h5, "--dataset", "x"],
            "single-dataset": [files.h5single]}[form]
    out = files.tmp / f"stats{suffix}"
    ok(run("fit-bn", *args, "-o", out, "--batch-size", 10, "--alpha", 0.2), out)
    arrays, meta = load_stats(out)
    mean, inv_std, _, _ = ref_bn_ema(features, batch_size=10, alpha=0.2)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    expected_source = f"{files.h5single}:only" if form == "single-dataset" else f"{files.h5}:x"
    assert meta["sources"] == [expected_source]


@pytest.mark.parametrize(
    "options, reference",
    [
        pytest.param([], {}, id="defaults"),
        pytest.param(["--axes", "auto"], {}, id="axes-auto"),
        pytest.param(["--axes", "0,2"], {"axes": (0, 2)}, id="axes-0,2"),
        pytest.param(["--axes", "0"], {"axes": (0,)}, id="axes-0"),
        pytest.param(["--axes", "-4,2,-1"], {"axes": (0, 2, 3)}, id="axes-negative"),
        pytest.param(["--alpha", "0.25"], {"alpha": 0.25}, id="alpha"),
        pytest.param(["--alpha", "1"], {"alpha": 1.0}, id="alpha-1-last-batch"),
        pytest.param(["--eps", "0.5"], {"eps": 0.5}, id="eps"),
        pytest.param(["--ddof", "0"], {"ddof": 0}, id="ddof-0"),
        pytest.param(["--mean", "0.5", "--inv-std", "2"], {"mean": 0.5, "inv_std": 2.0}, id="initial"),
    ],
)
def test_fit_bn_options_match_numpy(run, files, x4d, options, reference):
    out = files.tmp / "stats.npz"
    ok(run("fit-bn", files.npy4d, "-o", out, "--batch-size", 6, *options), out)
    arrays, meta = load_stats(out)
    mean, inv_std, _, _ = ref_bn_ema(x4d, batch_size=6, **reference)
    assert arrays["mean"].shape == mean.shape
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    assert meta["axes"] == list(reference.get("axes", (0, 2, 3)))


def test_fit_bn_skips_batches_not_larger_than_ddof(run, files, features):
    out = files.tmp / "stats.npz"
    line = ok(run("fit-bn", f"{files.h5}:x", "-o", out, "--batch-size", 26, "--alpha", 0.5), out)
    arrays, meta = load_stats(out)
    mean, inv_std, batches, skipped = ref_bn_ema(features, batch_size=26, alpha=0.5)
    assert (batches, skipped) == (3, 1)  # 26 + 26 + 1 row: the last has n = 1 <= ddof
    assert (meta["batches_seen"], meta["batches_skipped"]) == (3, 1)
    assert "(1 skipped)" in line
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)


@pytest.mark.parametrize("disabled", ["mean", "inv-std"])
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_bn_disabled_statistic_is_absent(run, files, x4d, disabled, suffix):
    out = files.tmp / f"stats{suffix}"
    ok(run("fit-bn", files.npy4d, "-o", out, "--batch-size", 8, f"--{disabled}", "none"), out)
    arrays, _ = load_stats(out)
    mean, inv_std, _, _ = ref_bn_ema(x4d, batch_size=8)
    if disabled == "mean":
        assert set(arrays) == {"inv_std"}
        np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    else:
        assert set(arrays) == {"mean"}
        np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_bn_exact_is_population_statistics(run, files, x4d, ddof, suffix):
    out = files.tmp / f"stats{suffix}"
    ok(run("fit-bn", files.npy4d, "-o", out, "--mode", "exact", "--ddof", ddof, "--eps", 1e-3), out)
    arrays, meta = load_stats(out)
    mean, var, inv_std = ref_bn_exact(x4d, ddof=ddof, eps=1e-3)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["var"], var, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    assert meta["mode"] == "exact" and meta["rows_seen"] == 37


def test_fit_bn_exact_does_not_depend_on_batch_size(run, files):
    outs = []
    for batch_size in (1, 5, 37, 500):
        out = files.tmp / f"exact{batch_size}.npz"
        ok(run("fit-bn", files.npy4d, "-o", out, "--mode", "exact", "--batch-size", batch_size))
        outs.append(load_stats(out)[0])
    for arrays in outs[1:]:
        for name in ("mean", "inv_std", "var"):
            np.testing.assert_allclose(arrays[name], outs[0][name], rtol=1e-12)


@pytest.mark.parametrize("mode", ["ema", "exact"])
def test_fit_bn_shards_equal_their_concatenation(run, files, features, mode):
    # shards of 10, 7 and 36 rows (npy, npy, HDF5): batches of 8 cross both boundaries
    a, b = files.tmp / "a.npy", files.tmp / "b.npy"
    np.save(a, features[:10])
    np.save(b, features[10:17])
    c = save_h5(files.tmp / "c.h5", feats=features[17:])
    sharded, whole = files.tmp / "sharded.npz", files.tmp / "whole.npz"
    common = ["--batch-size", 8, "--alpha", 0.3, "--mode", mode] if mode == "ema" else ["--mode", mode]
    ok(run("fit-bn", a, b, f"{c}:feats", "-o", sharded, *common), sharded)
    ok(run("fit-bn", files.features_npy, "-o", whole, *common), whole)
    got, meta = load_stats(sharded)
    expected, _ = load_stats(whole)
    for name in ("mean", "inv_std"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12)
    if mode == "ema":
        mean, inv_std, _, _ = ref_bn_ema(features, batch_size=8, alpha=0.3)
        np.testing.assert_allclose(got["mean"], mean, rtol=RTOL)
        np.testing.assert_allclose(got["inv_std"], inv_std, rtol=RTOL)
    assert meta["sources"] == [str(a), str(b), f"{c}:feats"]
    assert meta["rows_seen"] == 53


def test_fit_bn_batches_do_not_depend_on_read_blocks(run, files, x4d, monkeypatch):
    # Force small reads of two batches each (several blocks, several batches folded per block):
    # the logical batch (one EMA step) must stay --batch-size rows.
    monkeypatch.setattr(normstats.pipeline, "block_rows_for", lambda row_bytes, batch_size, **_: 2 * batch_size)
    out = files.tmp / "stats.npz"
    ok(run("fit-bn", files.npy4d, "-o", out, "--batch-size", 8, "--alpha", 0.3), out)
    arrays, meta = load_stats(out)
    mean, inv_std, batches, _ = ref_bn_ema(x4d, batch_size=8, alpha=0.3)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    assert meta["batches_seen"] == batches


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_bn_init_continues_an_ema_fit(run, files, features, suffix):
    first, second = files.tmp / "first.npy", files.tmp / "second.npy"
    np.save(first, features[:24])  # three whole batches of 8
    np.save(second, features[24:])
    options = ["--batch-size", 8, "--alpha", 0.2, "--eps", 1e-3, "--ddof", 0]
    start, resumed = files.tmp / f"start{suffix}", files.tmp / f"resumed{suffix}"
    ok(run("fit-bn", first, "-o", start, *options), start)
    ok(run("fit-bn", second, "-o", resumed, "--init", start, *options), resumed)
    arrays, meta = load_stats(resumed)
    mean, inv_std, batches, _ = ref_bn_ema(features, batch_size=8, alpha=0.2, eps=1e-3, ddof=0)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    assert (meta["rows_seen"], meta["batches_seen"]) == (53, batches)


def test_fit_bn_init_takes_the_fit_options_from_the_file(run, files, features):
    """DESIGN: 'apply and resume need nothing but the file' -- continuing without
    repeating --alpha/--batch-size/--eps/--ddof must go on with the file's options."""
    first, second = files.tmp / "first.npy", files.tmp / "second.npy"
    np.save(first, features[:24])
    np.save(second, features[24:])
    start, resumed = files.tmp / "start.npz", files.tmp / "resumed.npz"
    ok(run("fit-bn", first, "-o", start, "--batch-size", 8, "--alpha", 0.2, "--eps", 1e-3,
           "--ddof", 0), start)
    ok(run("fit-bn", second, "-o", resumed, "--init", start), resumed)
    arrays, meta = load_stats(resumed)
    assert (meta["alpha"], meta["batch_size"], meta["eps"], meta["ddof"]) == (0.2, 8, 1e-3, 0)
    mean, inv_std, _, _ = ref_bn_ema(features, batch_size=8, alpha=0.2, eps=1e-3, ddof=0)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)


def test_fit_bn_init_continues_an_exact_fit(run, files, features):
    first, second = files.tmp / "first.npy", files.tmp / "second.npy"
    np.save(first, features[:20])
    np.save(second, features[20:])
    start, resumed = files.tmp / "start.npz", files.tmp / "resumed.npz"
    ok(run("fit-bn", first, "-o", start, "--mode", "exact"), start)
    ok(run("fit-bn", second, "-o", resumed, "--mode", "exact", "--init", start), resumed)
    arrays, meta = load_stats(resumed)
    mean, var, inv_std = ref_bn_exact(features)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(arrays["var"], var, rtol=1e-10)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=1e-10)
    assert meta["rows_seen"] == 53


def test_fit_bn_init_refuses_new_axes(run, files):
    start = files.tmp / "start.npz"
    ok(run("fit-bn", files.npy4d, "-o", start))
    before = snapshot(files.tmp)
    result = run("fit-bn", files.npy4d, "-o", files.tmp / "next.npz", "--init", start, "--axes", "0")
    assert result.exit_code == 2
    assert any("--axes" in line for line in error_lines(result))
    assert snapshot(files.tmp) == before


# --- metadata -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_bn_metadata(run, files, suffix):
    out = files.tmp / f"stats{suffix}"
    ok(run("fit-bn", files.npy4d, "-o", out, "--batch-size", 8, "--alpha", 0.125, "--eps", 0.001,
           "--ddof", 0), out)
    if suffix == ".npz":
        with np.load(out, allow_pickle=False) as archive:
            assert archive["meta"].dtype.kind == "U" and archive["meta"].ndim == 0
            meta = json.loads(str(archive["meta"]))
    else:
        with h5py.File(out, "r") as f:
            meta = {key: _attr(value) for key, value in f.attrs.items()}
    assert BN_META_KEYS <= set(meta)
    assert meta["mode"] == "ema"
    assert meta["axes"] == [0, 2, 3]
    assert (meta["alpha"], meta["eps"], meta["ddof"], meta["batch_size"]) == (0.125, 0.001, 0, 8)
    assert (meta["rows_seen"], meta["batches_seen"], meta["batches_skipped"]) == (37, 5, 0)
    assert meta["row_shape"] == [3, 4, 5]
    assert meta["input_dtype"] == "float32"
    assert meta["sources"] == [str(files.npy4d)]
    assert meta["normstats_version"] == normstats.__version__


def test_fit_bn_exact_metadata(run, files):
    out = files.tmp / "stats.h5"
    ok(run("fit-bn", f"{files.h5}:x", "-o", out, "--mode", "exact", "--batch-size", 10), out)
    _, meta = load_stats(out)
    assert BN_META_KEYS - {"alpha"} <= set(meta)
    assert (meta["mode"], meta["rows_seen"], meta["batches_seen"]) == ("exact", 53, 6)
    assert meta["row_shape"] == [6] and meta["axes"] == [0]


# --- fit-centers ---------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["zeros", "first"])
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_centers_ema_matches_numpy(run, files, features, labels, init, suffix):
    out = files.tmp / f"centers{suffix}"
    line = ok(run("fit-centers", f"{files.h5}:x", "--labels", f"{files.h5}:labels", "--num-classes", 4,
                  "--batch-size", 7, "--alpha", 0.3, "--init", init, "-o", out), out)
    arrays, meta = load_stats(out)
    expected = (ref_centers_ema_first(features, labels, 4, 7, alpha=0.3) if init == "first"
                else ref_centers_ema(features, labels, 4, 7, alpha=0.3))[0]
    assert arrays["centers"].shape == (4, 6)
    np.testing.assert_allclose(arrays["centers"], expected, rtol=RTOL)
    np.testing.assert_array_equal(arrays["counts"], np.bincount(labels, minlength=4))
    assert (meta["mode"], meta["num_classes"], meta["rows_seen"], meta["batches_seen"]) == ("ema", 4, 53, 8)
    assert meta["alpha"] == 0.3 and meta["init"] == init
    assert "4 classes (0 unseen)" in line


def test_fit_centers_ema_with_npy_labels_and_4d_features(run, files, x4d):
    y = np.random.default_rng(3).integers(0, 3, size=37)
    np.save(files.tmp / "y.npy", y)
    out = files.tmp / "centers.npz"
    ok(run("fit-centers", files.npy4d, "--labels", files.tmp / "y.npy", "--num-classes", 3,
           "--batch-size", 5, "--init", "first", "-o", out), out)
    arrays, _ = load_stats(out)
    expected = ref_centers_ema_first(x4d, y, 3, 5)[0]
    assert arrays["centers"].shape == (3, 3, 4, 5)
    np.testing.assert_allclose(arrays["centers"], expected, rtol=RTOL)


def test_fit_centers_init_file(run, files, features, labels):
    start = np.arange(24, dtype=np.float64).reshape(4, 6) / 10
    np.save(files.tmp / "start.npy", start)
    out = files.tmp / "centers.npz"
    ok(run("fit-centers", files.features_npy, "--labels", files.labels_npy, "--num-classes", 4,
           "--batch-size", 16, "--alpha", 0.5, "--init", files.tmp / "start.npy", "-o", out), out)
    arrays, _ = load_stats(out)
    expected = ref_centers_ema(features, labels, 4, 16, alpha=0.5, init_centers=start)[0]
    np.testing.assert_allclose(arrays["centers"], expected, rtol=RTOL)


def test_fit_centers_random_init_is_seeded_and_bounded(run, files):
    # Classes 4 and 5 never occur: they keep their random initial value.
    def fit(name, *seed):
        out = files.tmp / name
        ok(run("fit-centers", f"{files.h5}:x", "--labels", f"{files.h5}:labels", "--num-classes", 6,
               *seed, "-o", out), out)
        return load_stats(out)[0]["centers"]

    a, b, c = fit("a.npz"), fit("b.npz", "--seed", 0), fit("c.npz", "--seed", 1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[4:], c[4:])
    assert np.all(np.abs(a[4:]) <= 1 / np.sqrt(6)) and np.all(np.isfinite(a))


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_fit_centers_exact(run, files, features, labels, suffix):
    out = files.tmp / f"centers{suffix}"
    line = ok(run("fit-centers", files.features_npy, "--labels", files.labels_npy, "--num-classes", 6,
                  "--mode", "exact", "-o", out), out)
    arrays, meta = load_stats(out)
    expected = ref_centers_exact(features, labels, 6)[0]
    np.testing.assert_allclose(arrays["centers"], expected, rtol=1e-10)  # NaN == NaN here
    assert np.all(np.isnan(arrays["centers"][4:]))
    np.testing.assert_array_equal(arrays["counts"], np.bincount(labels, minlength=6))
    assert (meta["mode"], meta["classes_unseen"]) == ("exact", 2)
    assert "(2 unseen)" in line


def test_fit_centers_shards_with_one_labels_file_each(run, files, features, labels):
    parts = []
    for i, (lo, hi) in enumerate([(0, 20), (20, 53)]):
        np.save(files.tmp / f"x{i}.npy", features[lo:hi])
        np.save(files.tmp / f"y{i}.npy", labels[lo:hi])
        parts += [files.tmp / f"x{i}.npy"]
    out = files.tmp / "centers.npz"
    ok(run("fit-centers", *parts, "--labels", files.tmp / "y0.npy", "--labels", files.tmp / "y1.npy",
           "--num-classes", 4, "--batch-size", 8, "--init", "zeros", "-o", out), out)
    arrays, _ = load_stats(out)
    expected = ref_centers_ema(features, labels, 4, 8)[0]
    np.testing.assert_allclose(arrays["centers"], expected, rtol=RTOL)


# --- apply ---------------------------------------------------------------------------------


def normalize_reference(x, arrays, axes, *, gamma=1.0, beta=0.0):
    x = np.asarray(x, dtype=np.float64)
    shape = [1 if axis in axes else size for axis, size in enumerate(x.shape)]
    y = x - arrays["mean"].reshape(shape) if "mean" in arrays else x
    scale = np.asarray(gamma, dtype=np.float64)
    if "inv_std" in arrays:
        scale = scale * arrays["inv_std"]
    y = y * (scale.reshape(shape) if scale.ndim else scale)
    beta = np.asarray(beta, dtype=np.float64)
    return y + (beta.reshape(shape) if beta.ndim else beta)


@pytest.mark.parametrize("stats_suffix", [".npz", ".h5"])
def test_apply_npy_to_npy(run, files, x4d, stats_suffix):
    stats = files.tmp / f"stats{stats_suffix}"
    ok(run("fit-bn", files.npy4d, "-o", stats, "--batch-size", 8, "--alpha", 0.5))
    out = files.tmp / "normalized.npy"
    ok(run("apply", stats, files.npy4d, "-o", out, "--gamma", 2.0, "--beta", 0.5), out)
    y = np.load(out)
    arrays, _ = load_stats(stats)
    assert y.shape == x4d.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, normalize_reference(x4d, arrays, (0, 2, 3), gamma=2.0, beta=0.5),
                               rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("axes, kept", [("0,2,3", (3,)), ("0,2", (3, 5)), ("0", (3, 4, 5)), ("0,1,3", (4,))])
def test_apply_with_custom_axes(run, files, x4d, axes, kept):
    stats, out = files.tmp / "stats.npz", files.tmp / "y.npy"
    ok(run("fit-bn", files.npy4d, "-o", stats, "--axes", axes, "--mode", "exact"), stats)
    arrays, _ = load_stats(stats)
    assert arrays["mean"].shape == kept
    ok(run("apply", stats, files.npy4d, "-o", out, "--gamma", 2), out)
    reduced = tuple(int(a) for a in axes.split(","))
    y = np.load(out)
    assert y.shape == x4d.shape
    np.testing.assert_allclose(y, normalize_reference(x4d, arrays, reduced, gamma=2.0), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(y.astype(np.float64).mean(axis=reduced), 0.0, atol=1e-5)


@pytest.mark.parametrize("source, target, dataset", [
    ("colon", "out.h5", "x"), ("colon", "out.h5:normed", "normed"), ("dataset-option", "out.hdf5", "x")])
def test_apply_h5_to_h5(run, files, features, source, target, dataset):
    stats = files.tmp / "stats.npz"
    ok(run("fit-bn", f"{files.h5}:x", "-o", stats, "--mode", "exact"))
    inputs = [f"{files.h5}:x"] if source == "colon" else [files.h5, "--dataset", "x"]
    ok(run("apply", stats, *inputs, "-o", files.tmp / target, "--beta", -1), files.tmp / target)
    with h5py.File(files.tmp / target.partition(":")[0], "r") as f:
        assert list(f) == [dataset]
        y = f[dataset][()]
    arrays, _ = load_stats(stats)
    assert y.shape == features.shape
    np.testing.assert_allclose(y, normalize_reference(features, arrays, (0,), beta=-1.0), rtol=RTOL, atol=1e-5)
    # exact standardization: mean -1 (beta), std ~1
    np.testing.assert_allclose(y.mean(axis=0), -1.0, atol=1e-5)


def test_apply_gamma_and_beta_files(run, files, x4d):
    stats = files.tmp / "stats.npz"
    ok(run("fit-bn", files.npy4d, "-o", stats, "--mode", "exact"))
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([0.0, -1.0, 10.0])
    np.save(files.tmp / "gamma.npy", gamma)
    save_h5(files.tmp / "affine.h5", beta=beta, other=np.zeros(2))
    out = files.tmp / "y.npy"
    ok(run("apply", stats, files.npy4d, "-o", out, "--gamma", files.tmp / "gamma.npy",
           "--beta", f"{files.tmp / 'affine.h5'}:beta"), out)
    arrays, _ = load_stats(stats)
    np.testing.assert_allclose(np.load(out), normalize_reference(x4d, arrays, (0, 2, 3), gamma=gamma, beta=beta),
                               rtol=RTOL, atol=1e-5)


def test_apply_drops_disabled_terms(run, files, x4d):
    stats = files.tmp / "stats.npz"
    ok(run("fit-bn", files.npy4d, "-o", stats, "--mean", "none", "--batch-size", 8))
    out = files.tmp / "y.npy"
    ok(run("apply", stats, files.npy4d, "-o", out, "--gamma", "none", "--beta", 3), out)
    arrays, _ = load_stats(stats)
    assert "mean" not in arrays
    expected = x4d.astype(np.float64) * arrays["inv_std"][:, None, None] + 3
    np.testing.assert_allclose(np.load(out), expected, rtol=RTOL, atol=1e-5)


def test_apply_integer_input_becomes_float32(run, files):
    x = np.random.default_rng(5).integers(-100, 100, size=(40, 4)).astype(np.int16)
    np.save(files.tmp / "ints.npy", x)
    stats, out = files.tmp / "stats.npz", files.tmp / "y.npy"
    ok(run("fit-bn", files.tmp / "ints.npy", "-o", stats, "--mode", "exact"))
    ok(run("apply", stats, files.tmp / "ints.npy", "-o", out), out)
    y = np.load(out)
    arrays, _ = load_stats(stats)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, normalize_reference(x, arrays, (0,)), rtol=RTOL, atol=1e-5)


# --- assign ------------------------------------------------------------------------------------


def _assigned(path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["labels"][()], f["distances"][()], {key: _attr(value) for key, value in f.attrs.items()}


@pytest.mark.parametrize("mode", ["ema", "exact"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_assign_labels_rows_with_the_nearest_centers(run, files, features, mode, metric):
    centers_file, out = files.tmp / "centers.npz", files.tmp / "assigned.h5"
    ok(run("fit-centers", files.features_npy, "--labels", files.labels_npy, "--num-classes", 5,
           "--mode", mode, "-o", centers_file), centers_file)  # class 4 never occurs
    line = ok(run("assign", centers_file, f"{files.h5}:x", "-o", out, "--metric", metric), out)
    assert line.startswith(f"assign {metric}: 53 rows, 4 classes (1 never seen, excluded), ")
    got_labels, got_distances, meta = _assigned(out)
    arrays, _ = load_stats(centers_file)
    expected_labels, expected_distances = ref_nearest(features, arrays["centers"], arrays["counts"], 1, metric)
    np.testing.assert_array_equal(got_labels, expected_labels[:, 0])
    np.testing.assert_allclose(got_distances, expected_distances[:, 0], rtol=1e-12, atol=1e-12)
    assert 4 not in got_labels
    assert (meta["metric"], meta["top_k"], meta["max_distance"]) == (metric, 1, None)
    assert (meta["centers"], meta["sources"], meta["rows"]) == (str(centers_file), [f"{files.h5}:x"], 53)
    assert (meta["classes_used"], meta["classes_excluded"]) == (4, 1)


def test_assign_top_k_and_max_distance(run, files, features):
    centers_file, out = _centers(files.tmp / "centers.h5", files), files.tmp / "top.hdf5"
    line = ok(run("assign", centers_file, files.features_npy, "-o", out, "--top-k", 3,
                  "--max-distance", 2.5), out)
    got_labels, got_distances, meta = _assigned(out)
    arrays, _ = load_stats(centers_file)
    expected_labels, expected_distances = ref_nearest(features, arrays["centers"], arrays["counts"], 3)
    assert got_labels.shape == got_distances.shape == (53, 3)
    np.testing.assert_allclose(got_distances, expected_distances, rtol=1e-12)
    np.testing.assert_array_equal(got_labels, np.where(expected_distances > 2.5, -1, expected_labels))
    rejected = int(np.sum(expected_distances[:, 0] > 2.5))
    assert 0 < rejected < 53 and f"top 3, {rejected} rejected (distance > 2.5)" in line
    assert meta["max_distance"] == 2.5


def test_assign_force_overwrites(run, files):
    centers_file, out = _centers(files.tmp / "centers.npz", files), files.tmp / "a.h5"
    out.write_bytes(b"old")
    assert run("assign", centers_file, files.features_npy, "-o", out).exit_code == 2
    assert out.read_bytes() == b"old"
    ok(run("assign", centers_file, files.features_npy, "-o", out, "--force"), out)
    assert _assigned(out)[0].shape == (53,)


# --- output conventions ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["fit-bn", "fit-centers", "apply", "assign"])
def test_one_summary_line_and_quiet_stderr(run, files, command):
    stats = _stats(files.tmp / "stats.npz", files.features_npy)
    out, args = {
        "fit-bn": (files.tmp / "out.npz", [files.features_npy]),
        "fit-centers": (files.tmp / "out.h5", [files.features_npy, "--labels", files.labels_npy,
                                               "--num-classes", 4]),
        "apply": (files.tmp / "out.npy", [stats, files.features_npy]),
        "assign": (files.tmp / "out.h5", [_centers(files.tmp / "centers.npz", files), files.features_npy]),
    }[command]
    line = ok(run(command, *args, "-o", out), out)
    assert line.startswith(f"{command} " if command != "apply" else "apply:")
    assert "53 rows" in line
    assert out.exists()


def test_output_file_permissions_follow_the_umask(run, files):
    """A stats file is shared like any other output: mode 0666 & ~umask, not mkstemp's 0600."""
    umask = os.umask(0o022)
    try:
        out = files.tmp / "stats.npz"
        ok(run("fit-bn", files.npy4d, "-o", out), out)
        assert out.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_stats_output_takes_no_dataset_name(run, files):
    """`-o stats.h5:NAME` was validated as stats.h5; it must not write a file named 'stats.h5:NAME'."""
    result = run("fit-bn", files.npy4d, "-o", f"{files.tmp / 'stats.h5'}:NAME")
    assert not any(":" in p.name for p in files.tmp.iterdir()), sorted(p.name for p in files.tmp.iterdir())
    if result.exit_code == 0:
        assert (files.tmp / "stats.h5").exists()
    else:
        assert result.exit_code == 2 and error_lines(result)


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_every_command_reads_safetensors_and_json_stats(run, files, features, labels, suffix):
    """apply, merge, inspect and --init take the new formats as they take .npz."""
    ok(run("fit-bn", files.features_npy, "-o", "a.npz", "--mode", "exact"))
    ok(run("fit-bn", files.features_npy, "-o", f"a{suffix}", "--mode", "exact"), f"a{suffix}")
    ok(run("apply", "a.npz", files.features_npy, "-o", "from_npz.npy"))
    ok(run("apply", f"a{suffix}", files.features_npy, "-o", "y.npy"))
    assert np.array_equal(np.load(files.tmp / "y.npy"), np.load(files.tmp / "from_npz.npy"))
    twice = np.concatenate([features, features])
    ok(run("merge", f"a{suffix}", "a.npz", "-o", f"m{suffix}"), f"m{suffix}")
    ok(run("fit-bn", files.features_npy, "--init", f"a{suffix}", "-o", f"c{suffix}"), f"c{suffix}")
    mean, var, inv_std = ref_bn_exact(twice)
    for name in ("m", "c"):
        arrays = normstats.read_stats(str(files.tmp / f"{name}{suffix}")).arrays
        np.testing.assert_allclose(arrays["mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(arrays["var"], var, rtol=1e-12)
    summary = json.loads(run("inspect", f"m{suffix}", "--json").stdout)
    assert summary["options"]["merged_from"] == [f"a{suffix}", "a.npz"]
    ok(run("fit-centers", files.features_npy, "--labels", files.labels_npy, "--num-classes", 4,
           "--mode", "exact", "-o", f"k{suffix}"))
    centers, counts, _ = ref_centers_exact(features, labels, 4)
    ok(run("fit-centers", files.features_npy, "--labels", files.labels_npy, "--num-classes", 4,
           "--init", f"k{suffix}", "-o", "k2.npz"))
    arrays = normstats.read_stats(str(files.tmp / "k2.npz")).arrays
    np.testing.assert_allclose(arrays["centers"], centers, rtol=1e-12)
    np.testing.assert_array_equal(arrays["counts"], 2 * counts)


def test_force_overwrites(run, files):
    out = files.tmp / "stats.npz"
    ok(run("fit-bn", files.npy4d, "-o", out, "--mode", "exact"))
    ok(run("fit-bn", files.npy4d, "-o", out, "--force"), out)
    assert load_stats(out)[1]["mode"] == "ema"


# --- errors ----------------------------------------------------------------------------------


def _stats(path: Path, source: Path, **options) -> Path:
    with normstats.open_stream([str(source)]) as stream:
        normstats.write_stats(normstats.fit_batchnorm(normstats.BatchNormEMA(**options), stream), str(path))
    return path


def _exact_stats(path: Path, source: Path) -> Path:
    with normstats.open_stream([str(source)]) as stream:
        normstats.write_stats(normstats.fit_batchnorm(normstats.BatchNormExact(), stream), str(path))
    return path


def _centers(path: Path, f, num_classes: int = 4) -> Path:
    with normstats.open_stream([f"{f.h5}:x"]) as x, normstats.open_stream([f"{f.h5}:labels"]) as y:
        normstats.write_stats(normstats.fit_centers(normstats.CentersExact(num_classes), x, y), str(path))
    return path


class _Evil:
    """Unpickling this creates a marker file: proof that pickles were executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_npz(f) -> Path:
    path = f.tmp / "evil.npz"
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(str(f.tmp / "PWNED"))
    meta = json.dumps({"kind": "batchnorm", "mode": "ema", "axes": [0], "row_shape": [6]})
    np.savez(path, meta=np.array(meta), mean=evil, inv_std=np.ones(6))
    # Positive control: loading it unsafely does run the payload.
    with np.load(path, allow_pickle=True) as archive:
        archive["mean"][0].close()  # the payload returned an open file
    assert (f.tmp / "PWNED").exists()
    (f.tmp / "PWNED").unlink()
    return path


def _npy(f, name, array) -> Path:
    np.save(f.tmp / name, array, allow_pickle=True)
    return f.tmp / name


def _truncated(f) -> Path:
    path = _npy(f, "cut.npy", np.ones((100, 6), np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _unbalanced_header(f) -> Path:
    """A .npy whose header padding holds an unclosed '(' (numpy's tokenizer fails on it)."""
    path = _npy(f, "unbalanced.npy", np.ones((4, 6), np.float32))
    data = bytearray(path.read_bytes())
    end = data.index(b"\n")
    data[end - 1:end] = b"("
    path.write_bytes(bytes(data))
    return path


def _cut(path: Path, name: str) -> Path:
    """A copy of `path` cut to half its size."""
    data = path.read_bytes()
    (path.parent / name).write_bytes(data[: len(data) // 2])
    path.unlink()
    return path.parent / name


def _group_h5(f) -> Path:
    with h5py.File(f.tmp / "grouped.h5", "w") as h5:
        h5.create_group("grp").create_dataset("inner", data=np.ones((5, 2)))
        h5.create_dataset("top", data=np.ones((5, 2)))
    return f.tmp / "grouped.h5"


def _text(f) -> Path:
    (f.tmp / "notes.txt").write_text("1,2,3\n4,5,6\n")
    return f.tmp / "notes.txt"


def _labels(f, values, name="bad_labels.npy") -> Path:
    return _npy(f, name, np.asarray(values))


def _labels_with(value, row):
    def make(f):
        y = np.load(f.labels_npy)
        y[row] = value
        return _labels(f, y)
    return make


def _centers_args(f, labels):
    return ["fit-centers", f.features_npy, "--labels", labels, "--num-classes", 4, "-o", f.tmp / "c.npz"]


def _bn(*inputs, out="stats.npz"):
    return lambda f: ["fit-bn", *[i(f) if callable(i) else i for i in inputs], "-o", f.tmp / out]


def _grouped_stats(f) -> Path:
    x, groups = np.load(f.features_npy), np.load(f.labels_npy)
    normstats.write_stats(normstats.BatchNormExact(num_groups=4).update(x, groups).result(),
                          str(f.tmp / "grouped.npz"))
    return f.tmp / "grouped.npz"


def _state_dict(f, name="model.safetensors", **tensors) -> Path:
    tensors = tensors or {"features.1.running_mean": np.zeros(4, np.float32),
                          "features.1.running_var": np.ones(4, np.float32),
                          "head.bn.running_mean": np.zeros(2, np.float32),
                          "head.bn.running_var": np.ones(2, np.float32)}
    safetensors.numpy.save_file(tensors, f.tmp / name)
    return f.tmp / name


def _bytes(f, name: str, data: bytes) -> Path:
    (f.tmp / name).write_bytes(data)
    return f.tmp / name


def _export(stats, target, out):
    return lambda f: ["export", stats(f), "--to", target, "-o", f.tmp / out]


def _centers_path(f) -> Path:
    return _centers(f.tmp / "centers.npz", f)


def _unseen_centers(f) -> Path:
    """Centers whose every class is unseen: all rows carry the ignored label."""
    with normstats.open_stream([str(f.features_npy)]) as x, normstats.open_stream([str(f.labels_npy)]) as y:
        state = normstats.CentersExact(4, ignore_label=int(np.load(f.labels_npy)[0]))
        stats = normstats.fit_centers(state, x, y)
    stats.arrays["counts"][:] = 0
    stats.arrays["centers"][:] = np.nan
    normstats.write_stats(stats, str(f.tmp / "unseen.npz"))
    return f.tmp / "unseen.npz"


def _assign(centers, *rest, out="out.h5", existing=False):
    """``assign CENTERS INPUT -o OUT``: INPUT is the features unless `rest` starts with a
    builder; `existing` writes an old OUT first."""
    def build(f):
        if existing:
            (f.tmp / out).write_bytes(b"old")
        args = [i(f) if callable(i) else i for i in rest]
        if not (rest and callable(rest[0])):
            args.insert(0, f.features_npy)
        return ["assign", centers(f), *args, "-o", f.tmp / out]
    return build


# Each case: (build args from the files, exit code, builder of the strings the Error: line must contain).
ERROR_CASES = {
    "missing-input": (_bn(lambda f: f.tmp / "missing.npy"), 2, lambda f: ["missing.npy"]),
    "input-is-directory": (_bn(lambda f: f.tmp), 2, lambda f: [str(f.tmp)]),
    "text-file": (_bn(_text), 1, lambda f: ["notes.txt"]),
    "truncated-npy": (_bn(_truncated), 1, lambda f: ["cut.npy", "truncated"]),
    "npy-header-unbalanced": (_bn(_unbalanced_header), 1, lambda f: ["unbalanced.npy"]),
    "h5-dataset-missing": (_bn(lambda f: f"{f.h5}:nope"), 2, lambda f: ["nope", "labels", "x"]),
    "h5-dataset-option-missing": (lambda f: ["fit-bn", f.h5, "--dataset", "nope", "-o", f.tmp / "s.npz"],
                                  2, lambda f: ["nope", "labels", "x"]),
    "h5-group-not-dataset": (_bn(lambda f: f"{_group_h5(f)}:grp"), 2, lambda f: ["grp", "group"]),
    "h5-several-datasets-no-name": (_bn(lambda f: f.h5), 2, lambda f: [str(f.h5), "labels", "x"]),
    "h5-dataset-conflict": (lambda f: ["fit-bn", f"{f.h5}:x", "--dataset", "labels", "-o", f.tmp / "s.npz"],
                            2, lambda f: ["x", "labels", "--dataset"]),
    "zero-rows-npy": (_bn(lambda f: _npy(f, "empty.npy", np.zeros((0, 6), np.float32))), 1,
                      lambda f: ["empty.npy", "zero rows"]),
    "zero-rows-h5": (_bn(lambda f: f"{save_h5(f.tmp / 'empty.h5', e=np.zeros((0, 6)))}:e"), 1,
                     lambda f: ["empty.h5:e"]),
    "string-dtype": (_bn(lambda f: _npy(f, "words.npy", np.array([["a", "b"], ["c", "d"]]))), 1,
                     lambda f: ["words.npy"]),
    "string-dtype-h5": (_bn(lambda f: f"{save_h5(f.tmp / 's.h5', v=np.array(['a', 'bb'], dtype=h5py.string_dtype()))}:v"),
                        1, lambda f: ["s.h5:v"]),
    "scalar-h5": (_bn(lambda f: f"{save_h5(f.tmp / 's.h5', v=3.0)}:v"), 1, lambda f: ["s.h5:v", "scalar"]),
    "bool-dtype": (_bn(lambda f: _npy(f, "flags.npy", np.ones((5, 2), bool))), 1, lambda f: ["flags.npy"]),
    "complex-dtype": (_bn(lambda f: _npy(f, "cplx.npy", np.ones((5, 2), np.complex64))), 1,
                      lambda f: ["cplx.npy", "complex"]),
    "object-npy": (_bn(lambda f: _npy(f, "objects.npy", np.array([[1, "a"], [2, None]], dtype=object))), 1,
                   lambda f: ["objects.npy"]),
    "axes-out-of-range": (lambda f: ["fit-bn", f.features_npy, "--axes", "0,5", "-o", f.tmp / "s.npz"], 2,
                          lambda f: ["axes", "5"]),
    "axes-repeated": (lambda f: ["fit-bn", f.npy4d, "--axes", "0,2,2", "-o", f.tmp / "s.npz"], 2,
                      lambda f: ["axes"]),
    "axes-not-integers": (lambda f: ["fit-bn", f.npy4d, "--axes", "0,x", "-o", f.tmp / "s.npz"], 2,
                          lambda f: ["--axes"]),
    "labels-row-mismatch": (lambda f: _centers_args(f, _labels(f, np.zeros(50, np.int64))), 1,
                            lambda f: ["bad_labels.npy", "features.npy", "50", "53"]),
    "labels-float": (lambda f: _centers_args(f, _labels(f, np.zeros(53, np.float32))), 1,
                     lambda f: ["bad_labels.npy", "float32"]),
    "label-negative": (lambda f: _centers_args(f, _labels_with(-1, 17)(f)), 1, lambda f: ["-1", "row 17"]),
    "label-too-large": (lambda f: _centers_args(f, _labels_with(4, 41)(f)), 1, lambda f: ["row 41", "4"]),
    "num-classes-0": (lambda f: [*_centers_args(f, f.labels_npy)[:-4], "--num-classes", 0, "-o",
                                 f.tmp / "c.npz"], 2, lambda f: ["--num-classes"]),
    "batch-size-0": (lambda f: ["fit-bn", f.npy4d, "--batch-size", 0, "-o", f.tmp / "s.npz"], 2,
                     lambda f: ["--batch-size"]),
    "alpha-0": (lambda f: ["fit-bn", f.npy4d, "--alpha", 0, "-o", f.tmp / "s.npz"], 2, lambda f: ["alpha"]),
    "alpha-1.5": (lambda f: ["fit-bn", f.npy4d, "--alpha", 1.5, "-o", f.tmp / "s.npz"], 2,
                  lambda f: ["alpha"]),
    "centers-alpha-0": (lambda f: [*_centers_args(f, f.labels_npy), "--alpha", 0], 2, lambda f: ["alpha"]),
    "eps-0": (lambda f: ["fit-bn", f.npy4d, "--eps", 0, "-o", f.tmp / "s.npz"], 2, lambda f: ["eps"]),
    "shards-row-shapes-differ": (_bn(lambda f: f.npy4d, lambda f: f.features_npy), 1,
                                 lambda f: ["images.npy", "features.npy"]),
    "apply-centers-file": (lambda f: ["apply", _centers(f.tmp / "centers.npz", f), f"{f.h5}:x", "-o",
                                      f.tmp / "y.npy"], 1, lambda f: ["centers.npz"]),
    "apply-other-row-shape": (lambda f: ["apply", _stats(f.tmp / "st.npz", f.npy4d), f"{f.h5}:x", "-o",
                                         f.tmp / "y.npy"], 1, lambda f: [f"{f.h5}:x", "(6,)", "(3, 4, 5)"]),
    "apply-pickled-npz": (lambda f: ["apply", _pickled_npz(f), f.features_npy, "-o", f.tmp / "y.npy"], 1,
                          lambda f: ["evil.npz"]),
    "apply-truncated-stats-npz": (lambda f: ["apply", _cut(_stats(f.tmp / "st.npz", f.features_npy), "cut.npz"),
                                             f.features_npy, "-o", f.tmp / "y.npy"], 1, lambda f: ["cut.npz"]),
    "apply-truncated-stats-h5": (lambda f: ["apply", _cut(_stats(f.tmp / "st.h5", f.features_npy), "cut.h5"),
                                            f.features_npy, "-o", f.tmp / "y.npy"], 1, lambda f: ["cut.h5"]),
    "init-truncated-npz": (lambda f: ["fit-bn", f.features_npy, "--init",
                                      _cut(_stats(f.tmp / "st.npz", f.features_npy), "cut.npz"), "-o",
                                      f.tmp / "s.npz"], 1, lambda f: ["cut.npz"]),
    "apply-stats-not-stats": (lambda f: ["apply", f.features_npy, f.features_npy, "-o", f.tmp / "y.npy"], 1,
                              lambda f: ["features.npy"]),
    "apply-gamma-wrong-shape": (lambda f: ["apply", _stats(f.tmp / "st.npz", f.npy4d), f.npy4d, "--gamma",
                                           _npy(f, "g.npy", np.ones(4)), "-o", f.tmp / "y.npy"], 1,
                                lambda f: ["gamma", "(4,)"]),
    "apply-gamma-missing-file": (lambda f: ["apply", _stats(f.tmp / "st.npz", f.npy4d), f.npy4d, "--gamma",
                                            f.tmp / "nogamma.npy", "-o", f.tmp / "y.npy"], 2,
                                 lambda f: ["--gamma", "nogamma.npy"]),
    "output-is-input": (lambda f: ["fit-bn", f"{f.h5}:x", "-o", f.h5, "--force"], 2, lambda f: [str(f.h5)]),
    "apply-output-is-input": (lambda f: ["apply", _stats(f.tmp / "st.npz", f.npy4d), f.npy4d, "-o", f.npy4d,
                                         "--force"], 2, lambda f: [str(f.npy4d)]),
    "centers-output-is-labels-file": (lambda f: ["fit-centers", f.features_npy, "--labels", f"{f.h5}:labels",
                                                 "--num-classes", 4, "-o", f.h5, "--force"], 2,
                                      lambda f: [str(f.h5)]),
    "init-is-output": (lambda f: ["fit-bn", f.npy4d, "--init", _stats(f.tmp / "st.npz", f.npy4d), "-o",
                                  f.tmp / "st.npz", "--force"], 2, lambda f: ["st.npz"]),
    "output-folder-missing": (lambda f: ["fit-bn", f.npy4d, "-o", f.tmp / "nowhere" / "s.npz"], 2,
                              lambda f: ["nowhere"]),
    "output-exists": (lambda f: ["fit-bn", f.npy4d, "-o", _stats(f.tmp / "st.npz", f.npy4d)], 2,
                      lambda f: ["st.npz", "--force"]),
    "output-unknown-extension": (lambda f: ["fit-bn", f.npy4d, "-o", f.tmp / "s.txt"], 2,
                                 lambda f: ["s.txt", ".npz"]),
    "mean-and-inv-std-none": (lambda f: ["fit-bn", f.npy4d, "--mean", "none", "--inv-std", "none", "-o",
                                         f.tmp / "s.npz"], 2, lambda f: ["mean", "inv"]),
    "exact-with-mean-value": (lambda f: ["fit-bn", f.npy4d, "--mode", "exact", "--mean", 0.5, "-o",
                                         f.tmp / "s.npz"], 2, lambda f: ["--mean"]),
    "exact-init-from-ema": (lambda f: ["fit-bn", f.npy4d, "--mode", "exact", "--init",
                                       _stats(f.tmp / "st.npz", f.npy4d), "-o", f.tmp / "s.npz"], 1,
                            lambda f: ["ema"]),
    "init-centers-file": (lambda f: ["fit-bn", f"{f.h5}:x", "--init", _centers(f.tmp / "centers.npz", f),
                                     "-o", f.tmp / "s.npz"], 1, lambda f: ["centers.npz"]),
    "centers-exact-with-init": (lambda f: [*_centers_args(f, f.labels_npy), "--mode", "exact", "--init",
                                           "zeros"], 2, lambda f: ["--init"]),
    "compound-dtype": (_bn(lambda f: _npy(f, "records.npy", np.zeros(4, dtype=[("a", "f4"), ("b", "i4")]))),
                       1, lambda f: ["records.npy", "dtype"]),
    "compound-dtype-h5": (_bn(lambda f: f"{save_h5(f.tmp / 'rec.h5', r=np.zeros(4, dtype=[('a', 'f4'), ('b', 'i4')]))}:r"),
                          1, lambda f: ["rec.h5:r", "dtype"]),
    "alpha-above-1": (lambda f: ["fit-bn", f.npy4d, "--alpha", 1.5, "-o", f.tmp / "s.npz"], 2,
                      lambda f: ["alpha", "1.5"]),
    "eps-negative": (lambda f: ["fit-bn", f.npy4d, "--eps", -1e-5, "-o", f.tmp / "s.npz"], 2,
                     lambda f: ["eps"]),
    "batch-size-negative": (lambda f: ["fit-bn", f.npy4d, "--batch-size", -3, "-o", f.tmp / "s.npz"], 2,
                            lambda f: ["batch-size"]),
    "rank-does-not-fit-axes": (_bn(lambda f: f.features_npy, "--axes", "0,2,3"), 2, lambda f: ["axis"]),
    "merge-ema-file": (lambda f: ["merge", _stats(f.tmp / "st.npz", f.npy4d), _stats(f.tmp / "st2.npz", f.npy4d),
                                  "-o", f.tmp / "m.npz"], 2, lambda f: ["st.npz", "cannot be merged"]),
    "merge-other-shape": (lambda f: ["merge", _exact_stats(f.tmp / "a.npz", f.npy4d),
                                     _exact_stats(f.tmp / "b.npz", f.features_npy),
                                     "-o", f.tmp / "m.npz"], 1, lambda f: ["b.npz", "a.npz"]),
    "merge-output-is-input": (lambda f: ["merge", _exact_stats(f.tmp / "a.npz", f.npy4d),
                                         "-o", f.tmp / "a.npz", "--force"], 2, lambda f: ["a.npz", "input"]),
    "weights-negative": (lambda f: ["fit-bn", f.features_npy, "--mode", "exact", "--weights",
                                    _npy(f, "w.npy", np.r_[np.ones(10), -1.0, np.ones(42)]),
                                    "-o", f.tmp / "s.npz"], 1, lambda f: ["w.npy row 10", "weight"]),
    "nan-in-input": (_bn(lambda f: _npy(f, "nan.npy", np.r_[np.ones((3, 6)), np.full((1, 6), np.nan)])),
                     1, lambda f: ["nan.npy row 3", "--nan-policy"]),
    "export-centers-to-torch": (_export(lambda f: _centers(f.tmp / "centers.npz", f), "torch", "bn.safetensors"),
                                1, lambda f: ["centers.npz", "centers statistics"]),
    "export-custom-axes-to-torch": (_export(lambda f: _stats(f.tmp / "st.npz", f.npy4d, axes=(0, 1)), "torch",
                                            "bn.safetensors"), 1, lambda f: ["st.npz", "axis 1", "--axes auto"]),
    "export-groups-to-torch": (_export(_grouped_stats, "torch", "bn.safetensors"), 1,
                               lambda f: ["grouped.npz", "per-group"]),
    "export-inv-std-too-large": (_export(lambda f: _stats(f.tmp / "st.npz", f.npy4d, inv_std=1e4), "torch",
                                         "bn.safetensors"), 1, lambda f: ["st.npz", "above 1/sqrt(eps)", "--eps"]),
    "export-ema-to-kaldi": (_export(lambda f: _stats(f.tmp / "st.npz", f.features_npy), "kaldi", "cmvn.mat"), 1,
                            lambda f: ["st.npz", "ema", "--mode exact"]),
    "export-ema-to-espnet": (_export(lambda f: _stats(f.tmp / "st.npz", f.features_npy), "espnet", "f.npz"), 1,
                             lambda f: ["st.npz", "ema", "--mode exact"]),
    "export-images-to-kaldi": (_export(lambda f: _exact_stats(f.tmp / "a.npz", f.npy4d), "kaldi", "cmvn.mat"), 1,
                               lambda f: ["a.npz", "axes (0, 2, 3)", "--axes 0"]),
    "export-groups-to-keras": (_export(_grouped_stats, "keras", "k.npz"), 1, lambda f: ["grouped.npz", "per-group"]),
    # a global matrix to .ark is written since issue 13 (key 'global'); ESPnet1 .npy is global only
    "export-espnet-groups-to-npy": (_export(_grouped_stats, "espnet", "cmvn.npy"), 2,
                                    lambda f: ["grouped.npz", "per-group", ".ark", ".npy"]),
    "export-kaldi-groups-to-mat": (_export(_grouped_stats, "kaldi", "cmvn.mat"), 2, lambda f: ["cmvn.ark"]),
    "export-wrong-extension": (_export(lambda f: _exact_stats(f.tmp / "a.npz", f.npy4d), "torch", "bn.npz"), 2,
                               lambda f: ["bn.npz", ".safetensors"]),
    "export-dataset-suffix": (lambda f: ["export", _exact_stats(f.tmp / "a.npz", f.npy4d), "--to", "torch", "-o",
                                         f"{f.tmp / 'bn.safetensors'}:x"], 2, lambda f: ["bn.safetensors:x"]),
    "export-unknown-target": (_export(lambda f: _exact_stats(f.tmp / "a.npz", f.npy4d), "onnx", "m.onnx"), 2,
                              lambda f: ["--to", "onnx"]),
    "export-prefix-for-keras": (lambda f: [*_export(lambda g: _exact_stats(g.tmp / "a.npz", g.npy4d), "keras",
                                                    "k.npz")(f), "--prefix", "bn"], 2,
                                lambda f: ["--prefix", "--to torch"]),
    "export-stats-missing": (_export(lambda f: f.tmp / "missing.npz", "torch", "bn.safetensors"), 2,
                             lambda f: ["missing.npz"]),
    "export-damaged-stats": (_export(lambda f: _cut(_exact_stats(f.tmp / "a.json", f.npy4d), "cut.json"), "keras",
                                     "k.npz"), 1, lambda f: ["cut.json"]),
    "export-output-exists": (lambda f: ["export", _exact_stats(f.tmp / "a.npz", f.npy4d), "--to", "keras",
                                              "-o", _exact_stats(f.tmp / "b.npz", f.npy4d)], 2,
                                   lambda f: ["b.npz", "--force"]),
    "import-several-layers": (lambda f: ["import", _state_dict(f), "-o", f.tmp / "bn.npz"], 2,
                              lambda f: ["model.safetensors", "'features.1', 'head.bn'", "--prefix"]),
    "import-prefix-not-found": (lambda f: ["import", _state_dict(f), "--prefix", "nope", "-o", f.tmp / "bn.npz"], 2,
                                lambda f: ["nope", "'features.1', 'head.bn'"]),
    "import-no-batchnorm": (lambda f: ["import", _state_dict(f, w=np.ones((2, 2))), "-o", f.tmp / "bn.npz"], 1,
                            lambda f: ["model.safetensors", "no BatchNorm"]),
    "import-normstats-stats": (lambda f: ["import", _exact_stats(f.tmp / "a.safetensors", f.npy4d), "-o",
                                          f.tmp / "bn.npz"], 1, lambda f: ["a.safetensors", "already"]),
    "import-pickle": (lambda f: ["import", _bytes(f, "model.pt", b"\x80\x02}q\x00."), "-o", f.tmp / "bn.npz"], 2,
                      lambda f: ["model.pt", "pickles", "safetensors.torch.save_file"]),
    "import-damaged": (lambda f: ["import", _cut(_state_dict(f), "cut.safetensors"), "-o", f.tmp / "bn.npz"], 1,
                       lambda f: ["cut.safetensors"]),
    "import-missing": (lambda f: ["import", f.tmp / "none.safetensors", "-o", f.tmp / "bn.npz"], 2,
                       lambda f: ["none.safetensors"]),
    "import-negative-running-var": (lambda f: ["import", _state_dict(f, running_mean=np.zeros(2),
                                                                     running_var=np.array([1.0, -2.0])),
                                               "-o", f.tmp / "bn.npz"], 1, lambda f: ["running_var", "channel 1"]),
    "import-row-shape-mismatch": (lambda f: ["import", _state_dict(f), "--prefix", "features.1", "--row-shape",
                                             "3,8", "-o", f.tmp / "bn.npz"], 2,
                                  lambda f: ["--row-shape 3,8", "4 channels"]),
    "import-row-shape-not-a-shape": (lambda f: ["import", _state_dict(f), "--prefix", "head.bn", "--row-shape",
                                                "2,x", "-o", f.tmp / "bn.npz"], 2, lambda f: ["--row-shape", "2,x"]),
    "import-output-is-input": (lambda f: ["import", _state_dict(f), "--prefix", "head.bn", "-o",
                                          f.tmp / "model.safetensors", "--force"], 2, lambda f: ["model.safetensors"]),
    "apply-state-dict-as-stats": (lambda f: ["apply", _state_dict(f), f.features_npy, "-o", f.tmp / "y.npy"], 1,
                                  lambda f: ["model.safetensors", "normstats import"]),


    "assign-centers-is-bn-stats": (_assign(lambda f: _exact_stats(f.tmp / "st.npz", f.features_npy)), 1,
                                   lambda f: ["st.npz", "batchnorm", "fit-centers"]),
    "assign-centers-is-an-array": (_assign(lambda f: f.features_npy), 1, lambda f: ["features.npy"]),
    "assign-feature-dim-mismatch": (_assign(_centers_path, lambda f: f.npy4d), 1,
                                    lambda f: ["images.npy", "(3, 4, 5)", "(6,)"]),
    "assign-top-k-0": (_assign(_centers_path, "--top-k", 0), 2, lambda f: ["--top-k"]),
    "assign-top-k-above-classes": (_assign(_centers_path, "--top-k", 5), 2,
                                   lambda f: ["top-k", "4 usable classes", "centers.npz", "5"]),
    "assign-top-k-counts-only-seen-classes": (
        _assign(lambda f: _centers(f.tmp / "centers.npz", f, num_classes=6), "--top-k", 5), 2,
        lambda f: ["4 usable classes"]),
    "assign-no-usable-class": (_assign(_unseen_centers), 1, lambda f: ["unseen.npz", "no usable class"]),
    "assign-unknown-metric": (_assign(_centers_path, "--metric", "manhattan"), 2, lambda f: ["--metric"]),
    "assign-max-distance-negative": (_assign(_centers_path, "--max-distance", -1), 2,
                                     lambda f: ["max distance", "-1"]),
    "assign-missing-centers": (_assign(lambda f: f.tmp / "nocenters.npz"), 2, lambda f: ["nocenters.npz"]),
    "assign-missing-input": (_assign(_centers_path, lambda f: f.tmp / "missing.npy"), 2,
                             lambda f: ["missing.npy"]),
    "assign-output-exists": (_assign(_centers_path, out="there.h5", existing=True), 2,
                             lambda f: ["there.h5", "--force"]),
    "assign-output-npz": (_assign(_centers_path, out="labels.npz"), 2, lambda f: ["labels.npz", ".h5"]),
    "assign-output-with-dataset": (_assign(_centers_path, out="a.h5:labels"), 2, lambda f: ["a.h5:labels"]),
    "assign-output-is-input": (lambda f: ["assign", _centers_path(f), f"{f.h5}:x", "-o", f.h5, "--force"], 2,
                               lambda f: [str(f.h5), "input"]),
    "assign-nan-row": (_assign(_centers_path, lambda f: _npy(f, "nan.npy", np.r_[np.ones((3, 6)),
                                                                                  [[1, 2, np.inf, 4, 5, 6]]])),
                       1, lambda f: ["nan.npy row 3", "column 2", "inf"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors(run, files, case):
    build, code, culprits = ERROR_CASES[case]
    args = build(files)
    before = snapshot(files.tmp)
    result = run(*args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = error_lines(result)
    assert lines, result.output
    message = "\n".join(lines)
    for culprit in culprits(files):
        assert str(culprit) in message, message
    assert result.exit_code == code, message
    assert result.stdout == ""
    # nothing created (no output, no temporary), every input untouched
    assert snapshot(files.tmp) == before
    assert not (files.tmp / "PWNED").exists()


def test_unreadable_stats_file_is_never_advised_to_be_unpickled(run, files):
    (files.tmp / "notes.npz").write_text("not an archive\n")
    result = run("apply", files.tmp / "notes.npz", files.features_npy, "-o", files.tmp / "y.npy")
    assert result.exit_code == 1
    message = "\n".join(error_lines(result))
    assert "notes.npz" in message
    assert "allow_pickle" not in message and "pickle.load" not in message, message


def test_output_exists_then_force_succeeds(run, files):
    out = files.tmp / "stats.npz"
    out.write_bytes(b"old")
    result = run("fit-bn", files.npy4d, "-o", out)
    assert result.exit_code == 2 and out.read_bytes() == b"old"
    ok(run("fit-bn", files.npy4d, "-o", out, "--force"), out)
    assert load_stats(out)[1]["rows_seen"] == 37


def test_label_error_names_the_shard_and_row_across_blocks(run, files, labels, monkeypatch):
    monkeypatch.setattr(normstats.pipeline, "block_rows_for", lambda row_bytes, batch_size, **_: batch_size)
    bad = labels.copy()
    bad[45] = 9
    np.save(files.tmp / "y0.npy", bad[:30])
    np.save(files.tmp / "y1.npy", bad[30:])
    features = np.load(files.features_npy)
    np.save(files.tmp / "x0.npy", features[:30])
    np.save(files.tmp / "x1.npy", features[30:])
    result = run("fit-centers", files.tmp / "x0.npy", files.tmp / "x1.npy", "--labels", files.tmp / "y0.npy",
                 "--labels", files.tmp / "y1.npy", "--num-classes", 4, "--batch-size", 4, "-o",
                 files.tmp / "c.npz")
    assert result.exit_code == 1
    assert "y1.npy row 15: label 9" in "\n".join(error_lines(result))  # row 45 of the stream
    assert not (files.tmp / "c.npz").exists()


# --- interruption ----------------------------------------------------------------------------


def _interrupt_on_call(number: int) -> Callable:
    calls = {"n": 0}

    def callback(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= number:
            raise KeyboardInterrupt
    return callback


@contextlib.contextmanager
def _interrupting_progress(total_rows, *, quiet, label, initial=0):
    yield _interrupt_on_call(2)


@pytest.mark.parametrize("where", ["fit-bn-midway", "fit-bn-sigterm", "fit-centers-midway", "write-npz",
                                   "write-h5", "apply-midway", "assign-midway"])
def test_interrupt_leaves_no_file(run, files, monkeypatch, where):
    monkeypatch.setattr(normstats.pipeline, "block_rows_for", lambda row_bytes, batch_size, **_: batch_size or 5)
    stats = _stats(files.tmp / "st.npz", files.npy4d)
    if where == "write-npz":
        real = np.savez

        def savez(file, *args, **kwargs):
            real(file, *args, **kwargs)  # a complete archive in the temporary, then Ctrl-C
            raise KeyboardInterrupt
        monkeypatch.setattr(normstats.writers.stats_h5.np, "savez", savez)
    elif where == "write-h5":
        real_h5 = normstats.writers.stats_h5._write_stats_h5

        def write_h5(arrays, meta, path):
            real_h5(arrays, meta, path)
            raise KeyboardInterrupt
        monkeypatch.setattr(normstats.writers.stats_h5, "_write_stats_h5", write_h5)
    elif where == "apply-midway":
        real_write = normstats.writers.rows.ArrayWriter.write
        counter = _interrupt_on_call(3)

        def write(self, block):
            real_write(self, block)  # two blocks really reach the temporary file
            counter()
        monkeypatch.setattr(normstats.writers.rows.ArrayWriter, "write", write)
    elif where == "assign-midway":
        _centers(files.tmp / "centers.npz", files)
        real_rows = normstats.writers.rows.DatasetsWriter.write
        rows_counter = _interrupt_on_call(3)

        def write_rows(self, **blocks):
            real_rows(self, **blocks)  # two blocks of labels and distances reach the temporary
            rows_counter()
        monkeypatch.setattr(normstats.writers.rows.DatasetsWriter, "write", write_rows)
    elif where == "fit-bn-sigterm":
        @contextlib.contextmanager
        def terminating_progress(total_rows, *, quiet, label, initial=0):
            yield lambda rows: os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(normstats.cli.commands, "progress_bar", terminating_progress)
    else:
        monkeypatch.setattr(normstats.cli.commands, "progress_bar", _interrupting_progress)
    out = {"write-h5": "out.h5", "apply-midway": "out.npy", "assign-midway": "out.h5"}.get(where, "out.npz")
    args = {
        "fit-centers-midway": ["fit-centers", f"{files.h5}:x", "--labels", f"{files.h5}:labels",
                               "--num-classes", 4, "--batch-size", 5],
        "apply-midway": ["apply", stats, files.npy4d],
        "assign-midway": ["assign", files.tmp / "centers.npz", files.features_npy],
    }.get(where, ["fit-bn", files.npy4d, "--batch-size", 5])
    before, handler = snapshot(files.tmp), signal.getsignal(signal.SIGTERM)
    result = run(*args, "-o", files.tmp / out)
    assert result.exit_code == 130, (result.output, result.exception)
    assert any(line.startswith("Error: interrupted") for line in error_lines(result)), result.stderr
    assert "Traceback" not in result.output
    assert snapshot(files.tmp) == before  # no output, no temporary, inputs untouched
    assert signal.getsignal(signal.SIGTERM) == handler  # the SIGTERM handler is restored


def test_interrupt_keeps_the_previous_output(run, files, monkeypatch):
    out = _stats(files.tmp / "st.npz", files.npy4d)
    previous = out.read_bytes()
    monkeypatch.setattr(normstats.pipeline, "block_rows_for", lambda row_bytes, batch_size, **_: batch_size)
    monkeypatch.setattr(normstats.cli.commands, "progress_bar", _interrupting_progress)
    result = run("fit-bn", files.npy4d, "--batch-size", 4, "-o", out, "--force")
    assert result.exit_code == 130
    assert out.read_bytes() == previous
    assert sorted(p.name for p in files.tmp.iterdir()) == sorted(
        ["st.npz", "images.npy", "data.h5", "single.h5", "features.npy", "labels.npy"])


# --- the installed script ------------------------------------------------------------------


def _script() -> str:
    sibling = Path(sys.executable).with_name("normstats")
    script = str(sibling) if sibling.exists() else shutil.which("normstats")
    assert script, "the normstats console script is not installed"
    return script


def test_installed_script_end_to_end(tmp_path, features):
    np.save(tmp_path / "x.npy", features)
    done = subprocess.run([_script(), "fit-bn", "x.npy", "-o", "stats.npz", "--batch-size", "16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fit-bn ema: 53 rows") and lines[0].endswith("-> stats.npz")
    arrays, meta = load_stats(tmp_path / "stats.npz")
    mean, inv_std, _, _ = ref_bn_ema(features, batch_size=16)
    np.testing.assert_allclose(arrays["mean"], mean, rtol=RTOL)
    np.testing.assert_allclose(arrays["inv_std"], inv_std, rtol=RTOL)
    assert meta["sources"] == ["x.npy"]

    failed = subprocess.run([_script(), "fit-bn", "missing.npy", "-o", "s.npz"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2
    assert failed.stderr.startswith("Error:") and "missing.npy" in failed.stderr
    assert "Traceback" not in failed.stderr and failed.stdout == ""


def test_only_normstats_is_importable(tmp_path):
    for name in ("core", "cli"):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "ModuleNotFoundError" in done.stderr and f"'{name}'" in done.stderr
    done = subprocess.run([sys.executable, "-c", "import normstats, normstats.cli; print(normstats.cli.cli.name)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- inspect ---------------------------------------------------------------------------------


def test_inspect_reports_empty_classes_and_the_closest_pair(run, tmp_path):
    x = np.repeat(np.array([[0.0, 0.0], [10.0, 0.0], [10.5, 0.0], [0.0, 7.0]]), 5, axis=0)
    labels = np.repeat([0, 1, 2, 4], 5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", labels)
    out = tmp_path / "c.npz"
    ok(run("fit-centers", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--num-classes", 6,
           "--mode", "exact", "-o", out), out)
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["empty_classes"] == {"count": 2, "first": [3, 5]}
    assert summary["closest_pairs"][0] == {"classes": [1, 2], "distance": pytest.approx(0.5)}
    assert summary["counts"]["total"] == 20
    text = run("inspect", out)
    assert text.exit_code == 0 and "empty_classes      2: 3, 5" in text.stdout


def test_inspect_reports_near_constant_channels(run, tmp_path):
    x = np.random.default_rng(3).standard_normal((50, 4))
    x[:, 2] = 1.5
    np.save(tmp_path / "x.npy", x)
    for mode in ("ema", "exact"):
        out = tmp_path / f"{mode}.npz"
        alpha = ["--alpha", 1] if mode == "ema" else []  # ema: the last batch alone, converged
        ok(run("fit-bn", tmp_path / "x.npy", "--mode", mode, "--batch-size", 10, *alpha, "-o", out), out)
        summary = json.loads(run("inspect", out, "--json").stdout)
        assert summary["near_constant"] == {"count": 1, "first": [2]}, mode
        assert summary["options"]["mode"] == mode and summary["nan_counts"]["mean"] == 0


def test_inspect_reads_a_hand_edited_file_without_the_near_constant_count(run, tmp_path):
    x = np.random.default_rng(3).standard_normal((50, 4))
    x[:, 1] = 2.0
    stats = normstats.BatchNormExact().update(x).result()
    del stats.meta["near_constant_count"]
    normstats.write_stats(stats, str(tmp_path / "edited.npz"))
    summary = json.loads(run("inspect", tmp_path / "edited.npz", "--json").stdout)
    assert summary["near_constant"] == {"count": 1, "first": [1]}
