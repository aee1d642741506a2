"""Hostile values: no silent wrong number, no traceback.

- ``apply`` never turns finite input into NaN or infinity without an error that
  names the row, the cause and the remedy (``--dtype``); NaN input stays NaN.
- Stats files whose values are unusable (non-finite means or centers where data
  was seen, non-finite / negative / zero inv_std, negative counts) are refused
  by every command that uses their values; damaged metadata names its key.
- Option values that mean nothing (nan, inf, negative, out of range) are usage
  errors at parse time; an option taking one value, given twice, too.

Numbers are checked against :func:`tests.reference.ref_apply` (plain float64 NumPy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
import safetensors.numpy

import normstats as ns
from normstats.cli import cli
from normstats.errors import RowError, StatsFileError
from normstats.stats import Stats
from tests.reference import ref_apply

SCRIPT = str(Path(sys.executable).with_name("normstats"))
ROWS = 40


# --- helpers --------------------------------------------------------------------------------


def error_line(result) -> str:
    """The one ``Error:`` line of a failed run (and no traceback, no output)."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert result.stdout == ""
    return lines[0]


def refused(result, code: int, *culprits: str) -> str:
    line = error_line(result)
    assert result.exit_code == code, (result.exit_code, line)
    for culprit in culprits:
        assert culprit in line, line
    return line


def succeeded(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def features(rows: int = ROWS, columns: int = 4, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(11)
    return (rng.normal(size=(rows, columns)) * 0.5 + np.arange(columns)).astype(dtype)


def exact_stats(x: np.ndarray, **options) -> Stats:
    return ns.BatchNormExact(**options).update(x).result()


def write(stats: Stats, path: Path, **arrays) -> Path:
    """`stats` with `arrays` replacing some of its arrays, written to `path`."""
    ns.write_stats(Stats(stats.kind, {**stats.arrays, **arrays}, dict(stats.meta)), str(path))
    return path


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("y", "out")))


@pytest.fixture
def x(tmp_path) -> np.ndarray:
    data = features()
    np.save(tmp_path / "x.npy", data)
    return data


@pytest.fixture
def stats_path(tmp_path, x) -> Path:
    return write(exact_stats(x), tmp_path / "stats.npz")


# --- apply: finite input never becomes NaN / Inf silently --------------------------------------


