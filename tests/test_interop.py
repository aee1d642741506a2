"""Statistics into PyTorch, Keras, Kaldi and ESPnet, and back from PyTorch.

Every exported file is read back with the target's own conventions (the
safetensors and numpy loaders, Kaldi's byte layout) and checked against
numpy computed from the data, not against normstats' own arrays; where the
toolkit is installed (torch, keras, kaldiio), the real thing loads it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import normstats as ns
from tests.reference import make_data, ref_apply, ref_bn_ema, ref_bn_exact

EPS = 1e-5


def x4d(rows=37, seed=0):
    """(rows, 3, 4, 5) with distinct channel offsets and scales."""
    x = make_data((rows, 3, 4, 5), seed=seed)
    return x * np.array([1.0, 3.0, 0.2])[:, None, None] + np.array([-2.0, 0.0, 7.0])[:, None, None]


def frames(rows=61, dims=5, seed=1):
    """Features as Kaldi and ESPnet see them: frames x dims."""
    return make_data((rows, dims), seed=seed) * np.linspace(0.5, 4.0, dims) + np.arange(dims) * 10.0


def fit(state, x, **kwargs):
    return state.update(x, **kwargs).result()


def write(stats, tmp_path, name="stats.npz"):
    """`stats` through a file, as the commands see them (source set)."""
    path = str(tmp_path / name)
    ns.write_stats(stats, path)
    return ns.read_stats(path)


def torch_formula(x, tensors, eps, prefix=""):
    """What torch.nn.BatchNorm*d computes in eval mode, written from its documentation."""
    key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var, weight, bias = (tensors[key(n)].astype(np.float64).reshape(shape)
                               for n in ("running_mean", "running_var", "weight", "bias"))
    return (x - mean) / np.sqrt(var + eps) * weight + bias


# --- torch ---------------------------------------------------------------------------------

TORCH_CASES = {
    "ema-4d": (lambda: fit(ns.BatchNormEMA(alpha=0.2, batch_size=8), x4d()), x4d),
    "exact-4d": (lambda: fit(ns.BatchNormExact(), x4d()), x4d),
    "exact-2d-ddof0": (lambda: fit(ns.BatchNormExact(ddof=0), frames()), frames),
    "exact-3d": (lambda: fit(ns.BatchNormExact(), x4d()[:, :, :, 0]), lambda: x4d()[:, :, :, 0]),
    "ema-mean-none": (lambda: fit(ns.BatchNormEMA(mean=None, batch_size=8, alpha=0.3), x4d()), x4d),
    "ema-inv-std-none": (lambda: fit(ns.BatchNormEMA(inv_std=None, batch_size=8, alpha=0.3), x4d()), x4d),
    "exact-eps-0.5": (lambda: fit(ns.BatchNormExact(eps=0.5), x4d()), x4d),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_state_dict_reproduces_apply(case, tmp_path):
    make, data = TORCH_CASES[case]
    stats, x = write(make(), tmp_path), data()
    ns.export_stats(stats, "torch", str(tmp_path / "bn.safetensors"))
    tensors = safetensors.numpy.load_file(tmp_path / "bn.safetensors")
    assert sorted(tensors) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    channels = x.shape[1]
    for name in ("running_mean", "running_var", "weight", "bias"):
        assert tensors[name].dtype == np.float32 and tensors[name].shape == (channels,)
    assert tensors["num_batches_tracked"].dtype == np.int64 and tensors["num_batches_tracked"].shape == ()
    assert tensors["num_batches_tracked"] == stats.meta["batches_seen"]
    np.testing.assert_array_equal(tensors["weight"], 1.0)
    np.testing.assert_array_equal(tensors["bias"], 0.0)
    eps = stats.meta["eps"]
    y = torch_formula(x, tensors, eps)
    expected = ns.Normalizer(stats)(x)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_torch_running_var_is_the_variance(tmp_path):
    """Exact statistics: running_var is the data's variance (ddof 1, as torch's own)."""
    x = x4d()
    ns.export_stats(fit(ns.BatchNormExact(), x), "torch", str(tmp_path / "bn.safetensors"))
    tensors = safetensors.numpy.load_file(tmp_path / "bn.safetensors")
    mean, var, _ = ref_bn_exact(x)
    np.testing.assert_allclose(tensors["running_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(tensors["running_var"], var, rtol=1e-6)


def test_torch_ema_running_var_from_inv_std(tmp_path):
    x = x4d()
    ns.export_stats(fit(ns.BatchNormEMA(alpha=0.2, batch_size=8), x), "torch", str(tmp_path / "bn.safetensors"))
    tensors = safetensors.numpy.load_file(tmp_path / "bn.safetensors")
    mean, inv_std, _, _ = ref_bn_ema(x, batch_size=8, alpha=0.2)
    np.testing.assert_allclose(tensors["running_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(tensors["running_var"], 1 / inv_std**2 - EPS, rtol=1e-6)


def test_torch_disabled_statistics_are_neutral(tmp_path):
    x = x4d()
    ns.export_stats(fit(ns.BatchNormEMA(mean=None, batch_size=8), x), "torch", str(tmp_path / "a.safetensors"))
    ns.export_stats(fit(ns.BatchNormEMA(inv_std=None, batch_size=8), x), "torch", str(tmp_path / "b.safetensors"))
    np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "a.safetensors")["running_mean"], 0.0)
    np.testing.assert_allclose(safetensors.numpy.load_file(tmp_path / "b.safetensors")["running_var"], 1 - EPS)


def test_torch_prefix_gamma_beta_and_layer_eps(tmp_path):
    x = x4d()
    stats = fit(ns.BatchNormExact(), x)
    gamma, beta = np.array([0.5, 2.0, -1.0]), 0.25
    export = ns.export_stats(stats, "torch", str(tmp_path / "bn.safetensors"), prefix="layer1.bn.",
                             eps=1e-3, gamma=gamma, beta=beta)
    tensors = safetensors.numpy.load_file(tmp_path / "bn.safetensors")
    assert sorted(tensors) == sorted(f"layer1.bn.{n}" for n in
                                     ("running_mean", "running_var", "weight", "bias", "num_batches_tracked"))
    np.testing.assert_allclose(tensors["layer1.bn.weight"], gamma)
    np.testing.assert_allclose(tensors["layer1.bn.bias"], beta)
    # with the layer's eps 1e-3, torch still reproduces apply with the fit's eps 1e-5
    y = torch_formula(x, tensors, 1e-3, prefix="layer1.bn")
    _, var, _ = ref_bn_exact(x)
    expected = ref_apply(x, ref_bn_exact(x)[0], 1 / np.sqrt(var + EPS), gamma=gamma, beta=beta)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    with safetensors.safe_open(tmp_path / "bn.safetensors", framework="np") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and float(metadata["eps"]) == 1e-3
    assert json.loads(metadata["normstats"])["row_shape"] == [3, 4, 5]
    assert export.summary.startswith("BatchNorm2d(3, eps=0.001)")


def test_torch_constant_channel_gets_running_var_zero(tmp_path):
    x = x4d()
    x[:, 1] = 4.0
    ns.export_stats(fit(ns.BatchNormExact(), x), "torch", str(tmp_path / "bn.safetensors"))
    running_var = safetensors.numpy.load_file(tmp_path / "bn.safetensors")["running_var"]
    assert running_var[1] == 0.0 and (running_var >= 0).all()


def test_torch_inv_std_beyond_one_over_sqrt_eps_is_refused(tmp_path):
    stats = fit(ns.BatchNormEMA(inv_std=1e4, alpha=0.01, batch_size=8), x4d())
    assert stats.arrays["inv_std"].max() > EPS ** -0.5
    with pytest.raises(ns.StatsFileError, match="above 1/sqrt"):
        ns.export_stats(stats, "torch", str(tmp_path / "bn.safetensors"))
    assert not os.listdir(tmp_path)
    # a layer eps small enough represents it
    ns.export_stats(stats, "torch", str(tmp_path / "bn.safetensors"), eps=1e-12)


REFUSED_BY_TORCH = {
    "centers": lambda: fit(ns.CentersExact(3), frames(), labels=np.arange(61) % 3),
    "groups": lambda: fit(ns.BatchNormExact(num_groups=2), x4d(), groups=np.arange(37) % 2),
    "custom-axes": lambda: fit(ns.BatchNormExact(axes=(0, 1)), x4d()),
    "1d-input": lambda: fit(ns.BatchNormExact(), frames()[:, 0]),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_TORCH))
def test_torch_refuses_what_batchnorm_cannot_hold(case, tmp_path):
    with pytest.raises(ns.StatsFileError):
        ns.export_stats(REFUSED_BY_TORCH[case](), "torch", str(tmp_path / "bn.safetensors"))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_torch_module_in_eval_mode_matches_apply(run, tmp_path, ndim):
    """The real thing: torch.nn.BatchNormNd loads the export and matches `normstats apply`."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    x = make_data((40, 3, 6, 5, 4)[:ndim], dtype="float32", seed=ndim) * 3.0 + 1.5
    np.save(tmp_path / "x.npy", x)
    assert run("fit-bn", "x.npy", "--mode", "exact", "-o", "s.npz").exit_code == 0
    assert run("apply", "s.npz", "x.npy", "-o", "y.npy").exit_code == 0
    assert run("export", "s.npz", "--to", "torch", "-o", "bn.safetensors").exit_code == 0
    layer = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
             5: torch.nn.BatchNorm3d}[ndim](3, eps=EPS).eval()
    layer.load_state_dict(load_file(tmp_path / "bn.safetensors"))
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, np.load(tmp_path / "y.npy"), rtol=1e-6, atol=1e-6)


