"""apply's compiled pass (Normalizer._fused): the very numbers of the NumPy formula, for
every layout and dtype it takes, and the same errors for outputs that are not finite."""

from __future__ import annotations

import numpy as np
import pytest

from normstats.normalize import Normalizer
from normstats.errors import RowError
from normstats.stats import Stats


def _stats(shape, axes, seed=0, **arrays):
    rng = np.random.default_rng(seed)
    kept = tuple(n for a, n in enumerate(shape) if a not in axes)
    values = {"mean": rng.normal(size=kept) * 3, "inv_std": rng.uniform(0.5, 2.0, size=kept)}
    values.update(arrays)
    return Stats("batchnorm", {k: v for k, v in values.items() if v is not None},
                 {"mode": "exact", "axes": list(axes), "row_shape": list(shape[1:])})


@pytest.mark.parametrize("shape, axes", [((60, 7), (0,)), ((40, 3, 4, 5), (0, 2, 3)), ((30, 3, 4), (0, 2)),
                                         ((20, 4, 6), (0, 1))])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16"])
@pytest.mark.parametrize("affine", [{}, {"gamma": 2.5, "beta": -0.5}, {"gamma": None, "beta": None}])
def test_fused_pass_equals_the_numpy_formula_to_the_bit(shape, axes, dtype, affine):
    x = (np.random.default_rng(1).normal(size=shape) * 20).astype(dtype)
    stats = _stats(shape, axes)
    fused = Normalizer(stats, **affine)
    assert fused._fused(x, np.promote_types(fused.result_dtype(x.dtype), np.float32)) is not None
    plain = Normalizer(stats, **affine)
    plain._fused = lambda *args: None
    got, expected = fused(x), plain(x)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    mean = stats.arrays["mean"].reshape([n if a not in axes else 1 for a, n in enumerate(shape)][1:])
    scale = stats.arrays["inv_std"].reshape(mean.shape) * affine.get("gamma", 1.0) if affine.get("gamma", 1) \
        is not None else stats.arrays["inv_std"].reshape(mean.shape)
    reference = (x.astype(np.float64) - mean) * scale + (affine.get("beta", 0.0) or 0.0)
    np.testing.assert_allclose(got, reference, rtol=2e-6 if got.dtype == np.float32 else 1e-12, atol=1e-5)


def test_a_mean_dropped_and_float16_output_keep_their_paths():
    x = np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32)
    stats = _stats((50, 4), (0,), mean=None)
    np.testing.assert_allclose(Normalizer(stats)(x), x * stats.arrays["inv_std"], rtol=1e-6)
    half = Normalizer(_stats((50, 4), (0,)), dtype="float16")(x)
    assert half.dtype == np.float16


def test_outputs_that_overflow_or_meet_an_undefined_statistic_still_name_the_row():
    x = np.ones((100, 3), np.float32)
    x[37, 1] = 3e38
    stats = _stats((100, 3), (0,), mean=np.array([-3e38, 0.0, 0.0]), inv_std=np.array([1.0, 4.0, 1.0]))
    with pytest.raises(RowError, match="row 37"):
        Normalizer(stats)(x)
    y = x.copy()
    y[37, 1] = np.nan  # NaN input stays NaN, no error
    out = Normalizer(_stats((100, 3), (0,)))(y)
    assert np.isnan(out[37, 1]) and np.isfinite(np.delete(out.reshape(-1), 37 * 3 + 1)).all()