def test_float16_overflow_is_an_error_that_names_row_and_remedy(run, tmp_path):
    x = features().astype(np.float16)
    x[17, 2] = 65504.0  # the largest float16: (x - mean) * inv_std is larger
    np.save(tmp_path / "h.npy", x)
    stats = write(exact_stats(features()), tmp_path / "s.npz")
    result = run("apply", stats, "h.npy", "-o", "y.npy")
    refused(result, 1, "h.npy row 17", "column 2", "float16", "--dtype float32")
    assert outputs(tmp_path) == []

    succeeded(run("apply", stats, "h.npy", "-o", "y.npy", "--dtype", "float32"))
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and np.isfinite(y).all()
    s = ns.read_stats(str(stats))
    np.testing.assert_allclose(y, ref_apply(x, s.arrays["mean"], s.arrays["inv_std"]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", [".npy", ".h5"])
def test_float16_overflow_leaves_no_output_in_either_format(run, tmp_path, fmt):
    np.save(tmp_path / "h.npy", np.full((ROWS, 4), -65504.0, np.float16))
    stats = write(exact_stats(features()), tmp_path / "s.npz")
    refused(run("apply", stats, "h.npy", "-o", f"y{fmt}"), 1, "h.npy row 0", "--dtype float32")
    assert outputs(tmp_path) == []


def test_dtype_float16_of_float32_input_overflows_with_an_error(run, tmp_path, x, stats_path):
    big = x.copy()
    big[25] = 1e6
    np.save(tmp_path / "big.npy", big)
    refused(run("apply", stats_path, "big.npy", "-o", "y.npy", "--dtype", "float16"), 1,
            "big.npy row 25", "float16", "--dtype float32")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dtype_option_sets_the_output_dtype(run, tmp_path, x, stats_path, dtype):
    succeeded(run("apply", stats_path, "x.npy", "-o", "y.npy", "--dtype", dtype))
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.dtype(dtype)
    s = ns.read_stats(str(stats_path))
    rtol = {"float16": 2e-3, "float32": 1e-6, "float64": 1e-6}[dtype]  # float32 input
    np.testing.assert_allclose(y, ref_apply(x, s.arrays["mean"], s.arrays["inv_std"]), rtol=rtol, atol=rtol)


def test_float32_arithmetic_overflow_is_an_error_float64_is_right(run, tmp_path):
    """A stats file from an eps far below float32's range (made before eps was bounded):
    the constant channel's inv_std 1e150 is infinite in float32, so its output was NaN."""
    x = features()
    x[:, 1] = 3.0
    np.save(tmp_path / "c.npy", x)
    stats = exact_stats(x)
    inv_std = stats.arrays["inv_std"].copy()
    inv_std[1] = 1e150  # 1/sqrt(0 + 1e-300)
    path = write(stats, tmp_path / "tiny_eps.npz", inv_std=inv_std)
    refused(run("apply", path, "c.npy", "-o", "y.npy"), 1, "c.npy row 0", "column 1", "--dtype float64")
    assert outputs(tmp_path) == []
    succeeded(run("apply", path, "c.npy", "-o", "y.npy", "--dtype", "float64"))
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(y, ref_apply(x, stats.arrays["mean"], inv_std), rtol=1e-12, atol=1e-12)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_nan_input_stays_nan_and_is_no_error(run, tmp_path, stats_path, dtype):
    """The contract, kept: NaN and Inf input values pass through the formula, whatever
    the output dtype."""
    x = features()
    x[3, 1], x[30, 0], x[31, 3] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "nan.npy", x)
    succeeded(run("apply", stats_path, "nan.npy", "-o", "y.npy", "--dtype", dtype))
    y = np.load(tmp_path / "y.npy")
    s = ns.read_stats(str(stats_path))
    expected = ref_apply(x, s.arrays["mean"], s.arrays["inv_std"])
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(expected))
    rtol = 2e-3 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=rtol, equal_nan=True)