# --- import ----------------------------------------------------------------------------------


def state_dict(tmp_path, name="model.safetensors", metadata=None):
    """A small model's state dict: two BatchNorm layers and a linear layer."""
    rng = np.random.default_rng(3)
    tensors = {
        "features.1.running_mean": rng.normal(size=4).astype(np.float32),
        "features.1.running_var": rng.uniform(0.5, 2.0, size=4).astype(np.float32),
        "features.1.weight": rng.normal(size=4).astype(np.float32),
        "features.1.bias": rng.normal(size=4).astype(np.float32),
        "features.1.num_batches_tracked": np.array(1234, dtype=np.int64),
        "head.bn.running_mean": np.zeros(2, np.float32),
        "head.bn.running_var": np.ones(2, np.float32),
        "head.linear.weight": np.ones((2, 4), np.float32),
    }
    safetensors.numpy.save_file(tensors, tmp_path / name, metadata=metadata or {"format": "pt"})
    return tensors


def test_import_layer_of_a_model(tmp_path):
    tensors = state_dict(tmp_path)
    stats = ns.import_torch(str(tmp_path / "model.safetensors"), prefix="features.1", eps=1e-3,
                            row_shape=(4, 6, 6))
    np.testing.assert_array_equal(stats.arrays["mean"], tensors["features.1.running_mean"])
    expected = 1 / np.sqrt(tensors["features.1.running_var"].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(stats.arrays["inv_std"], expected, rtol=1e-15)
    meta = stats.meta
    assert (meta["mode"], meta["eps"], meta["axes"], meta["row_shape"]) == ("ema", 1e-3, [0, 2, 3], [4, 6, 6])
    assert meta["batches_seen"] == 1234 and meta["rows_seen"] == 0
    assert meta["imported_from"] == str(tmp_path / "model.safetensors") and meta["imported_layer"] == "features.1"
    # it is an ordinary stats file from here on
    back = write(stats, tmp_path, "imported.json")
    assert back.meta == dict(meta, kind="batchnorm")


def test_import_apply_with_the_layer_weight_and_bias_is_the_layer(run, tmp_path):
    tensors = state_dict(tmp_path)
    x = make_data((20, 4, 3), dtype="float32")
    np.save(tmp_path / "x.npy", x)
    result = run("import", "model.safetensors", "--prefix", "features.1", "--row-shape", "4,3", "-o", "bn.npz")
    assert result.exit_code == 0, result.output
    assert result.stdout == ("import: features.1 (4 channels, eps 1e-05, 1,234 batches) from model.safetensors "
                             "-> bn.npz\n")
    result = run("apply", "bn.npz", "x.npy", "--gamma", "model.safetensors:features.1.weight",
                 "--beta", "model.safetensors:features.1.bias", "-o", "y.npy")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), torch_formula(x, tensors, EPS, "features.1"),
                               rtol=1e-5, atol=1e-5)


