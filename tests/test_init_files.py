"""fit-bn --mean FILE / --inv-std FILE: per-statistic starting values of the moving averages,
read as .npy or file:NAME (HDF5 dataset, npz member, safetensors tensor)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file

import normstats as ns
from tests.cli_checks import error_line
from tests.reference import make_data, ref_bn_ema


@pytest.fixture
def x(tmp_path) -> np.ndarray:
    """(33, 4, 3, 5) float32, channels-first (C = 4), as x.npy."""
    data = make_data((33, 4, 3, 5), dtype="float32", seed=21)
    np.save(tmp_path / "x.npy", data)
    return data


def write(folder, kind: str, name: str, array: np.ndarray) -> str:
    """`array` in a file of `kind`, with a second array beside it; the spec naming it."""
    if kind == "npy":
        np.save(folder / f"{name}.npy", array)
        return f"{name}.npy"
    if kind == "h5":
        with h5py.File(folder / f"{name}.h5", "w") as f:
            f[f"init/{name}"] = array
            f["other"] = np.zeros(2)
        return f"{name}.h5:init/{name}"
    if kind == "npz":
        np.savez(folder / f"{name}.npz", **{name: array, "other": np.zeros(2)})
        return f"{name}.npz:{name}"
    save_file({name: np.ascontiguousarray(array), "other": np.zeros(2)}, str(folder / f"{name}.safetensors"))
    return f"{name}.safetensors:{name}"


@pytest.mark.parametrize("kind", ["npy", "h5", "npz", "safetensors"])
def test_per_channel_starting_values_from_a_file(run, tmp_path, x, kind: str) -> None:
    mean0 = np.array([5.0, -3.0, 0.5, 10.0])
    inv0 = np.array([0.1, 2.0, 1.0, 4.0], dtype=np.float32)
    result = run("fit-bn", "x.npy", "--mean", write(tmp_path, kind, "m", mean0),
                 "--inv-std", write(tmp_path, kind, "s", inv0), "--batch-size", "5", "--alpha", "0.1",
                 "-o", "out.npz")
    assert result.exit_code == 0, result.output
    stats = ns.read_stats(str(tmp_path / "out.npz"))
    mean, inv_std, _, _ = ref_bn_ema(x, 5, alpha=0.1, mean=mean0, inv_std=inv0.astype(np.float64))
    np.testing.assert_allclose(stats.arrays["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(stats.arrays["inv_std"], inv_std, rtol=1e-10)
    # the starting values matter: from the defaults the result differs
    assert not np.allclose(stats.arrays["mean"], ref_bn_ema(x, 5, alpha=0.1)[0], rtol=1e-3)


def test_numbers_and_none_still_work(run, tmp_path, x) -> None:
    assert run("fit-bn", "x.npy", "--mean", "2.5", "--inv-std", "none", "--batch-size", "8",
               "-o", "a.npz").exit_code == 0
    stats = ns.read_stats(str(tmp_path / "a.npz"))
    assert "inv_std" not in stats.arrays
    np.testing.assert_allclose(stats.arrays["mean"], ref_bn_ema(x, 8, mean=2.5, inv_std=None)[0], rtol=1e-10)


def test_channels_last_starting_values_have_the_channels_shape(run, tmp_path) -> None:
    x = make_data((19, 6, 5, 3), dtype="float64", seed=2)
    np.save(tmp_path / "img.npy", x)
    np.save(tmp_path / "m.npy", np.array([1.0, 2.0, 3.0]))
    result = run("fit-bn", "img.npy", "--channel-axis", "-1", "--mean", "m.npy", "--batch-size", "4",
                 "--alpha", "0.5", "-o", "s.npz")
    assert result.exit_code == 0, result.output
    expected = ref_bn_ema(x, 4, axes=(0, 1, 2), alpha=0.5, mean=np.array([1.0, 2.0, 3.0]))[0]
    np.testing.assert_allclose(ns.read_stats(str(tmp_path / "s.npz")).arrays["mean"], expected, rtol=1e-12)
    wrong = run("fit-bn", "img.npy", "--mean", "m.npy", "-o", "t.npz")  # channels-first: 6 statistics
    assert wrong.exit_code == 1
    line = error_line(wrong)
    assert "m.npy" in line and "(3,)" in line and "(6,)" in line


@pytest.mark.parametrize("option,values,words", [
    ("--mean", np.array([0.0, np.nan, 1.0, 2.0]), ["m.npy", "nan", "index 1", "finite"]),
    ("--mean", np.array([[0.0, 1.0], [2.0, np.inf]]), ["m.npy", "inf", "index 1, 1"]),
    ("--inv-std", np.array([1.0, 1.0, 0.0, 1.0]), ["m.npy", "index 2", "> 0"]),
    ("--inv-std", np.array([1.0, -2.0, 1.0, 1.0]), ["m.npy", "-2.0", "index 1", "> 0"]),
])
def test_bad_values_name_the_file_and_the_first_bad_index(run, tmp_path, x, option, values, words) -> None:
    np.save(tmp_path / "m.npy", values)
    result = run("fit-bn", "x.npy", option, "m.npy", "-o", "out.npz")
    assert result.exit_code == 2
    line = error_line(result)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("shape", [(3,), (4, 3), (1,), (5,)])
def test_a_wrong_shape_is_one_line_naming_file_shape_and_expected(run, tmp_path, x, shape) -> None:
    spec = write(tmp_path, "npz", "m", np.ones(shape))
    result = run("fit-bn", "x.npy", "--inv-std", spec, "-o", "out.npz")
    assert result.exit_code == 1
    line = error_line(result)
    assert spec in line and str(shape) in line and "(4,)" in line, line
    assert not (tmp_path / "out.npz").exists()


def test_an_output_that_is_a_mean_file_is_refused(run, tmp_path, x) -> None:
    assert run("fit-bn", "x.npy", "--batch-size", "4", "-o", "old.npz").exit_code == 0
    before = (tmp_path / "old.npz").read_bytes()
    for extra in ([], ["--force"]):
        result = run("fit-bn", "x.npy", "--mean", "old.npz:mean", "-o", "old.npz", *extra)
        assert result.exit_code == 2
        line = error_line(result)
        assert "old.npz" in line and "--mean" in line, line
        assert "same file" in line, line
    np.savez(tmp_path / "i.npz", i=np.ones(4))
    (tmp_path / "link.npz").symlink_to(tmp_path / "i.npz")
    result = run("fit-bn", "x.npy", "--inv-std", "i.npz:i", "--checkpoint", "link.npz", "-o", "new.npz")
    assert result.exit_code == 2 and "--inv-std" in error_line(result) and "same file" in error_line(result)
    assert (tmp_path / "old.npz").read_bytes() == before
    with np.load(tmp_path / "i.npz") as kept:
        np.testing.assert_array_equal(kept["i"], np.ones(4))
    assert not (tmp_path / "new.npz").exists()


def test_a_continued_fit_checks_the_files_shape_against_the_stats_file(run, tmp_path, x) -> None:
    assert run("fit-bn", "x.npy", "--batch-size", "8", "-o", "a.npz").exit_code == 0
    np.save(tmp_path / "m.npy", np.array([1.0, 2.0, 3.0, 4.0]))
    result = run("fit-bn", "x.npy", "--init", "a.npz", "--mean", "m.npy", "--alpha", "0.5", "-o", "b.npz")
    assert result.exit_code == 0, result.output
    start = ns.read_stats(str(tmp_path / "a.npz")).arrays["inv_std"]
    mean, inv_std, _, _ = ref_bn_ema(x, 8, alpha=0.5, mean=np.array([1.0, 2.0, 3.0, 4.0]), inv_std=start)
    stats = ns.read_stats(str(tmp_path / "b.npz"))
    np.testing.assert_allclose(stats.arrays["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(stats.arrays["inv_std"], inv_std, rtol=1e-10)
    np.save(tmp_path / "m3.npy", np.ones(3))
    wrong = run("fit-bn", "x.npy", "--init", "a.npz", "--mean", "m3.npy", "-o", "c.npz")
    assert wrong.exit_code == 1 and "m3.npy" in error_line(wrong)


def test_exact_mode_takes_no_starting_file(run, tmp_path, x) -> None:
    np.save(tmp_path / "m.npy", np.ones(4))
    result = run("fit-bn", "x.npy", "--mode", "exact", "--mean", "m.npy", "-o", "out.npz")
    assert result.exit_code == 2 and "--mean" in error_line(result)
