"""Inference-mode normalization against :func:`tests.reference.ref_apply`.

Statistics come from real fits; the normalized output is checked when
returned by :class:`normstats.Normalizer` and when written by
:func:`normstats.apply_stats` to `.npy` and HDF5 (content, dtype, block-wise
writing, no temporary file left behind).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

import normstats as ns
from tests.reference import N, SHAPES, make_data, ref_apply, write_h5, write_npy


OUTPUT_DTYPES = {
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "int8": "float32",
    "int16": "float32",
    "uint8": "float32",
    "int32": "float64",
    "int64": "float64",
}


def fitted(x, axes="auto", mode="exact", **options):
    """BatchNorm statistics of `x` (ema: alpha 0.3, batches of 3 rows)."""
    if mode == "exact":
        state = ns.BatchNormExact(axes=axes, **options)
    else:
        state = ns.BatchNormEMA(axes=axes, alpha=0.3, batch_size=3, **options)
    return state.update(x).result()


def affine(kind, stats):
    """gamma, beta of one kind, shaped like the statistics where arrays."""
    shape = np.shape(next(iter(v for k, v in stats.arrays.items() if k in ("mean", "inv_std"))))
    rng = np.random.default_rng(3)
    return {
        "default": (1.0, 0.0),
        "scalars": (2.0, -0.5),
        "arrays": (rng.uniform(0.5, 2, shape), rng.uniform(-1, 1, shape)),
        "none": (None, None),
        "gamma-array-beta-scalar": (rng.uniform(0.5, 2, shape), 0.25),
    }[kind]


def expected(x, stats, gamma=1.0, beta=0.0):
    return ref_apply(x.astype(np.float64), stats.arrays.get("mean"), stats.arrays.get("inv_std"),
                     tuple(stats.meta["axes"]), gamma, beta)


def assert_output(actual, wanted, dtype):
    """Compare within the precision of the output dtype."""
    rtol = {"float16": 1e-3, "float32": 1e-5, "float64": 1e-10}[str(np.dtype(dtype))]
    assert actual.shape == wanted.shape
    scale = max(1.0, float(np.max(np.abs(wanted))))
    np.testing.assert_allclose(actual.astype(np.float64), wanted, rtol=rtol, atol=rtol * scale)




def read_output(path, dataset=None):
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    with h5py.File(path, "r") as f:
        return f[dataset or "data"][()]


@pytest.mark.parametrize("kind", ["default", "scalars", "arrays", "none", "gamma-array-beta-scalar"])
@pytest.mark.parametrize("mode", ["exact", "ema"])
@pytest.mark.parametrize("shape, axes", SHAPES)
def test_normalizer_matches_reference(shape, axes, mode, kind):
    x = make_data(shape)
    stats = fitted(x, axes, mode)
    gamma, beta = affine(kind, stats)
    y = ns.Normalizer(stats, gamma=gamma, beta=beta)(x)
    assert y.dtype == np.float64
    assert_output(y, expected(x, stats, gamma, beta), "float64")


@pytest.mark.parametrize("dtype", list(OUTPUT_DTYPES))
def test_normalizer_output_dtype(dtype):
    x = make_data((N, 3, 2), dtype)
    stats = fitted(x)
    y = ns.Normalizer(stats, gamma=1.5, beta=0.5)(x)
    assert y.dtype == np.dtype(OUTPUT_DTYPES[dtype])
    assert_output(y, expected(x, stats, 1.5, 0.5), OUTPUT_DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(OUTPUT_DTYPES))
@pytest.mark.parametrize("fmt", [".npy", ".h5"])
@pytest.mark.parametrize("source", ["npy", "h5"])
def test_apply_stats_writes_output(source, fmt, dtype, tmp_path):
    x = make_data((N, 2, 3), dtype)
    stats = fitted(x)
    gamma, beta = affine("arrays", stats)
    spec = write_npy(tmp_path, x) if source == "npy" else write_h5(tmp_path, x)
    out = str(tmp_path / f"out{fmt}")
    with ns.open_stream([spec]) as stream:
        info = ns.apply_stats(ns.Normalizer(stats, gamma=gamma, beta=beta), stream, out, block_rows=4)
    dataset = "features" if source == "h5" else "data"
    y = read_output(out, dataset)
    assert y.dtype == np.dtype(OUTPUT_DTYPES[dtype])
    assert_output(y, expected(x, stats, gamma, beta), OUTPUT_DTYPES[dtype])
    assert info["rows"] == N


@pytest.mark.parametrize("fmt", [".npy", ".h5"])
def test_apply_stats_writes_in_blocks_and_leaves_no_temporary(fmt, tmp_path):
    x = make_data((N, 3, 2), "float32")
    stats = fitted(x)
    spec = write_npy(tmp_path, x)
    out = str(tmp_path / f"out{fmt}")
    blocks = []
    with ns.open_stream([spec]) as stream:
        ns.apply_stats(ns.Normalizer(stats, gamma=2.0), stream, out, block_rows=3, progress=blocks.append)
    assert blocks == [3, 3, 3, 1]
    assert_output(read_output(out), expected(x, stats, 2.0), "float32")
    assert sorted(os.listdir(tmp_path)) == sorted(["x.npy", f"out{fmt}"])


def test_apply_stats_h5_dataset_named_in_output(tmp_path):
    x = make_data((N, 3))
    stats = fitted(x)
    out = str(tmp_path / "out.h5")
    with ns.open_stream([write_npy(tmp_path, x)]) as stream:
        ns.apply_stats(ns.Normalizer(stats), stream, out + ":normalized")
    assert_output(read_output(out, "normalized"), expected(x, stats), "float64")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("shape, axes", [SHAPES[0], SHAPES[3], SHAPES[6]])
def test_normalizer_from_stats_file(shape, axes, suffix, tmp_path):
    x = make_data(shape)
    stats = fitted(x, axes)
    path = str(tmp_path / f"stats{suffix}")
    ns.write_stats(stats, path)
    y = ns.Normalizer(ns.read_stats(path), beta=1.0)(x)
    assert_output(y, expected(x, stats, beta=1.0), "float64")


DISABLED = [
    pytest.param("ema", {"mean": None}, "mean", id="ema-mean-none"),
    pytest.param("ema", {"inv_std": None}, "inv_std", id="ema-inv_std-none"),
    pytest.param("exact", {"use_mean": False}, "mean", id="exact-mean-none"),
    pytest.param("exact", {"use_inv_std": False}, "inv_std", id="exact-inv_std-none"),
]


@pytest.mark.parametrize("kind", ["default", "scalars", "arrays"])
@pytest.mark.parametrize("mode, options, disabled", DISABLED)
def test_disabled_statistic_drops_its_term(mode, options, disabled, kind, tmp_path):
    x = make_data((N, 3, 2))
    stats = fitted(x, mode=mode, **options)
    assert disabled not in stats.arrays
    gamma, beta = affine(kind, stats)
    wanted = ref_apply(x, None if disabled == "mean" else stats.arrays["mean"],
                       None if disabled == "inv_std" else stats.arrays["inv_std"], "auto", gamma, beta)
    y = ns.Normalizer(stats, gamma=gamma, beta=beta)(x)
    assert_output(y, wanted, "float64")
    out = str(tmp_path / "out.npy")
    with ns.open_stream([write_npy(tmp_path, x)]) as stream:
        ns.apply_stats(ns.Normalizer(stats, gamma=gamma, beta=beta), stream, out)
    assert_output(np.load(out), wanted, "float64")


def test_row_shape_mismatch_in_call():
    stats = fitted(make_data((N, 3, 2)))
    with pytest.raises(ns.DataError):
        ns.Normalizer(stats)(make_data((N, 3, 4)))


@pytest.mark.parametrize("fmt", [".npy", ".h5"])
def test_row_shape_mismatch_in_apply_stats_writes_nothing(fmt, tmp_path):
    stats = fitted(make_data((N, 3, 2)))
    spec = write_npy(tmp_path, make_data((N, 2, 3)))
    out = tmp_path / f"out{fmt}"
    with ns.open_stream([spec]) as stream:
        with pytest.raises(ns.DataError):
            ns.apply_stats(ns.Normalizer(stats), stream, str(out))
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_affine_of_wrong_shape(name):
    stats = fitted(make_data((N, 3, 2)))
    with pytest.raises(ns.DataError):
        ns.Normalizer(stats, **{name: np.ones(4)})