def test_import_needs_a_prefix_when_there_are_several_layers(tmp_path):
    state_dict(tmp_path)
    with pytest.raises(ns.UsageError) as raised:
        ns.import_torch(str(tmp_path / "model.safetensors"))
    assert "'features.1', 'head.bn'" in str(raised.value) and "--prefix" in str(raised.value)


@pytest.mark.parametrize("case", ["ema-4d", "exact-2d-ddof0", "exact-eps-0.5"])
def test_export_then_import_gives_the_statistics_back(case, tmp_path):
    stats = write(TORCH_CASES[case][0](), tmp_path)
    ns.export_stats(stats, "torch", str(tmp_path / "bn.safetensors"))
    back = ns.import_torch(str(tmp_path / "bn.safetensors"))  # eps and row shape as recorded
    assert back.meta["eps"] == stats.meta["eps"] and back.meta["row_shape"] == stats.meta["row_shape"]
    assert back.meta["axes"] == stats.meta["axes"] and back.meta["imported_layer"] == ""
    np.testing.assert_allclose(back.arrays["mean"], stats.arrays["mean"], rtol=1e-6)
    np.testing.assert_allclose(back.arrays["inv_std"], stats.arrays["inv_std"], rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ({"running_var": -np.ones(2)}, "running_var of channel 0"),
    ({"running_var": np.ones(3)}, "two float vectors"),
    ({"running_mean": np.zeros((2, 2))}, "two float vectors"),
    ({"running_mean": np.zeros(2, np.int64)}, "two float vectors"),
])
def test_import_refuses_unusable_buffers(bad, match, tmp_path):
    tensors = dict({"running_mean": np.zeros(2), "running_var": np.ones(2)}, **bad)
    safetensors.numpy.save_file(tensors, tmp_path / "bn.safetensors")
    with pytest.raises(ns.StatsFileError, match=match):
        ns.import_torch(str(tmp_path / "bn.safetensors"))


