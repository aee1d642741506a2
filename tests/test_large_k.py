"""Many classes and groups (issue 12): EMA centers folded batch by batch in cache, the lean
per-group result, and kernels loaded on first use -- against the plain-NumPy references."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import normstats as ns
from normstats import centers as centers_module
from normstats.errors import NonFiniteError
from tests.reference import ref_centers_ema, ref_centers_ema_first

# Both ways of folding EMA centers: the whole block's (batch, class) sums then the fold, and
# batch by batch in cache (the default beyond 1 MB of pair sums).
PATHS = {"block": 1 << 60, "batches": 0}


def _fit(x, labels, k, batch, path, monkeypatch, chunks=(None,), **options):
    monkeypatch.setattr(centers_module, "FUSED_PAIRS_BYTES", PATHS[path])
    state = ns.centers_state(k, "ema", batch_size=batch, **options)
    cuts = [0, *[c for c in chunks if c is not None], len(x)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        state.update(x[lo:hi], labels[lo:hi], more=hi < len(x))  # a batch cut by a block stays open
    return state.close()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("k, rows, batch", [(1, 37, 8), (7, 50, 1), (7, 50, 2), (40, 61, 7), (300, 45, 45),
                                            (300, 45, 46)])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_ema_centers_equal_the_reference(path, k, rows, batch, dtype, monkeypatch) -> None:
    """K = 1, K > rows, batch sizes 1, 2, odd, n, n + 1, every float dtype."""
    rng = np.random.default_rng(k * 1000 + rows + batch)
    x = (rng.normal(size=(rows, 5)) * 3 + 100).astype(dtype)
    labels = rng.integers(0, k, rows)
    got = _fit(x, labels, k, batch, path, monkeypatch, init="zeros", alpha=0.3).result()
    want, counts = ref_centers_ema(x.astype(np.float64), labels, k, batch, alpha=0.3)
    np.testing.assert_allclose(got.arrays["centers"], want, rtol=1e-13, atol=1e-11)
    np.testing.assert_array_equal(got.arrays["counts"], counts)


@pytest.mark.parametrize("path", list(PATHS))
def test_first_init_per_sample_rule_and_blocks_cut_mid_batch(path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4))
    labels = rng.integers(0, 150, 200)  # most classes in one block only
    got = _fit(x, labels, 150, 16, path, monkeypatch, chunks=(40, 41, 130), init="first", alpha=0.2).result()
    want, _ = ref_centers_ema_first(x, labels, 150, 16, alpha=0.2)
    np.testing.assert_allclose(got.arrays["centers"], want, rtol=1e-13, atol=1e-13, equal_nan=True)

    per_sample = [_fit(x, labels, 150, 16, p, monkeypatch, init="zeros", alpha=0.05, rule="per-sample")
                  for p in PATHS]
    np.testing.assert_array_equal(per_sample[0].centers, per_sample[1].centers)
    # per-sample: each row of a class in a batch adds alpha * (x - C_old) to it
    centers = np.zeros((150, 4))
    for lo in range(0, 200, 16):
        old = centers.copy()
        for i in range(lo, min(lo + 16, 200)):
            centers[labels[i]] += 0.05 * (x[i] - old[labels[i]])
    np.testing.assert_allclose(per_sample[0].centers, centers, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", list(PATHS))
def test_omit_skips_rows_with_nan_found_in_a_later_batch(path, monkeypatch) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(96, 3))
    labels = rng.integers(0, 60, 96)
    x[70, 1] = np.nan  # in the 9th batch of 8: the batches before are folded as they are
    x[90, 0] = np.inf
    got = _fit(x, labels, 60, 8, path, monkeypatch, init="zeros", alpha=0.5, nan_policy="omit")
    keep = np.isfinite(x).all(axis=1)
    # The reference skips the two rows but keeps the batch grid of all rows.
    centers = np.zeros((60, 3))
    for lo in range(0, 96, 8):
        rows = np.arange(lo, lo + 8)[keep[lo:lo + 8]]
        for j in np.unique(labels[rows]):
            centers[j] = 0.5 * x[rows[labels[rows] == j]].mean(axis=0) + 0.5 * centers[j]
    np.testing.assert_allclose(got.centers, centers, rtol=1e-13, atol=1e-14)
    assert got.rows_ignored == 2 and got.counts.sum() == 94


@pytest.mark.parametrize("path", list(PATHS))
def test_a_nan_without_omit_names_its_row(path, monkeypatch) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 3))
    labels = rng.integers(0, 50, 64)
    x[45, 2] = np.nan
    with pytest.raises(NonFiniteError) as caught:
        _fit(x, labels, 50, 8, path, monkeypatch, chunks=(20,), init="zeros")
    assert caught.value.row == 45 and tuple(caught.value.index) == (2,)


def test_integer_data_take_the_block_path_with_the_same_numbers(monkeypatch) -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(-2**40, 2**40, size=(80, 3))
    labels = rng.integers(0, 70, 80)
    got = _fit(x, labels, 70, 8, "batches", monkeypatch, init="zeros", alpha=0.25).result()
    want, _ = ref_centers_ema(x.astype(np.float64), labels, 70, 8, alpha=0.25)
    np.testing.assert_allclose(got.arrays["centers"], want, rtol=1e-13)


def test_a_fit_loads_only_the_kernels_it_calls(tmp_path) -> None:
    """fit-bn ema loads its accumulate kernel, not the groups' or the centers' ones."""
    x = np.random.default_rng(8).normal(size=(300, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    child = textwrap.dedent(
        """
        import sys
        from normstats.cli import main
        from normstats import compiled
        sys.argv = ["normstats", "fit-bn", sys.argv[1], "-o", sys.argv[2], "-q"]
        try:
            main()
        except SystemExit:
            pass
        print(sorted(name for name in ("_accumulate", "_update_groups", "_fold_runs", "_fold_ema_batches",
                                       "_fold_centers_ema", "_slot_rows") if getattr(compiled, name).signatures))
        """
    )
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "x.npy"), str(tmp_path / "s.npz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "['_accumulate']"
    stats = ns.read_stats(str(tmp_path / "s.npz"))
    assert stats.meta["rows_seen"] == 300


@pytest.mark.parametrize("row_shape, axes", [((6,), "auto"), ((3, 2, 2), "auto"), ((2, 3), (0, 2))])
def test_spent_group_result_equals_the_kept_one_and_the_reference(row_shape, axes) -> None:
    """Groups present in one block only, more groups than rows, weights."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(70,) + row_shape) * 4 + 1e3
    groups = np.r_[rng.integers(0, 5, 40), rng.integers(5, 90, 30)]  # groups >= 5: the second block only
    weights = rng.uniform(0.5, 2.0, 70)
    results = []
    for spend in (False, True):
        for weighted in (False, True):
            state = ns.batchnorm_state("exact", num_groups=90, axes=axes)
            for lo, hi in ((0, 40), (40, 70)):
                state.update(x[lo:hi], groups[lo:hi], weights[lo:hi] if weighted else None)
            results.append(state.result(spend=spend))
    for kept, spent in ((results[0], results[2]), (results[1], results[3])):
        assert sorted(kept.arrays) == sorted(spent.arrays) and kept.meta == spent.meta
        for name in kept.arrays:
            np.testing.assert_array_equal(spent.arrays[name], kept.arrays[name], err_msg=name)
    reduce = (0,) + tuple(range(2, x.ndim)) if axes == "auto" else (0, 2)
    got = results[2]
    for g in (0, 4, 5, 60):
        rows = x[groups == g]
        if not len(rows):
            assert np.isnan(got.arrays["mean"][g]).all() and (got.arrays["count"][g] == 0).all()
            continue
        n = rows.size // got.arrays["mean"][g].size
        np.testing.assert_allclose(got.arrays["mean"][g].reshape(-1), rows.mean(axis=reduce).reshape(-1),
                                   rtol=1e-14)
        assert (got.arrays["count"][g] == n).all()
        if n > 1:
            np.testing.assert_allclose(got.arrays["var"][g].reshape(-1),
                                       rows.var(axis=reduce, ddof=1).reshape(-1), rtol=1e-11)


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".json", ".safetensors"])
def test_the_cli_writes_a_spent_group_result_whole(tmp_path, suffix) -> None:
    rng = np.random.default_rng(10)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    groups = rng.integers(0, 200, 120)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "g.npy", groups)
    out = tmp_path / f"s{suffix}"
    script = Path(sys.executable).with_name("normstats")
    done = subprocess.run([str(script), "fit-bn", str(tmp_path / "x.npy"), "--groups", str(tmp_path / "g.npy"),
                           "--num-groups", "200", "--mode", "exact", "-o", str(out), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stored = ns.read_stats(str(out))
    state = ns.batchnorm_state("exact", num_groups=200)
    want = state.update(x, groups).result()
    for name in ("count", "mean", "var", "inv_std", "mean_low"):
        np.testing.assert_array_equal(stored.arrays[name], want.arrays[name], err_msg=name)
