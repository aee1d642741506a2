"""Rows larger than a read block, read in pieces by every command (issue 11, item 4).

With ``stream.BLOCK_BYTES`` patched to 4 KB, rows of 64 x 64 float32 (16 KB) and
wider are cut in pieces; every command's numbers must equal the whole-row run
(unpatched, the same process) and the plain-NumPy references.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
import normstats.stream as read_blocks
from tests.batch_reference import data
from tests.cli_checks import error_line
from tests.reference import ref_apply, ref_bn_ema, ref_bn_exact, ref_centers_exact, ref_nearest

SMALL = 4096  # bytes per read block in these tests: every row below is cut in pieces


def _both(run, monkeypatch, *args, out: str) -> tuple[dict, dict]:
    """Run a command whole-row (8 MB blocks) and in 4 KB pieces; the two outputs' arrays."""
    results = []
    for block, name in ((8 << 20, "whole"), (SMALL, "cut")):
        monkeypatch.setattr(read_blocks, "BLOCK_BYTES", block)
        target = out.replace("OUT", name)
        result = run(*args, "-o", target, "-q", "--force")
        assert result.exit_code == 0, result.output
        results.append(_arrays(Path(target.split(":")[0])))
    return results[0], results[1]


def _arrays(path: Path) -> dict:
    if path.suffix == ".npy":
        return {"y": np.load(path)}
    if path.suffix == ".h5":
        with h5py.File(path) as f:
            return {k: f[k][()] for k in f}
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _same(whole: dict, cut: dict, rtol: float) -> None:
    assert set(whole) == set(cut)
    for key in whole:
        if key == "meta":  # the same but for the time taken
            times = [json.loads(str(m)) for m in (whole[key], cut[key])]
            for meta in times:
                meta.pop("seconds")
            assert times[0] == times[1]
        elif whole[key].dtype.kind in "fc":
            # relative to the values' scale: a mean near 0 of values near 3 errs by 3 ulp(3)
            scale = np.nanmax(np.abs(np.where(np.isfinite(whole[key]), whole[key], 0)), initial=0)
            np.testing.assert_allclose(cut[key], whole[key], rtol=rtol, atol=rtol * scale, err_msg=key)
        else:
            np.testing.assert_array_equal(cut[key], whole[key], err_msg=key)


SHAPES = [  # rows of 16 KB and more; ranks 2-5, auto and custom axes
    ((5, 4096), "auto"), ((6, 3, 64, 64), "auto"), ((4, 64, 64, 3), "0,1,2"),
    ((3, 2, 3, 32, 64), "auto"), ((4, 2, 48, 64), "0,3")]