def test_import_of_bfloat16_says_to_save_float32(tmp_path):
    header = json.dumps({name: {"dtype": "BF16", "shape": [2], "data_offsets": [4 * i, 4 * i + 4]}
                         for i, name in enumerate(("running_mean", "running_var"))}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ns.StatsFileError, match="bfloat16.*float32"):
        ns.import_torch(str(tmp_path / "bf16.safetensors"))


# --- Keras -------------------------------------------------------------------------------------

KERAS_CASES = {
    "4d-auto-ema": (lambda x: ns.BatchNormEMA(alpha=0.2, batch_size=8), x4d, (1,)),
    "4d-axes0,2-exact": (lambda x: ns.BatchNormExact(axes=(0, 2)), x4d, (1, 3)),
    "4d-axes0-exact": (lambda x: ns.BatchNormExact(axes=(0,)), x4d, (1, 2, 3)),
    "2d-exact-mean-none": (lambda x: ns.BatchNormExact(use_mean=False), frames, (1,)),
    "1d-scalar": (lambda x: ns.BatchNormExact(), lambda: frames()[:, 0], ()),
}


def keras_formula(x, z):
    """keras.layers.Normalization: (x - mean) / max(sqrt(variance), 1e-7), mean and
    variance reshaped to broadcast along the kept axes (as its build() does)."""
    axis = tuple(z["axis"].tolist())
    shape = [x.shape[d] if d in axis else 1 for d in range(x.ndim)]
    return (x - z["mean"].reshape(shape)) / np.maximum(np.sqrt(z["variance"].reshape(shape)), 1e-7)


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_keras_normalization_reproduces_apply(case, tmp_path):
    state, data, axis = KERAS_CASES[case]
    x = data()
    stats = write(fit(state(x), x), tmp_path)
    ns.export_stats(stats, "keras", str(tmp_path / "keras.npz"))
    with np.load(tmp_path / "keras.npz") as archive:
        z = {name: archive[name] for name in archive.files}
    assert sorted(z) == ["axis", "mean", "variance"]
    assert tuple(z["axis"].tolist()) == axis
    np.testing.assert_allclose(keras_formula(x, z), ns.Normalizer(stats)(x), rtol=1e-12, atol=1e-12)