def test_the_error_names_the_row_of_a_later_block_and_shard(tmp_path):
    a, b = features(10), features(30)
    b[13, 0] = 3e38  # finite float32; times inv_std ~2 it overflows float32
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    normalizer = ns.Normalizer(exact_stats(features()))
    with ns.open_stream([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) as stream:
        with pytest.raises(RowError, match=r"b\.npy row 13: column 0 .*--dtype float64"):
            ns.apply_stats(normalizer, stream, str(tmp_path / "y.npy"), block_rows=4)
    assert not (tmp_path / "y.npy").exists()


def test_an_undefined_statistic_meeting_finite_input_is_an_error(tmp_path):
    """A column the fit never saw (count 0, NaN: the documented marker) cannot normalize
    finite values; NaN values in it stay NaN."""
    stats = exact_stats(features())
    for name in ("mean", "var", "inv_std"):
        stats.arrays[name][2] = np.nan
    stats.arrays["count"][2] = 0
    normalizer = ns.Normalizer(stats)
    with pytest.raises(RowError, match=r"row 0: column 2 meets a statistic that the fit left undefined"):
        normalizer(features(5))
    x = features(5)
    x[:, 2] = np.nan
    assert np.isnan(normalizer(x)[:, 2]).all() and np.isfinite(normalizer(x)[:, [0, 1, 3]]).all()


def test_per_group_overflow_names_the_row(tmp_path):
    x = features()
    groups = np.arange(ROWS) % 3
    stats = ns.BatchNormExact(num_groups=3).update(x, groups).result()
    h = x.astype(np.float16)
    h[22, 1] = 65504.0
    with pytest.raises(RowError, match=r"row 22: column 1 normalizes to .* --dtype float32"):
        ns.Normalizer(stats)(h, groups=groups)
    y = ns.Normalizer(stats, dtype="float32")(h, groups=groups)
    assert y.dtype == np.float32 and np.isfinite(y).all()


def test_dask_apply_checks_its_blocks_too(tmp_path):
    distributed = pytest.importorskip("distributed")
    h = features().astype(np.float16)
    h[33, 0] = -65504.0
    np.save(tmp_path / "h.npy", h)
    normalizer = ns.Normalizer(exact_stats(features()))
    with distributed.Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as client, \
            ns.open_stream([str(tmp_path / "h.npy")]) as stream:
        with pytest.raises(RowError, match=r"h\.npy row 33: column 0 .*--dtype float32"):
            ns.apply_dask(normalizer, stream, str(tmp_path / "y.npy"), client)
    assert not (tmp_path / "y.npy").exists()


# --- stats files: values refused where they are used ----------------------------------------------


def _checkpoint(stats: Stats, path: Path, **arrays) -> Path:
    stats = Stats(stats.kind, {**stats.arrays, **arrays}, dict(stats.meta))
    stats.meta["checkpoint"] = {"sources": ["x.npy"], "rows_total": ROWS, "rows_done": 8}
    ns.write_stats(stats, str(path))
    return path


def _centers(x):
    labels = np.arange(len(x)) % 3
    np.save("labels.npy", labels)
    return ns.CentersExact(3).update(x, labels).result()


BN_BAD = [("mean", np.nan), ("mean", np.inf), ("inv_std", np.nan), ("inv_std", np.inf), ("inv_std", -1.0),
          ("inv_std", 0.0), ("var", np.nan), ("var", -1.0), ("count", -1.0), ("count", np.inf)]


def _bn_uses(path: Path) -> dict[str, list]:
    return {
        "apply": ["apply", path, "x.npy", "-o", "y.npy"],
        "export-torch": ["export", path, "--to", "torch", "-o", "out.safetensors"],
        "export-keras": ["export", path, "--to", "keras", "-o", "out.npz"],
        "export-espnet": ["export", path, "--to", "espnet", "-o", "out.npz"],
        "merge": ["merge", path, "good.npz", "-o", "out.npz"],
        "fit-bn-init": ["fit-bn", "x.npy", "--init", path, "-o", "out.npz"],
    }


@pytest.mark.parametrize("use", list(_bn_uses(Path())))
@pytest.mark.parametrize("key, value", BN_BAD, ids=[f"{k}={v}" for k, v in BN_BAD])
@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_bad_batchnorm_values_are_refused_by_every_use(run, tmp_path, x, use, key, value, suffix):
    stats = exact_stats(x)
    write(stats, tmp_path / "good.npz")
    bad = stats.arrays[key].copy()
    bad[1] = value
    path = write(stats, tmp_path / f"bad{suffix}", **{key: bad})
    refused(run(*_bn_uses(path)[use]), 1, f"bad{suffix}", key, "index 1")
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("key, value", [("mean", np.nan), ("inv_std", -0.5), ("inv_std", np.inf)])
def test_bad_values_in_an_ema_file_are_refused(run, tmp_path, x, key, value):
    stats = ns.BatchNormEMA(batch_size=8).update(x).result()
    bad = stats.arrays[key].copy()
    bad[0] = value
    path = write(stats, tmp_path / "ema.h5", **{key: bad})
    refused(run("apply", path, "x.npy", "-o", "y.npy"), 1, "ema.h5", key)
    refused(run("fit-bn", "x.npy", "--init", path, "-o", "out.npz"), 1, "ema.h5", key)


@pytest.mark.parametrize("command", ["fit-bn", "fit-centers"])
def test_bad_values_in_a_checkpoint_are_refused_on_resume(run, tmp_path, x, command):
    if command == "fit-bn":
        stats, key = exact_stats(x), "mean"
        extra = ["--mode", "exact"]
    else:
        stats, key = _centers(x), "centers"
        extra = ["--mode", "exact", "--labels", "labels.npy", "--num-classes", 3]
    bad = stats.arrays[key].copy()
    bad[0] = np.nan
    path = _checkpoint(stats, tmp_path / "ck.npz", **{key: bad})
    refused(run(command, "x.npy", "--resume", path, "-o", "out.npz", *extra), 1, "ck.npz", key)


@pytest.mark.parametrize("use", ["merge", "init"])
@pytest.mark.parametrize("key, value", [("centers", np.nan), ("centers", -np.inf), ("var", -2.0),
                                        ("counts", -1), ("var", np.nan)])
def test_bad_centers_values_are_refused(run, tmp_path, x, use, key, value):
    stats = _centers(x)
    write(stats, tmp_path / "good.npz")
    bad = stats.arrays[key].copy()
    bad[1] = value
    path = write(stats, tmp_path / "bad.npz", **{key: bad})
    args = (["merge", path, "good.npz", "-o", "out.npz"] if use == "merge" else
            ["fit-centers", "x.npy", "--labels", "labels.npy", "--num-classes", 3, "--init", path, "-o", "out.npz"])
    refused(run(*args), {"merge": 1, "init": 2}[use], "bad.npz", key)


def test_nan_where_no_data_was_seen_is_accepted(run, tmp_path, x):
    """NaN is the marker of a class never seen / an empty group: such files stay usable."""
    labels = np.arange(ROWS) % 3  # class 3 never seen: NaN center, count 0
    np.save(tmp_path / "labels.npy", labels)
    centers = ns.CentersExact(4).update(x, labels).result()
    assert np.isnan(centers.arrays["centers"][3]).all()
    write(centers, tmp_path / "c.npz")
    write(centers, tmp_path / "c2.npz")
    succeeded(run("merge", "c.npz", "c2.npz", "-o", "out.npz"))
    groups = np.arange(ROWS) % 2 * 2  # group 1 empty: NaN statistics
    np.save(tmp_path / "g.npy", groups)
    grouped = ns.BatchNormExact(num_groups=3).update(x, groups).result()
    assert np.isnan(grouped.arrays["mean"][1]).all()
    write(grouped, tmp_path / "g.npz")
    succeeded(run("apply", "g.npz", "x.npy", "--groups", "g.npy", "-o", "y.npy"))


def test_nan_where_data_was_seen_in_one_group_is_refused(run, tmp_path, x):
    groups = np.arange(ROWS) % 2
    np.save(tmp_path / "g.npy", groups)
    stats = ns.BatchNormExact(num_groups=2).update(x, groups).result()
    mean = stats.arrays["mean"].copy()
    mean[1, 3] = np.nan
    path = write(stats, tmp_path / "g.npz", mean=mean)
    refused(run("apply", path, "x.npy", "--groups", "g.npy", "-o", "y.npy"), 1, "g.npz", "mean", "index 1, 3")


def test_inspect_still_reads_a_file_with_bad_values(run, tmp_path, x):
    """inspect is where one looks at a damaged file: it reports, it does not refuse."""
    stats = exact_stats(x)
    mean = stats.arrays["mean"].copy()
    mean[0] = np.nan
    succeeded(run("inspect", write(stats, tmp_path / "bad.npz", mean=mean)))


def test_group_rows_of_the_wrong_shape_is_refused(run, tmp_path, x):
    groups = np.arange(ROWS) % 2
    np.save(tmp_path / "g.npy", groups)
    stats = ns.BatchNormExact(num_groups=2).update(x, groups).result()
    path = write(stats, tmp_path / "g.npz", group_rows=np.array([20]))
    refused(run("apply", path, "x.npy", "--groups", "g.npy", "-o", "y.npy"), 1, "g.npz", "group_rows")


META_BAD = [("eps", "abc"), ("eps", None), ("eps", -1.0), ("eps", 0), ("row_shape", "x"), ("row_shape", [-4]),
            ("rows_seen", -1), ("axes", [0.5]), ("ddof", "1"), ("batches_seen", "q"), ("batch_size", "z"),
            ("batch_size", 0), ("alpha", 2.0)]


@pytest.mark.parametrize("command", ["apply", "export", "fit-bn-init", "inspect"])
@pytest.mark.parametrize("key, value", META_BAD, ids=[f"{k}={v}" for k, v in META_BAD])
def test_damaged_metadata_names_its_key(run, tmp_path, x, command, key, value):
    ns.write_stats(ns.BatchNormEMA(batch_size=8).update(x).result(), str(tmp_path / "s.json"))
    document = json.loads((tmp_path / "s.json").read_text())
    document["meta"][key] = value
    (tmp_path / "bad.json").write_text(json.dumps(document))
    args = {"apply": ["apply", "bad.json", "x.npy", "-o", "y.npy"],
            "export": ["export", "bad.json", "--to", "keras", "-o", "out.npz"],
            "fit-bn-init": ["fit-bn", "x.npy", "--init", "bad.json", "-o", "out.npz"],
            "inspect": ["inspect", "bad.json"]}[command]
    refused(run(*args), 1, "bad.json", key)


def test_an_imported_nan_running_mean_is_refused(run, tmp_path):
    tensors = {"bn.running_mean": np.array([0.0, np.nan, 1.0], np.float32),
               "bn.running_var": np.ones(3, np.float32)}
    safetensors.numpy.save_file(tensors, str(tmp_path / "m.safetensors"))
    refused(run("import", "m.safetensors", "-o", "out.npz"), 1, "m.safetensors", "bn.running_mean", "channel 1")
    tensors = {"bn.running_mean": np.zeros(3, np.float32), "bn.running_var": np.array([1, np.inf, 1], np.float32)}
    safetensors.numpy.save_file(tensors, str(tmp_path / "m.safetensors"))
    refused(run("import", "m.safetensors", "-o", "out.npz"), 1, "bn.running_var", "channel 1")


def test_export_still_refuses_an_inv_std_no_variance_gives(run, tmp_path, x):
    stats = exact_stats(x)
    inv_std = stats.arrays["inv_std"].copy()
    inv_std[2] = 1e200  # above 1/sqrt(eps): its square overflows
    path = write(stats, tmp_path / "big.npz", inv_std=inv_std)
    refused(run("export", path, "--to", "torch", "-o", "out.safetensors"), 1, "big.npz", "inv_std")


def test_check_values_in_the_library():
    stats = exact_stats(features())
    stats.arrays["inv_std"][3] = -2.0
    stats.source = "lib.npz"
    with pytest.raises(StatsFileError, match=r"lib\.npz: inv_std holds -2\.0 at index 3; it must be finite and > 0"):
        ns.Normalizer(stats)
    with pytest.raises(StatsFileError, match="inv_std"):
        ns.merge_stats([stats, exact_stats(features())])


# --- option values -----------------------------------------------------------------------------

FIT_BN = ["fit-bn", "x.npy", "-o", "out.npz"]
FIT_CENTERS = ["fit-centers", "x.npy", "--labels", "labels.npy", "--num-classes", 3, "-o", "out.npz"]

BAD_OPTIONS = [
    *[(FIT_BN, "--alpha", v) for v in ("nan", "inf", "-inf", "0", "-0.5", "1.5")],
    *[(FIT_CENTERS, "--alpha", v) for v in ("nan", "inf", "0", "2")],
    *[(FIT_BN, "--eps", v) for v in ("nan", "inf", "-1", "0", "1e-300", "1e-39")],
    *[(FIT_BN, "--mean", v) for v in ("nan", "inf", "-inf")],
    *[(FIT_BN, "--inv-std", v) for v in ("nan", "inf", "-1", "0", "-0")],
    *[(FIT_BN + ["--checkpoint", "ck.npz"], "--checkpoint-every", v) for v in ("nan", "inf")],
    (FIT_BN + ["--mode", "exact"], "--jobs", "100000"),
    *[(FIT_CENTERS, "--seed", v) for v in ("-1", str(2**32))],
    *[(["apply", "stats.npz", "x.npy", "-o", "y.npy"], "--gamma", v) for v in ("nan", "inf", "-inf")],
    *[(["apply", "stats.npz", "x.npy", "-o", "y.npy"], "--beta", v) for v in ("nan", "inf")],
    *[(["export", "stats.npz", "--to", "torch", "-o", "out.safetensors"], "--eps", v) for v in ("nan", "inf", "1e-300")],
    *[(["export", "stats.npz", "--to", "torch", "-o", "out.safetensors"], "--gamma", v) for v in ("nan", "inf")],
    *[(["export", "stats.npz", "--to", "torch", "-o", "out.safetensors"], "--beta", v) for v in ("nan", "-inf")],
    *[(["import", "m.safetensors", "-o", "out.npz"], "--eps", v) for v in ("nan", "inf", "0", "1e-300")],
    *[(["assign", "centers.npz", "x.npy", "-o", "out.h5"], "--max-distance", v) for v in ("nan", "-1")],
]


@pytest.fixture
def inputs(tmp_path, x, stats_path):
    """Every file the commands above read, valid."""
    np.save(tmp_path / "labels.npy", np.arange(ROWS) % 3)
    write(_centers(x), tmp_path / "centers.npz")
    safetensors.numpy.save_file({"running_mean": np.zeros(4, np.float32), "running_var": np.ones(4, np.float32)},
                                str(tmp_path / "m.safetensors"))
    return tmp_path


@pytest.mark.parametrize("args, name, value", BAD_OPTIONS,
                         ids=[f"{a[0]} {n} {v}" for a, n, v in BAD_OPTIONS])
def test_meaningless_option_values_are_usage_errors(run, inputs, args, name, value):
    # The bad value is refused as it is parsed: before any input is read, here a missing one.
    missing = [("missing.npy" if a == "x.npy" else a) for a in args]
    refused(run(*missing, name, value), 2, name)
    refused(run(*args, name, value), 2, name)
    assert outputs(inputs) == []


@pytest.mark.parametrize("option", ["--gamma", "--beta"])
@pytest.mark.parametrize("command", ["apply", "export"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_gamma_and_beta_files_must_be_finite(run, inputs, option, command, value):
    np.save(inputs / "g.npy", np.array([1.0, 2.0, value, 1.0]))
    args = (["apply", "stats.npz", "x.npy", "-o", "y.npy"] if command == "apply" else
            ["export", "stats.npz", "--to", "torch", "-o", "out.safetensors"])
    refused(run(*args, option, "g.npy"), 2, option, "g.npy", "index 2")


def test_center_init_file_must_be_finite(run, inputs):
    np.save(inputs / "init.npy", np.where(np.eye(3, 4) > 0, np.nan, 0.0))
    refused(run(*FIT_CENTERS, "--init", "init.npy"), 2, "--init", "init.npy", "index 0, 0")


def test_seed_minus_one_in_the_installed_script(tmp_path, x):
    np.save(tmp_path / "labels.npy", np.arange(ROWS) % 3)
    done = subprocess.run([SCRIPT, *map(str, FIT_CENTERS), "--seed", "-1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: Invalid value for '--seed'")


def test_a_huge_jobs_count_is_refused_at_once_in_the_installed_script(tmp_path, x):
    # It planned 10**20 row ranges before: the run never ended.
    done = subprocess.run([SCRIPT, "fit-bn", "x.npy", "-o", "out.npz", "--mode", "exact", "--jobs", str(10**20)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--jobs" in done.stderr.strip().splitlines()[-1], done.stderr


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.int8])
def test_unsigned_and_narrow_labels_out_of_range_name_the_row(run, inputs, dtype):
    labels = (np.arange(ROWS) % 3).astype(dtype)
    labels[29] = np.iinfo(dtype).max
    np.save(inputs / "wide.npy", labels)
    for mode in ("ema", "exact"):
        result = run("fit-centers", "x.npy", "--labels", "wide.npy", "--num-classes", 3, "--mode", mode,
                     "-o", "out.npz")
        refused(result, 1, "wide.npy row 29", str(np.iinfo(dtype).max), "--num-classes")


def test_uint64_labels_in_range_give_the_int64_result(run, inputs, x):
    labels = np.arange(ROWS) % 3
    np.save(inputs / "u.npy", labels.astype(np.uint64))
    succeeded(run("fit-centers", "x.npy", "--labels", "u.npy", "--num-classes", 3, "--mode", "exact", "-o", "u.npz"))
    succeeded(run("fit-centers", "x.npy", "--labels", "labels.npy", "--num-classes", 3, "--mode", "exact",
                  "-o", "i.npz"))
    np.testing.assert_array_equal(ns.read_stats("u.npz").arrays["centers"], ns.read_stats("i.npz").arrays["centers"])


def test_labels_given_neither_once_nor_once_per_input(run, inputs, x):
    np.save(inputs / "x2.npy", x)
    result = run("fit-centers", "x.npy", "x2.npy", "--labels", "labels.npy", "--labels", "labels.npy",
                 "--labels", "labels.npy", "--num-classes", 3, "-o", "out.npz")
    refused(result, 2, "--labels was given 3 times for 2 INPUT shards")


# --- an option taking one value, given twice ---------------------------------------------------------


def _single_valued_options():
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and not (param.is_flag or param.multiple or param.count):
                yield name, command, param


SINGLE = list(_single_valued_options())


def test_every_single_valued_option_of_every_command_is_given_once():
    from normstats.cli.params import OnceOption

    assert {name for name, _, _ in SINGLE} == set(cli.commands)
    assert [f"{n} {p.opts[-1]}" for n, _, p in SINGLE if not isinstance(p, OnceOption)] == []


@pytest.mark.parametrize("name, command, param", SINGLE, ids=[f"{n} {p.opts[-1]}" for n, _, p in SINGLE])
def test_an_option_given_twice_is_a_usage_error(run, tmp_path, name, command, param):
    args = [name]
    for other in command.params:  # arguments and required options, as placeholders
        if isinstance(other, click.Argument):
            args.append("a.npy")
        elif other.required and other is not param:
            choices = getattr(other.type, "choices", None)
            args += [other.opts[-1], choices[0] if choices else "1"]
    flag = param.opts[-1]
    value = str(param.default) if param.default is not None else "1"
    result = run(*args, flag, value, flag, value)
    assert error_line(result) == f"Error: {flag} was given twice; give it once"
    assert result.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_short_and_long_spellings_count_together(run, tmp_path, x):
    result = run("fit-bn", "x.npy", "-o", "a.npz", "--output", "b.npz")
    assert error_line(result) == "Error: --output was given twice; give it once"
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()


def test_weights_given_twice_no_longer_uses_the_last(run, tmp_path, x):
    np.save(tmp_path / "a.npy", np.ones(ROWS))
    np.save(tmp_path / "b.npy", np.arange(ROWS, dtype=np.float64))
    result = run("fit-bn", "x.npy", "--mode", "exact", "--weights", "a.npy", "--weights", "b.npy", "-o", "out.npz")
    assert error_line(result) == "Error: --weights was given twice; give it once"


def test_option_given_once_in_equals_form_still_works(run, tmp_path, x):
    succeeded(run("fit-bn", "x.npy", "--alpha=0.5", "--eps=1e-3", "-o", "out.npz"))
    assert ns.read_stats("out.npz").meta["alpha"] == 0.5
    result = run("fit-bn", "x.npy", "--alpha=0.5", "--alpha", "0.25", "-o", "out2.npz")
    assert error_line(result) == "Error: --alpha was given twice; give it once"


def test_h5_output_keeps_its_dataset_name_with_dtype(run, tmp_path, x, stats_path):
    succeeded(run("apply", stats_path, "x.npy", "-o", "y.h5:normed", "--dtype", "float64"))
    with h5py.File(tmp_path / "y.h5") as f:
        assert f["normed"].dtype == np.float64 and f["normed"].shape == x.shape


@pytest.mark.parametrize("target, out, key, value", [
    ("torch", "out.safetensors", "mean", 1e39),  # beyond float32: running_mean would be inf
    ("keras", "out.npz", "inv_std", 1e-160),  # variance = 1/inv_std**2 overflows float64
])
def test_export_never_writes_a_non_finite_number(run, tmp_path, x, target, out, key, value):
    stats = exact_stats(x)
    bad = stats.arrays[key].copy()
    bad[3] = value
    path = write(stats, tmp_path / "far.npz", **{key: bad})
    refused(run("export", path, "--to", target, "-o", out), 1, "far.npz", "index 3", "finite")
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("options", [{"mean": np.nan}, {"inv_std": np.inf}, {"inv_std": -1.0},
                                     {"mean": np.array([0.0, np.inf, 0.0, 0.0])}])
def test_library_initial_values_must_be_finite(options):
    with pytest.raises(ns.UsageError, match="initial (mean|inv_std) holds"):
        ns.BatchNormEMA(**options).update(features())