@pytest.mark.parametrize("shape, axes", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int16"])
def test_fit_bn_exact_in_pieces_equals_the_whole_rows(run, tmp_path, monkeypatch, shape, axes, dtype) -> None:
    x = data(shape, dtype, seed=len(shape))
    np.save(tmp_path / "x.npy", x)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--mode", "exact", "--axes", axes, out="OUT.npz")
    _same(whole, cut, 1e-12)
    reduce = "auto" if axes == "auto" else tuple(int(a) for a in axes.split(","))
    mean, _, inv_std = ref_bn_exact(x, axes=reduce)
    np.testing.assert_allclose(cut["mean"], mean, rtol=1e-12, atol=1e-12 * np.abs(mean).max())
    np.testing.assert_allclose(cut["inv_std"], inv_std, rtol=1e-10)


@pytest.mark.parametrize("batch", [1, 2, 6, 7])  # n = 6 rows: 1, 2, n, n + 1
@pytest.mark.parametrize("fmt", ["npy", "h5"])
def test_fit_bn_ema_in_pieces_equals_the_whole_rows(run, tmp_path, monkeypatch, batch, fmt) -> None:
    x = data((6, 3, 64, 64), "float32", seed=batch)
    source = "x.npy" if fmt == "npy" else "x.h5:x"
    if fmt == "npy":
        np.save(tmp_path / "x.npy", x)
    else:
        with h5py.File(tmp_path / "x.h5", "w") as f:
            f.create_dataset("x", data=x, chunks=(1, 1, 16, 64), compression="gzip")
    whole, cut = _both(run, monkeypatch, "fit-bn", source, "--batch-size", batch, "--alpha", "0.3",
                       out="OUT.npz")
    _same(whole, cut, 1e-13)
    mean, inv_std = ref_bn_ema(x, batch, alpha=0.3)[:2]
    np.testing.assert_allclose(cut["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(cut["inv_std"], inv_std, rtol=1e-12)


def test_fit_bn_pooled_channel_axis_and_groups_in_pieces(run, tmp_path, monkeypatch) -> None:
    x = data((9, 64, 32, 3), "float32", seed=5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "g.npy", np.array([0, 2, 1, 0, 2, 2, 1, 0, 0]))
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--channel-axis", "-1", "--batch-size", "2",
                       "--pool-batches", "3", out="OUT.npz")
    _same(whole, cut, 1e-13)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--mode", "exact", "--groups", "g.npy",
                       "--num-groups", "3", out="OUT.npz")
    _same(whole, cut, 1e-12)
    groups = np.load(tmp_path / "g.npy")
    for g in range(3):
        np.testing.assert_allclose(cut["mean"][g], ref_bn_exact(x[groups == g])[0], rtol=1e-12)


def test_fit_bn_weights_and_omitted_values_in_pieces(run, tmp_path, monkeypatch) -> None:
    x = data((7, 2, 64, 64), "float64", seed=6)
    x[3, 1, 40, 7] = np.nan
    x[5, 0, 2, 2:9] = np.inf
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", np.array([1.0, 0.5, 2.0, 0.0, 1.5, 3.0, 1.0]))
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--mode", "exact", "--nan-policy", "omit",
                       out="OUT.npz")
    _same(whole, cut, 1e-12)
    np.testing.assert_allclose(cut["mean"], np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=(0, 2, 3)),
                               rtol=1e-12)
    clean = np.nan_to_num(x, nan=50.0, posinf=50.0)
    np.save(tmp_path / "x.npy", clean)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--mode", "exact", "--weights", "w.npy",
                       out="OUT.npz")
    _same(whole, cut, 1e-12)
    w = np.load(tmp_path / "w.npy")
    expected = (clean * w[:, None, None, None]).sum(axis=(0, 2, 3)) / (w.sum() * 64 * 64)
    np.testing.assert_allclose(cut["mean"], expected, rtol=1e-12)