def test_keras_variance_of_exact_statistics_is_var_plus_eps(tmp_path):
    x = x4d()
    ns.export_stats(fit(ns.BatchNormExact(axes=(0, 2)), x), "keras", str(tmp_path / "keras.npz"))
    _, var, _ = ref_bn_exact(x, axes=(0, 2))
    np.testing.assert_allclose(np.load(tmp_path / "keras.npz")["variance"], var + EPS, rtol=1e-12)


# Keras' torch backend converts tensors in a way numpy 2 deprecates; that is Keras' business.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")
def test_keras_layer_matches_apply(tmp_path):
    """The real thing, where Keras and a backend are installed."""
    keras = pytest.importorskip("keras")  # on the torch backend where torch is installed (conftest)
    x = x4d().astype(np.float32)
    stats = fit(ns.BatchNormExact(axes=(0, 2)), x)
    ns.export_stats(stats, "keras", str(tmp_path / "keras.npz"))
    z = np.load(tmp_path / "keras.npz")
    layer = keras.layers.Normalization(axis=tuple(z["axis"].tolist()), mean=z["mean"], variance=z["variance"])
    y = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(y, ns.Normalizer(stats)(x), rtol=1e-5, atol=1e-5)


# --- Kaldi --------------------------------------------------------------------------------------


def parse_kaldi_matrix(data: bytes, at: int = 0) -> tuple[np.ndarray, int]:
    """One binary double matrix at `at`, by Kaldi's documented layout; returns it and its end."""
    assert data[at:at + 2] == b"\0B", "binary-mode marker"
    assert data[at + 2:at + 5] == b"DM ", "token of a double matrix"
    assert data[at + 5] == 4 and data[at + 10] == 4, "int32 size markers"
    rows, cols = struct.unpack("<i", data[at + 6:at + 10])[0], struct.unpack("<i", data[at + 11:at + 15])[0]
    end = at + 15 + rows * cols * 8
    return np.frombuffer(data[at + 15:end], dtype="<f8").reshape(rows, cols), end


def parse_kaldi_ark(data: bytes) -> dict[str, np.ndarray]:
    entries, at = {}, 0
    while at < len(data):
        space = data.index(b" ", at)
        entries[data[at:space].decode()], at = parse_kaldi_matrix(data, space + 1)
    return entries


def kaldi_apply_cmvn(x, stats):
    """apply-cmvn --norm-vars=true, from Kaldi's transform/cmvn.cc ApplyCmvn."""
    dim = stats.shape[1] - 1
    count = stats[0, dim]
    mean = stats[0, :dim] / count
    var = np.maximum(stats[1, :dim] / count - mean * mean, 1e-20)
    return (x - mean) / np.sqrt(var)


