"""fit-bn --channel-axis A (axes spec 'auto:A'): every axis but A reduced, the layout kept in the
stats file for apply and export, and channels-last blocks read through the kernel's vectorized path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import normstats as ns
from normstats.kernels import Layout, accumulate
from normstats.workspace import Workspace
from tests.cli_checks import error_line
from tests.reference import make_data, ref_apply, ref_bn_ema, ref_bn_exact


def all_but(channel_axis: int, ndim: int) -> tuple[int, ...]:
    """The reduced axes, written out independently of normstats."""
    return tuple(axis for axis in range(ndim) if axis != channel_axis % ndim)


# --- the library, against plain NumPy ------------------------------------------------------

SHAPES = {2: (23, 5), 3: (19, 4, 6), 4: (13, 3, 5, 4), 5: (9, 2, 3, 4, 3)}
CASES = [(ndim, axis) for ndim in SHAPES for axis in (-1, 1, 2) if axis % ndim != 0]
DTYPES = ["float16", "float32", "float64", "int16", "int64", "uint8"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ndim,axis", CASES)
def test_exact_reduces_every_axis_but_the_channel(ndim: int, axis: int, dtype: str) -> None:
    x = make_data(SHAPES[ndim], dtype=dtype, seed=ndim * 10 + axis)
    axes = all_but(axis, ndim)
    stats = ns.BatchNormExact(axes=f"auto:{axis}").update(x[:7]).update(x[7:]).result()
    mean, var, inv_std = ref_bn_exact(x, axes=axes)
    assert stats.arrays["mean"].shape == (x.shape[axis],)
    np.testing.assert_allclose(stats.arrays["mean"], mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.arrays["var"], var, rtol=1e-9)
    np.testing.assert_allclose(stats.arrays["inv_std"], inv_std, rtol=1e-9)
    assert stats.meta["axes"] == list(axes)
    assert stats.meta["channel_axis"] == axis % ndim


@pytest.mark.parametrize("dtype", ["float16", "float32", "int64"])
@pytest.mark.parametrize("batch", [1, 3, 5, 7])
@pytest.mark.parametrize("ndim,axis", CASES)
def test_ema_batches_match_the_reference(ndim: int, axis: int, batch: int, dtype: str) -> None:
    x = make_data(SHAPES[ndim], dtype=dtype, seed=batch)
    state = ns.BatchNormEMA(axes=f"auto:{axis}", batch_size=batch, alpha=0.3)
    for start in range(0, len(x), 4):  # blocks that cut batches: the open batch spans them
        state.update(x[start:start + 4], more=True)
    stats = state.close().result()
    mean, inv_std, batches, _ = ref_bn_ema(x, batch, axes=all_but(axis, ndim), alpha=0.3)
    np.testing.assert_allclose(stats.arrays["mean"], mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.arrays["inv_std"], inv_std, rtol=1e-10)
    assert stats.meta["batches_seen"] == batches


def test_channels_last_equals_the_same_data_channels_first() -> None:
    x = make_data((31, 6, 7, 5), dtype="float32", seed=3) * 4.0 + 100.0
    last = ns.BatchNormExact(axes="auto:-1").update(x).result()
    first = ns.BatchNormExact().update(np.ascontiguousarray(np.moveaxis(x, -1, 1))).result()
    for name in ("mean", "var", "inv_std"):
        np.testing.assert_allclose(last.arrays[name], first.arrays[name], rtol=1e-13)


def test_nan_omit_and_weights_on_channels_last() -> None:
    x = make_data((17, 4, 3, 5), seed=8)
    x[2, 1, 0, 3] = x[5, 0, 2, 1] = np.nan
    omitted = ns.BatchNormExact(axes="auto:-1", nan_policy="omit").update(x).result()
    np.testing.assert_allclose(omitted.arrays["mean"], np.nanmean(x, axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(omitted.arrays["var"], np.nanvar(x, axis=(0, 1, 2), ddof=1), rtol=1e-11)
    np.testing.assert_array_equal(omitted.arrays["count"], (~np.isnan(x)).sum(axis=(0, 1, 2)))
    clean = np.nan_to_num(x)
    w = np.random.default_rng(2).uniform(0.0, 3.0, len(x))
    weighted = ns.BatchNormExact(axes="auto:-1", ddof=0).update(clean, weights=w).result()
    wide = np.broadcast_to(w[:, None, None, None], x.shape)
    mean = np.average(clean, axis=(0, 1, 2), weights=wide)
    var = np.average((clean - mean) ** 2, axis=(0, 1, 2), weights=wide)
    np.testing.assert_allclose(weighted.arrays["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(weighted.arrays["var"], var, rtol=1e-11)
    np.testing.assert_allclose(weighted.arrays["count"], w.sum() * 12, rtol=1e-13)


def test_a_nan_is_located_in_the_input_not_in_the_sub_rows() -> None:
    x = make_data((9, 4, 3, 5), seed=1)
    x[6, 2, 1, 4] = np.inf
    with pytest.raises(ns.NonFiniteError) as caught:
        ns.BatchNormExact(axes="auto:-1").update(x)
    assert str(caught.value).startswith("row 6: column 2, 1, 4 holds inf")


# --- the kernel's channels-last path -------------------------------------------------------


def test_layout_reads_channels_last_rows_as_runs_of_every_statistic() -> None:
    assert Layout.of((32, 32, 64), (0, 1, 2)).repeats == 1024
    assert Layout.of((3, 4, 5), (0, 1)).repeats == 3
    assert Layout.of((64, 32, 32), (0, 2, 3)).repeats == 0  # channels-first: runs already
    assert Layout.of((3, 4, 5), (0, 2)).repeats == 0  # a reduced axis after a kept one
    assert Layout.of((6,), (0,)).repeats == 0  # nothing reduced within a row
    one = Layout.of((8, 8, 1), (0, 1, 2))  # one channel: the whole row is one run
    assert (one.stats, one.run, one.repeats) == (1, 64, 0)


@pytest.mark.parametrize("channels", [3, 20])  # sums per element then per channel; sub-rows
@pytest.mark.parametrize("omit", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int32", "uint64"])
def test_fast_path_sums_equal_the_element_by_element_path(dtype: str, omit: bool, channels: int) -> None:
    x = make_data((11, 4, 6, channels), dtype=dtype, seed=4)
    fast = Layout.of((4, 6, channels), (0, 1, 2))
    slow = dataclasses.replace(fast, repeats=0)
    slots = np.array([0, 0, 1, -1, 1, 2, 2, 2, 0, -1, 1], np.int64)
    keys = np.arange(3, dtype=np.int64)
    weights = np.linspace(0.5, 2.0, 11)

    def sums(layout):
        return accumulate(x, layout, slots, keys, None, np.ones(3, bool), weights=weights, omit=omit,
                          scratch=Workspace())

    a, b = sums(fast), sums(slow)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.rows, [3, 3, 3])
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-15)
    np.testing.assert_allclose(a.means(fast.per_stat), b.means(slow.per_stat), rtol=1e-12)
    np.testing.assert_allclose(a.m2(fast.per_stat), b.m2(slow.per_stat), rtol=1e-10)
    np.testing.assert_array_equal(a.centers()[0], b.centers()[0])  # the same shifts
    groups = [np.flatnonzero(slots == k) for k in range(3)]
    as_float = x.astype(np.float64)
    expected = [np.average(as_float[g], axis=(0, 1, 2),
                           weights=np.broadcast_to(weights[g, None, None, None], as_float[g].shape)) for g in groups]
    np.testing.assert_allclose(a.means(fast.per_stat), expected, rtol=1e-12)


def test_rows_read_in_pieces_take_the_fast_path_only_when_aligned() -> None:
    x = make_data((5, 4, 6), seed=6)
    layout = Layout.of((4, 6), (0, 1))
    slots, keys, shift, fresh = np.zeros(5, np.int64), np.zeros(1, np.int64), np.zeros((1, 6)), np.zeros(1, bool)
    flat = x.reshape(5, -1)
    for cut in (6, 9):  # on a statistic boundary, and inside a run of statistics
        first = accumulate(np.ascontiguousarray(flat[:, :cut]), layout, slots, keys, shift, fresh)
        both = accumulate(np.ascontiguousarray(flat[:, cut:]), layout, slots, keys, shift, fresh,
                          start=first, first_element=cut)
        np.testing.assert_allclose(both.s1[0], x.sum(axis=(0, 1)), rtol=1e-12)
        np.testing.assert_allclose(both.s2[0], (x ** 2).sum(axis=(0, 1)), rtol=1e-12)
        assert both.rows[0] == 10  # each piece counts its rows


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def nhwc(tmp_path):
    """(N, H, W, C) = (29, 8, 9, 3) float32 with distinct channel offsets, as img.npy."""
    x = make_data((29, 8, 9, 3), dtype="float32", seed=12) * np.array([1.0, 3.0, 0.5]) + np.array([-2.0, 0.0, 9.0])
    x = x.astype(np.float32)
    np.save(tmp_path / "img.npy", x)
    return x


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_fit_bn_channel_axis_numbers_and_meta(run, tmp_path, nhwc, mode: str) -> None:
    result = run("fit-bn", "img.npy", "--channel-axis", "-1", "--mode", mode, "--batch-size", "7",
                 "--alpha", "0.2", "-o", "s.npz")
    assert result.exit_code == 0, result.output
    assert "hint" not in result.stderr
    stats = ns.read_stats(str(tmp_path / "s.npz"))
    assert stats.meta["channel_axis"] == 3 and stats.meta["axes"] == [0, 1, 2]
    shown = run("inspect", "s.npz", "--json")
    assert json.loads(shown.stdout)["options"]["channel_axis"] == 3
    if mode == "exact":
        mean, _, inv_std = ref_bn_exact(nhwc, axes=(0, 1, 2))
    else:
        mean, inv_std, _, _ = ref_bn_ema(nhwc, 7, axes=(0, 1, 2), alpha=0.2)
    np.testing.assert_allclose(stats.arrays["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(stats.arrays["inv_std"], inv_std, rtol=1e-10)


def test_channel_axis_in_the_middle_of_an_h5_input(run, tmp_path) -> None:
    import h5py

    x = make_data((21, 4, 5, 6), dtype="float64", seed=5)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = x
    assert run("fit-bn", "x.h5:x", "--channel-axis", "2", "--mode", "exact", "-o", "s.h5").exit_code == 0
    stats = ns.read_stats(str(tmp_path / "s.h5"))
    np.testing.assert_allclose(stats.arrays["mean"], x.mean(axis=(0, 1, 3)), rtol=1e-12)
    assert stats.meta["channel_axis"] == 2


def test_jobs_split_the_rows_of_a_channels_last_fit(run, tmp_path, nhwc) -> None:
    assert run("fit-bn", "img.npy", "--channel-axis", "-1", "--batch-size", "4", "-o", "one.npz").exit_code == 0
    result = run("fit-bn", "img.npy", "--channel-axis", "-1", "--batch-size", "4", "--jobs", "2", "-o", "two.npz")
    assert result.exit_code == 0, result.output
    one, two = (ns.read_stats(str(tmp_path / name)) for name in ("one.npz", "two.npz"))
    np.testing.assert_allclose(two.arrays["mean"], one.arrays["mean"], rtol=1e-12)
    assert two.meta["channel_axis"] == 3


def test_apply_round_trip_on_channels_last(run, tmp_path, nhwc) -> None:
    assert run("fit-bn", "img.npy", "--channel-axis", "-1", "--mode", "exact", "-o", "s.npz").exit_code == 0
    np.save(tmp_path / "gamma.npy", np.array([2.0, 0.5, 1.0]))
    result = run("apply", "s.npz", "img.npy", "--gamma", "gamma.npy", "--beta", "0.25", "-o", "y.npy")
    assert result.exit_code == 0, result.output
    y = np.load(tmp_path / "y.npy")
    mean, _, inv_std = ref_bn_exact(nhwc, axes=(0, 1, 2))
    expected = (nhwc.astype(np.float64) - mean) * (np.array([2.0, 0.5, 1.0]) * inv_std) + 0.25
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(y, ref_apply(nhwc, mean, inv_std, axes=(0, 1, 2), gamma=[2.0, 0.5, 1.0], beta=0.25),
                               rtol=2e-6, atol=2e-6)
    unit = (y - 0.25) / np.array([2.0, 0.5, 1.0])  # each channel standardized
    np.testing.assert_allclose(unit.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)


def test_exports_of_channels_last_statistics(run, tmp_path, nhwc) -> None:
    from safetensors.numpy import load_file

    assert run("fit-bn", "img.npy", "--channel-axis", "-1", "--mode", "exact", "-o", "s.npz").exit_code == 0
    mean, var, inv_std = ref_bn_exact(nhwc, axes=(0, 1, 2))
    keras = run("export", "s.npz", "--to", "keras", "-o", "k.npz")
    assert keras.exit_code == 0, keras.output
    with np.load(tmp_path / "k.npz") as k:
        assert list(k["axis"]) == [3]
        np.testing.assert_allclose(k["variance"], var + 1e-5, rtol=1e-9)
    torch = run("export", "s.npz", "--to", "torch", "-o", "bn.safetensors")
    assert torch.exit_code == 0, torch.output
    assert "BatchNorm2d(3," in torch.stdout and "x.movedim(3, 1)" in torch.stdout
    tensors = load_file(str(tmp_path / "bn.safetensors"))
    # torch's eval-mode BatchNorm2d on the input with its channels moved to axis 1
    moved = np.moveaxis(nhwc.astype(np.float64), -1, 1)
    shape = (1, 3, 1, 1)
    y = (moved - tensors["running_mean"].reshape(shape)) / np.sqrt(tensors["running_var"].reshape(shape) + 1e-5)
    np.testing.assert_allclose(np.moveaxis(y, 1, -1), (nhwc - mean) * inv_std, rtol=1e-4, atol=1e-4)
    for target, out in (("kaldi", "s.cmvn"), ("espnet", "e.npz")):  # frames x dims: the channels as dims
        assert run("export", "s.npz", "--to", target, "-o", out).exit_code == 0
    with np.load(tmp_path / "e.npz") as e:
        np.testing.assert_allclose(e["sum"], nhwc.astype(np.float64).sum(axis=(0, 1, 2)), rtol=1e-10)


@pytest.mark.parametrize("args,code,words", [
    (["--channel-axis", "0"], 2, ["--channel-axis", "axis 0", "row axis"]),
    (["--channel-axis", "-4"], 2, ["channel axis -4", "axis 0 of 4-D input"]),
    (["--channel-axis", "4"], 2, ["channel axis 4", "out of range", "4-D"]),
    (["--channel-axis", "last"], 2, ["--channel-axis", "'last'"]),
    (["--channel-axis", "-1", "--axes", "0,1,2"], 2, ["--channel-axis", "--axes"]),
])
def test_bad_channel_axes_are_one_line(run, tmp_path, nhwc, args, code, words) -> None:
    result = run("fit-bn", "img.npy", *args, "-o", "s.npz")
    assert result.exit_code == code
    line = error_line(result)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "s.npz").exists()


def test_a_continued_fit_keeps_the_files_channel_axis(run, tmp_path, nhwc) -> None:
    assert run("fit-bn", "img.npy", "--channel-axis", "-1", "--mode", "exact", "-o", "a.npz").exit_code == 0
    refused = run("fit-bn", "img.npy", "--init", "a.npz", "--channel-axis", "-1", "-o", "b.npz")
    assert refused.exit_code == 2 and "--channel-axis cannot change" in error_line(refused)
    assert run("fit-bn", "img.npy", "--init", "a.npz", "-o", "b.npz").exit_code == 0
    stats = ns.read_stats(str(tmp_path / "b.npz"))
    assert stats.meta["channel_axis"] == 3 and stats.meta["rows_seen"] == 2 * len(nhwc)
    np.testing.assert_allclose(stats.arrays["mean"], nhwc.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-10)


def test_a_stats_file_whose_channel_axis_contradicts_its_axes_is_refused(run, tmp_path, nhwc) -> None:
    assert run("fit-bn", "img.npy", "--channel-axis", "-1", "--mode", "exact", "-o", "s.npz").exit_code == 0
    with np.load(tmp_path / "s.npz") as f:
        arrays = dict(f)
    meta = json.loads(str(arrays["meta"]))
    meta["channel_axis"] = 1
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "bad.npz", **arrays)
    result = run("apply", "bad.npz", "img.npy", "-o", "y.npy")
    assert result.exit_code != 0
    assert "channel_axis 1" in error_line(result) and "bad.npz" in error_line(result)
    assert not (tmp_path / "y.npy").exists()


def test_channels_last_images_fitted_with_auto_get_a_hint(run, tmp_path, nhwc) -> None:
    result = run("fit-bn", "img.npy", "--mode", "exact", "-o", "s.npz")
    assert result.exit_code == 0
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "--channel-axis -1" in hints[0] and "(8, 9, 3)" in hints[0]
    np.save(tmp_path / "chw.npy", np.ascontiguousarray(np.moveaxis(nhwc, -1, 1)))
    for args in (["chw.npy"], ["img.npy", "--axes", "auto"], ["img.npy", "--channel-axis", "-1"]):
        quiet = run("fit-bn", *args, "--mode", "exact", "-o", "t.npz", "--force")
        assert quiet.exit_code == 0 and "hint" not in quiet.stderr, args


def test_many_batches_of_few_channels_read_as_sub_rows(monkeypatch) -> None:
    """Sums per element would take (batches x row) memory: past the bound, sub-rows are read."""
    from normstats import kernels

    x = make_data((40, 5, 4, 3), dtype="float32", seed=9)
    expected = ref_bn_ema(x, 2, axes=(0, 1, 2), alpha=0.25)
    for bound in (kernels.CHANNELS_LAST_SCRATCH, 0):
        monkeypatch.setattr(kernels, "CHANNELS_LAST_SCRATCH", bound)
        stats = ns.BatchNormEMA(axes="auto:-1", batch_size=2, alpha=0.25).update(x).result()
        np.testing.assert_allclose(stats.arrays["mean"], expected[0], rtol=1e-10)
        np.testing.assert_allclose(stats.arrays["inv_std"], expected[1], rtol=1e-10)