@pytest.mark.parametrize("mode", ["ema", "exact"])
def test_fit_centers_in_pieces(run, tmp_path, monkeypatch, mode) -> None:
    x = data((11, 4, 32, 32), "float32", seed=7)
    labels = np.array([0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "l.npy", labels)
    whole, cut = _both(run, monkeypatch, "fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", "3",
                       "--mode", mode, "--batch-size", "3", out="OUT.npz")
    _same(whole, cut, 1e-12 if mode == "exact" else 1e-13)
    if mode == "exact":
        np.testing.assert_allclose(cut["centers"], ref_centers_exact(x, labels, 3)[0], rtol=1e-12)


@pytest.mark.parametrize("options", [
    ("--mode", "exact", "--weights", "w.npy"), ("--mode", "exact", "--ignore-label", "2"),
    ("--rule", "per-sample", "--batch-size", "2"), ("--nan-policy", "omit", "--batch-size", "4"),
    ("--batch-size", "1",), ("--batch-size", "12",)])
def test_fit_centers_options_in_pieces(run, tmp_path, monkeypatch, options) -> None:
    x = data((11, 2, 32, 64), "float64", seed=16)
    if "omit" in options:
        x[4, 1, 20, 5] = np.nan  # the row is left out whole, as a whole-row read leaves it
    labels = np.array([0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "w.npy", np.linspace(0.5, 3, 11))
    whole, cut = _both(run, monkeypatch, "fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", "3",
                       *options, out="OUT.npz")
    _same(whole, cut, 1e-12)
    if "--weights" in options:
        w = np.load(tmp_path / "w.npy")
        for k in range(3):
            mine = labels == k
            expected = (x[mine] * w[mine, None, None, None]).sum(axis=0) / w[mine].sum()
            np.testing.assert_allclose(cut["centers"][k], expected, rtol=1e-12)


def test_fit_bn_ema_omit_in_pieces(run, tmp_path, monkeypatch) -> None:
    x = data((7, 2, 64, 64), "float32", seed=17)
    x[2, 0, 3, 3] = np.nan
    x[6, 1, 63, 60:] = -np.inf
    np.save(tmp_path / "x.npy", x)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--nan-policy", "omit", "--batch-size", "3",
                       "--alpha", "0.5", out="OUT.npz")
    _same(whole, cut, 1e-13)
    masked = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
    mean = 0.0
    for a in range(0, 7, 3):
        mean = 0.5 * mean + 0.5 * np.nanmean(masked[a:a + 3], axis=(0, 2, 3))
    np.testing.assert_allclose(cut["mean"], mean, rtol=1e-12)


@pytest.mark.parametrize("fmt", ["npy", "h5", "h5-gzip"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int16"])
def test_apply_in_pieces_equals_the_whole_rows(run, tmp_path, monkeypatch, fmt, dtype) -> None:
    x = data((5, 3, 64, 64), dtype, seed=8)
    np.save(tmp_path / "x.npy", x)
    assert run("fit-bn", "x.npy", "--mode", "exact", "-o", "s.npz", "-q").exit_code == 0
    gzip = ("--compression", "gzip") if fmt == "h5-gzip" else ()
    whole, cut = _both(run, monkeypatch, "apply", "s.npz", "x.npy", "--gamma", "2", "--beta", "0.5", *gzip,
                       out="OUT.npy" if fmt == "npy" else "OUT.h5:y")
    if gzip:  # one chunk per piece: each compressed once
        with h5py.File(tmp_path / "cut.h5") as f:
            assert f["y"].chunks == (1, 1, 4096 // x.itemsize // 64, 64) and f["y"].compression == "gzip"
    _same(whole, cut, 0)  # the same formula in the same precision: identical
    with np.load(tmp_path / "s.npz") as s:
        expected = ref_apply(x, s["mean"], s["inv_std"], gamma=2.0, beta=0.5)
    got = next(iter(cut.values()))
    np.testing.assert_allclose(got, expected, rtol=2e-3 if dtype != "float32" else 1e-5, atol=1e-3)


def test_apply_groups_in_pieces_and_batch_stats_whole(run, tmp_path, monkeypatch) -> None:
    x = data((6, 2, 64, 64), "float64", seed=9)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "g.npy", np.array([1, 0, 1, 1, 0, 0]))
    assert run("fit-bn", "x.npy", "--mode", "exact", "--groups", "g.npy", "--num-groups", "2",
               "-o", "s.npz", "-q").exit_code == 0
    whole, cut = _both(run, monkeypatch, "apply", "s.npz", "x.npy", "--groups", "g.npy", out="OUT.npy")
    _same(whole, cut, 0)
    # --batch-stats holds each batch whole (under its own limit): the same numbers with wide rows
    assert run("fit-bn", "x.npy", "--mode", "exact", "-o", "one.npz", "-q").exit_code == 0
    whole, cut = _both(run, monkeypatch, "apply", "one.npz", "x.npy", "--batch-stats", "--batch-size", "4",
                       out="OUT.npy")
    _same(whole, cut, 0)
    batches = [x[:4], x[4:]]
    expected = np.concatenate([(b - b.mean((0, 2, 3), keepdims=True)) / np.sqrt(b.var((0, 2, 3), ddof=1, keepdims=True) + 1e-5)
                               for b in batches])
    np.testing.assert_allclose(cut["y"], expected, rtol=1e-6, atol=1e-6)


def test_apply_overflow_in_a_later_piece_names_the_row_and_column(run, tmp_path, monkeypatch) -> None:
    x = np.zeros((3, 2, 64, 64), np.float32)
    x[:, 1] = 1.0
    x[2, 1, 50, 3] = 60000.0
    np.save(tmp_path / "x.npy", x)
    assert run("fit-bn", "x.npy", "--mode", "exact", "-o", "s.npz", "-q").exit_code == 0
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", SMALL)
    # channel 1: 1 +- 541, so 60000 normalizes to about 110, and with gamma 1e5 beyond float16
    result = run("apply", "s.npz", "x.npy", "--gamma", "1e5", "--dtype", "float16", "-o", "y.npy")
    line = error_line(result)
    assert "x.npy row 2" in line and "column 1, 50, 3" in line and "--dtype float32" in line, line
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_assign_sums_distances_over_pieces(run, tmp_path, monkeypatch, metric) -> None:
    x = data((9, 2, 64, 64), "float32", seed=10)
    labels = np.arange(9) % 4
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "l.npy", labels)
    assert run("fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", "4", "--mode", "exact",
               "-o", "c.npz", "-q").exit_code == 0
    whole, cut = _both(run, monkeypatch, "assign", "c.npz", "x.npy", "--metric", metric, "--top-k", "3",
                       out="OUT.h5")
    np.testing.assert_array_equal(cut["labels"], whole["labels"])
    np.testing.assert_allclose(cut["distances"], whole["distances"], rtol=1e-10)
    with np.load(tmp_path / "c.npz") as c:
        ref_labels, ref_dist = ref_nearest(x, c["centers"], c["counts"], k=3, metric=metric)
    np.testing.assert_array_equal(cut["labels"], ref_labels)
    np.testing.assert_allclose(cut["distances"], ref_dist, rtol=1e-9)


def test_a_nan_in_a_wide_row_names_its_row_and_place(run, tmp_path, monkeypatch) -> None:
    x = data((4, 3, 64, 64), "float32", seed=11)
    x[2, 2, 60, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", SMALL)
    line = error_line(run("fit-bn", "x.npy", "--mode", "exact", "-o", "s.npz"))
    assert "x.npy row 2" in line and "2, 60, 1" in line, line
    assert not (tmp_path / "s.npz").exists()


def test_a_file_cut_inside_a_row_is_one_error(run, tmp_path, monkeypatch) -> None:
    x = data((4, 3, 64, 64), "float32", seed=12)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(read_blocks, "BLOCK_BYTES", SMALL)
    original = ns.BatchNormExact.update_row
    size = os.path.getsize(tmp_path / "x.npy")

    def cut_after_the_first_row(self, pieces, template, **side):
        if self.rows_seen == 1:  # the file loses half of row 2 while row 1 is read
            os.truncate(tmp_path / "x.npy", size - x[0].nbytes * 3 // 2)
        return original(self, pieces, template, **side)

    monkeypatch.setattr(ns.BatchNormExact, "update_row", cut_after_the_first_row)
    line = error_line(run("fit-bn", "x.npy", "--mode", "exact", "-o", "s.npz"))
    assert "x.npy" in line and ("ended early" in line or "changed while it was read" in line), line
    assert not (tmp_path / "s.npz").exists()


def test_fortran_order_rows_are_read_whole_with_the_same_numbers(run, tmp_path, monkeypatch) -> None:
    x = np.asfortranarray(data((5, 3, 64, 64), "float32", seed=13))
    np.save(tmp_path / "x.npy", x)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--mode", "exact", out="OUT.npz")
    _same(whole, cut, 1e-12)


@pytest.mark.parametrize("saved", ["stored", "compressed"])
def test_npz_members_in_pieces_or_whole_rows(run, tmp_path, monkeypatch, saved) -> None:
    # a stored member is read at its offset in pieces; a deflated one a whole row at a time
    x = data((5, 3, 64, 64), "float32", seed=14)
    (np.savez if saved == "stored" else np.savez_compressed)(tmp_path / "x.npz", x=x)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npz:x", "--mode", "exact", out="OUT.npz")
    _same(whole, cut, 1e-12)
    np.testing.assert_allclose(cut["mean"], ref_bn_exact(x)[0], rtol=1e-12)


def test_batch_boundaries_and_jobs_in_pieces(run, tmp_path, monkeypatch) -> None:
    x = data((9, 2, 64, 64), "float32", seed=15)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "b.npy", np.array([0, 1, 4, 5, 8]))
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--batch-boundaries", "b.npy", "--alpha", "0.4",
                       out="OUT.npz")
    _same(whole, cut, 1e-13)
    mean, inv_std = 0.0, 1.0
    for a, b in [(0, 1), (1, 4), (4, 5), (5, 8), (8, 9)]:
        batch = x[a:b].astype(np.float64)
        mean = 0.6 * mean + 0.4 * batch.mean(axis=(0, 2, 3))
        inv_std = 0.6 * inv_std + 0.4 / np.sqrt(batch.var(axis=(0, 2, 3), ddof=1) + 1e-5)
    np.testing.assert_allclose(cut["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(cut["inv_std"], inv_std, rtol=1e-12)
    # --jobs 2: forked workers read their rows in pieces too (the patched block is inherited)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.npy", "--mode", "exact", "--jobs", "2", out="OUT.npz")
    _same(whole, cut, 1e-12)
    np.testing.assert_allclose(cut["mean"], ref_bn_exact(x)[0], rtol=1e-12)


def test_zarr_rows_are_read_whole_with_the_same_numbers(run, tmp_path, monkeypatch) -> None:
    zarr = pytest.importorskip("zarr")
    x = data((5, 3, 64, 64), "float32", seed=18)
    labels = np.array([1, 0, 1, 1, 0])
    zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape, chunks=(2, 3, 64, 64), dtype="f4")[:] = x
    np.save(tmp_path / "l.npy", labels)
    whole, cut = _both(run, monkeypatch, "fit-bn", "x.zarr", "--mode", "exact", out="OUT.npz")
    _same(whole, cut, 1e-12)
    whole, cut = _both(run, monkeypatch, "fit-centers", "x.zarr", "--labels", "l.npy", "--num-classes", "2",
                       "--mode", "exact", out="OUT.npz")
    _same(whole, cut, 1e-12)
    np.testing.assert_allclose(cut["centers"][1], x[labels == 1].astype(np.float64).mean(axis=0), rtol=1e-12,
                               atol=1e-12 * np.abs(x).max())


CHILD = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    from normstats.cli import cli

    def memory(field):
        status = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{field}:\\s+(\\d+) kB", status, re.M).group(1)) * 1024

    tiny, wide = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    cli.main(tiny, standalone_mode=False)  # imports, kernels and buffers of a small run first
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    base = memory("VmRSS")
    cli.main(wide, standalone_mode=False)
    print(json.dumps({"growth": memory("VmHWM") - base}))
""")


def _growth(tmp_path: Path, tiny: list, wide: list) -> int:
    """How far the resident memory rose over a run of `wide` after one of `tiny`."""
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(tiny), json.dumps(wide)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.splitlines()[-1])["growth"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs /proc (VmHWM)")
def test_256_mb_rows_fit_and_apply_within_the_block(tmp_path) -> None:
    rows, row_shape = 2, (64, 1024, 1024)  # float32: 256 MB per row, 512 MB of data
    header = np.lib.format.header_data_from_array_1_0(np.empty((0,), np.float32))
    header["shape"] = (rows, *row_shape)
    with open(tmp_path / "wide.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + rows * 4 * int(np.prod(row_shape)))  # sparse: reads as zeros
    np.save(tmp_path / "tiny.npy", np.ones((4, 64, 8, 8), np.float32))
    block = read_blocks.BLOCK_BYTES
    runs = [(["fit-bn", "tiny.npy", "--mode", "exact", "-o", "t.npz", "-q"],
             ["fit-bn", "wide.npy", "--mode", "exact", "-o", "s.npz", "-q"]),
            (["fit-bn", "tiny.npy", "--batch-size", "2", "-o", "te.npz", "-q"],
             ["fit-bn", "wide.npy", "--batch-size", "2", "-o", "e.npz", "-q"]),
            (["apply", "t.npz", "tiny.npy", "-o", "ty.npy", "-q"],
             ["apply", "s.npz", "wide.npy", "-o", "y.npy", "-q"])]
    for tiny, wide in runs:
        growth = _growth(tmp_path, tiny, wide)
        # a piece (8 MB), its float32 result and the row's statistics (64 channels): the
        # whole-row reads of before took 2 x 256 MB
        assert growth < 1.5 * block + (8 << 20), (wide[0], growth / 2**20)
    with np.load(tmp_path / "s.npz") as s:
        assert s["mean"].shape == (64,) and not s["mean"].any()
    y = np.load(tmp_path / "y.npy", mmap_mode="r")
    assert y.shape == (rows, *row_shape) and float(y[1, 63, 1023, 1000]) == 0.0