@pytest.mark.parametrize("ddof", [0, 1])
def test_kaldi_matrix_bytes_and_sums(tmp_path, ddof):
    x = frames()
    ns.export_stats(fit(ns.BatchNormExact(ddof=ddof), x), "kaldi", str(tmp_path / "cmvn.mat"))
    data = (tmp_path / "cmvn.mat").read_bytes()
    assert data[:15] == b"\0BDM \x04" + struct.pack("<i", 2) + b"\x04" + struct.pack("<i", 6)
    matrix, end = parse_kaldi_matrix(data)
    assert end == len(data) == 15 + 2 * 6 * 8
    np.testing.assert_allclose(matrix[0, :5], x.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(matrix[1, :5], (x * x).sum(axis=0), rtol=1e-12)
    assert (matrix[0, 5], matrix[1, 5]) == (61.0, 0.0)
    population = (x - x.mean(axis=0)) / x.std(axis=0)  # what apply-cmvn should compute
    np.testing.assert_allclose(kaldi_apply_cmvn(x, matrix), population, rtol=1e-9, atol=1e-9)


def test_kaldi_weighted_count_is_the_weight_sum(tmp_path):
    x, w = frames(), np.linspace(0.0, 2.0, 61)
    ns.export_stats(fit(ns.BatchNormExact(), x, weights=w), "kaldi", str(tmp_path / "cmvn.cmvn"))
    matrix, _ = parse_kaldi_matrix((tmp_path / "cmvn.cmvn").read_bytes())
    np.testing.assert_allclose(matrix[0, :5], w @ x, rtol=1e-12)
    np.testing.assert_allclose(matrix[1, :5], w @ (x * x), rtol=1e-12)
    np.testing.assert_allclose(matrix[0, 5], w.sum(), rtol=1e-15)


def test_kaldi_per_group_archive(tmp_path):
    x = frames()
    groups = np.arange(61) % 4
    groups[groups == 2] = 0  # group 2 has no rows: left out of the archive
    export = ns.export_stats(fit(ns.BatchNormExact(num_groups=4), x, groups=groups), "kaldi",
                             str(tmp_path / "cmvn.ark"))
    entries = parse_kaldi_ark((tmp_path / "cmvn.ark").read_bytes())
    assert list(entries) == ["group0", "group1", "group3"]
    for key, matrix in entries.items():
        rows = x[groups == int(key[5:])]
        np.testing.assert_allclose(matrix[0], np.r_[rows.sum(axis=0), len(rows)], rtol=1e-12)
        np.testing.assert_allclose(matrix[1], np.r_[(rows * rows).sum(axis=0), 0.0], rtol=1e-12)
    assert "1 without rows left out" in export.summary


def test_kaldiio_reads_the_matrix_and_the_archive(tmp_path):
    kaldiio = pytest.importorskip("kaldiio")
    x = frames()
    ns.export_stats(fit(ns.BatchNormExact(), x), "kaldi", str(tmp_path / "cmvn.mat"))
    matrix = kaldiio.load_mat(str(tmp_path / "cmvn.mat"))
    np.testing.assert_allclose(matrix[0], np.r_[x.sum(axis=0), 61], rtol=1e-12)
    groups = np.arange(61) % 2
    ns.export_stats(fit(ns.BatchNormExact(num_groups=2), x, groups=groups), "kaldi", str(tmp_path / "g.ark"))
    archive = dict(kaldiio.load_ark(str(tmp_path / "g.ark")))
    np.testing.assert_allclose(archive["group1"][1, :5], (x[1::2] ** 2).sum(axis=0), rtol=1e-12)


# --- ESPnet -------------------------------------------------------------------------------------


def global_mvn(z):
    """ESPnet2's GlobalMVN statistics (espnet2/layers/global_mvn.py)."""
    mean = z["sum"] / z["count"]
    return mean, z["sum_square"] / z["count"] - mean * mean


@pytest.mark.parametrize("ddof", [0, 1])
def test_espnet_stats_reproduce_the_population_statistics(tmp_path, ddof):
    x = frames()
    ns.export_stats(fit(ns.BatchNormExact(ddof=ddof), x), "espnet", str(tmp_path / "feats_stats.npz"))
    with np.load(tmp_path / "feats_stats.npz") as z:
        assert sorted(z.files) == ["count", "sum", "sum_square"]
        assert z["count"].shape == () and z["count"].dtype == np.int64 and z["count"] == 61
        mean, var = global_mvn(z)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-9)  # population variance, whatever the ddof


def test_espnet_utterances_frames_dims(tmp_path):
    x = make_data((7, 9, 4), seed=4) + 3.0  # (utterances, frames, dims)
    ns.export_stats(fit(ns.BatchNormExact(axes=(0, 1)), x), "espnet", str(tmp_path / "feats_stats.npz"))
    mean, var = global_mvn(np.load(tmp_path / "feats_stats.npz"))
    np.testing.assert_allclose(mean, x.reshape(-1, 4).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, x.reshape(-1, 4).var(axis=0), rtol=1e-9)


def test_espnet_shards_sum_like_aggregate_stats_dirs(tmp_path):
    """aggregate_stats_dirs.py adds every entry of the shards' files: that equals the merged export."""
    x = frames(rows=80)
    for name, part in (("a", x[:30]), ("b", x[30:]), ("all", x)):
        ns.export_stats(fit(ns.BatchNormExact(), part), "espnet", str(tmp_path / f"{name}.npz"))
    a, b, whole = (np.load(tmp_path / f"{n}.npz") for n in ("a", "b", "all"))
    for key in ("count", "sum", "sum_square"):
        np.testing.assert_allclose(a[key] + b[key], whole[key], rtol=1e-12)


# --- what a target cannot hold ------------------------------------------------------------------

REFUSED = {
    ("kaldi", "ema"): lambda: fit(ns.BatchNormEMA(batch_size=8), frames()),
    ("kaldi", "images-channel-axis"): lambda: fit(ns.BatchNormExact(), x4d()),
    ("kaldi", "two-feature-axes"): lambda: fit(ns.BatchNormExact(axes=(0,)), x4d()),
    ("kaldi", "centers"): lambda: fit(ns.CentersExact(3), frames(), labels=np.arange(61) % 3),
    ("espnet", "ema"): lambda: fit(ns.BatchNormEMA(batch_size=8), frames()),
    ("espnet", "groups"): lambda: fit(ns.BatchNormExact(num_groups=2), frames(), groups=np.arange(61) % 2),
    ("espnet", "images-channel-axis"): lambda: fit(ns.BatchNormExact(), x4d()),
    ("keras", "groups"): lambda: fit(ns.BatchNormExact(num_groups=2), frames(), groups=np.arange(61) % 2),
    ("keras", "centers"): lambda: fit(ns.CentersEMA(3, batch_size=8), frames(), labels=np.arange(61) % 3),
}


def _with_nan(x):
    x = x.copy()
    x[5, 2] = np.nan
    return x


REFUSED.update({
    ("kaldi", "nan-omitted"): lambda: fit(ns.BatchNormExact(nan_policy="omit"), _with_nan(frames())),
    ("espnet", "nan-omitted"): lambda: fit(ns.BatchNormExact(nan_policy="omit"), _with_nan(frames())),
})


@pytest.mark.parametrize("target, case", sorted(REFUSED))
def test_targets_refuse_what_they_cannot_hold(target, case, tmp_path):
    suffix = {"kaldi": ".cmvn", "espnet": ".npz", "keras": ".npz"}[target]
    with pytest.raises(ns.StatsFileError):
        ns.export_stats(REFUSED[(target, case)](), target, str(tmp_path / f"out{suffix}"))
    assert not os.listdir(tmp_path)


def test_kaldi_single_matrix_and_archive_are_told_apart(tmp_path):
    plain = fit(ns.BatchNormExact(), frames())
    grouped = fit(ns.BatchNormExact(num_groups=2), frames(), groups=np.arange(61) % 2)
    with pytest.raises(ns.UsageError, match="cmvn.ark"):
        ns.export_stats(grouped, "kaldi", str(tmp_path / "cmvn.mat"))
    assert not os.listdir(tmp_path)
    # a global matrix goes to an archive too, as its one entry (issue 13)
    ns.export_stats(plain, "kaldi", str(tmp_path / "cmvn.ark"))
    assert list(parse_kaldi_ark((tmp_path / "cmvn.ark").read_bytes())) == ["global"]


# --- the commands -------------------------------------------------------------------------------


@pytest.mark.parametrize("target, output, summary", [
    ("torch", "bn.safetensors", "export torch: BatchNorm2d(3, eps=1e-05) state dict, 5 tensors -> bn.safetensors"),
    ("keras", "k.npz", "export keras: Normalization(axis=(1,)), mean/variance (3,) -> k.npz"),
])
def test_export_command(run, tmp_path, target, output, summary):
    np.save(tmp_path / "x.npy", x4d())
    assert run("fit-bn", "x.npy", "-o", "s.json", "--mode", "exact").exit_code == 0
    result = run("export", "s.json", "--to", target, "-o", output)
    assert result.exit_code == 0, result.output
    assert result.stdout == summary + "\n" and result.stderr == ""
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == sorted(["x.npy", "s.json", output])


def test_export_kaldi_and_espnet_commands(run, tmp_path):
    np.save(tmp_path / "x.npy", frames())
    assert run("fit-bn", "x.npy", "-o", "s.safetensors", "--mode", "exact").exit_code == 0
    result = run("export", "s.safetensors", "--to", "kaldi", "-o", "cmvn.mat")
    assert result.stdout == "export kaldi: CMVN stats 2 x 6 (5 dims, count 61) -> cmvn.mat\n", result.output
    result = run("export", "s.safetensors", "--to", "espnet", "-o", "feats_stats.npz")
    assert result.stdout == "export espnet: GlobalMVN stats (5,), count 61 -> feats_stats.npz\n", result.output
    result = run("export", "s.safetensors", "--to", "espnet", "-o", "feats_stats.npz")
    assert result.exit_code == 2 and "--force" in result.stderr
