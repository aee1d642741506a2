"""--reference: each reference layer's settings, against the layer's rule written out here.

The BatchNorm reference is the layers' training step in NumPy (batch mean,
``1 / sqrt(var(ddof) + eps)``, both averaged with weight alpha); the Center
reference their per-row update from the batch's starting centers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import normstats as ns
from normstats.references import REFERENCES, reference, with_reference

K = 4


def layer_batchnorm(x, batch_size, *, eps, alpha, ddof):
    """Running mean and inv_std of the BatchNorm layers (mean 0, inv_std 1 to start)."""
    mean, inv_std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size].astype(np.float64)
        if len(batch) <= ddof:
            continue
        mean = (1 - alpha) * mean + alpha * batch.mean(axis=0)
        inv_std = (1 - alpha) * inv_std + alpha / np.sqrt(batch.var(axis=0, ddof=ddof) + eps)
    return mean, inv_std


def layer_center(x, labels, batch_size, layer_alpha, *, pytorch_ext):
    """The Center layers' update with the layer's own alpha: Pytorch_Ext adds
    (alpha - 1) (C[label] - f) per row, Dandelion alpha (f - C[label])."""
    centers = np.zeros((K, x.shape[1]))
    for start in range(0, len(x), batch_size):
        old = centers.copy()
        for f, label in zip(x[start:start + batch_size].astype(np.float64), labels[start:start + batch_size]):
            step = (layer_alpha - 1.0) * (old[label] - f) if pytorch_ext else layer_alpha * (f - old[label])
            centers[label] += step
    return centers


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(150, 5)) * [1.0, 3.0, 0.2, 5.0, 1.0] + [0.0, 4.0, -1.0, 2.0, 9.0]).astype(np.float32)
    labels = rng.integers(0, K, 150)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "l.npy", labels)
    return tmp_path, x, labels


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def load(path):
    stats = ns.read_stats(str(path))
    return stats.arrays, stats.meta


LAYER_BN = {  # as the layers' source code has them
    "pytorch-ext": dict(eps=1e-5, alpha=0.01, ddof=1),
    "pytorch-ext-0.8": dict(eps=1e-5, alpha=0.1, ddof=1),
    "dandelion": dict(eps=1e-4, alpha=0.1, ddof=0),
}
LAYER_CENTER = {"pytorch-ext": (0.9, True), "pytorch-ext-0.8": (0.9, True), "dandelion": (0.1, False)}


@pytest.mark.parametrize("name", list(LAYER_BN))
def test_fit_bn_reference_equals_the_layer(run, files, name):
    folder, x, _ = files
    ok(run("fit-bn", "x.npy", "--reference", name, "--batch-size", 16, "-o", "bn.npz", "-q"))
    arrays, meta = load(folder / "bn.npz")
    mean, inv_std = layer_batchnorm(x, 16, **LAYER_BN[name])
    close(arrays["mean"], mean)
    close(arrays["inv_std"], inv_std)
    assert meta["reference"] == name
    assert {key: meta[key] for key in ("eps", "alpha", "ddof")} == LAYER_BN[name]


@pytest.mark.parametrize("name", list(LAYER_CENTER))
def test_fit_centers_reference_equals_the_layer(run, files, name):
    folder, x, labels = files
    ok(run("fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", K, "--init", "zeros", "--reference", name,
           "--batch-size", 8, "-o", "c.npz", "-q"))
    arrays, meta = load(folder / "c.npz")
    layer_alpha, pytorch_ext = LAYER_CENTER[name]
    close(arrays["centers"], layer_center(x, labels, 8, layer_alpha, pytorch_ext=pytorch_ext))
    assert meta["reference"] == name and meta["rule"] == "per-sample" and meta["alpha"] == pytest.approx(0.1)


def test_explicit_options_win_over_the_reference(run, files):
    folder, x, labels = files
    ok(run("fit-bn", "x.npy", "--reference", "dandelion", "--eps", 1e-3, "--batch-size", 16, "-o", "bn.npz", "-q"))
    arrays, meta = load(folder / "bn.npz")
    close(arrays["inv_std"], layer_batchnorm(x, 16, eps=1e-3, alpha=0.1, ddof=0)[1])
    assert (meta["eps"], meta["alpha"], meta["ddof"]) == (1e-3, 0.1, 0)
    ok(run("fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", K, "--init", "zeros", "--batch-size", 8,
           "--reference", "dandelion", "--rule", "batch-mean", "-o", "c.npz", "-q"))
    arrays, meta = load(folder / "c.npz")
    assert meta["rule"] == "batch-mean" and meta["alpha"] == 0.1 and meta["reference"] == "dandelion"
    close(arrays["centers"], ns.CentersEMA(K, alpha=0.1, init="zeros", batch_size=8)
          .update(x, labels).result().arrays["centers"])


def test_exact_batchnorm_takes_eps_and_ddof(run, files):
    folder, x, _ = files
    ok(run("fit-bn", "x.npy", "--mode", "exact", "--reference", "dandelion", "-o", "bn.npz", "-q"))
    arrays, meta = load(folder / "bn.npz")
    close(arrays["inv_std"], 1 / np.sqrt(x.astype(np.float64).var(axis=0) + 1e-4))
    assert meta["ddof"] == 0 and meta["eps"] == 1e-4 and "alpha" not in meta


def test_exact_centers_refuse_a_reference(run, files):
    folder, _, _ = files
    result = run("fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", K, "--mode", "exact",
                 "--reference", "dandelion", "-o", "c.npz")
    assert result.exit_code == 2 and "Error: --reference applies to --mode ema only" in result.stderr
    assert not (folder / "c.npz").exists()


def test_a_continued_fit_takes_the_reference_as_given(run, files):
    """--init FILE keeps the file's options unless given: --reference counts as given."""
    folder, x, _ = files
    np.save(folder / "a.npy", x[:64])
    np.save(folder / "b.npy", x[64:])
    ok(run("fit-bn", "a.npy", "--batch-size", 16, "-o", "a.npz", "-q"))  # eps 1e-5, alpha 0.01, ddof 1
    ok(run("fit-bn", "b.npy", "--init", "a.npz", "-o", "kept.npz", "-q"))
    ok(run("fit-bn", "b.npy", "--init", "a.npz", "--reference", "dandelion", "-o", "switched.npz", "-q"))
    _, kept = load(folder / "kept.npz")
    arrays, switched = load(folder / "switched.npz")
    assert (kept["eps"], kept["alpha"], kept["ddof"]) == (1e-5, 0.01, 1) and "reference" not in kept
    assert (switched["eps"], switched["alpha"], switched["ddof"]) == (1e-4, 0.1, 0)
    start = ns.read_stats(str(folder / "a.npz"))
    mean, inv_std = start.arrays["mean"].astype(np.float64), start.arrays["inv_std"].astype(np.float64)
    for begin in range(64, 150, 16):
        batch = x[begin:begin + 16].astype(np.float64)
        mean = 0.9 * mean + 0.1 * batch.mean(axis=0)
        inv_std = 0.9 * inv_std + 0.1 / np.sqrt(batch.var(axis=0) + 1e-4)
    close(arrays["mean"], mean)
    close(arrays["inv_std"], inv_std)


def test_inspect_shows_the_reference(run, files):
    ok(run("fit-bn", "x.npy", "--reference", "pytorch-ext-0.8", "-o", "bn.npz", "-q"))
    text = ok(run("inspect", "bn.npz")).stdout
    assert any(line.split() == ["reference", "pytorch-ext-0.8"] for line in text.splitlines())
    assert json.loads(ok(run("inspect", "bn.npz", "--json")).stdout)["options"]["reference"] == "pytorch-ext-0.8"


def test_an_unknown_reference_is_refused(run, files):
    folder, _, _ = files
    result = run("fit-bn", "x.npy", "--reference", "keras", "-o", "bn.npz")
    assert result.exit_code == 2 and "keras" in result.stderr and "dandelion" in result.stderr
    assert not (folder / "bn.npz").exists()
    with pytest.raises(ns.UsageError, match="unknown reference 'keras'; known references: pytorch-ext, "):
        reference("keras")


@pytest.mark.parametrize("command, kind", [("fit-bn", "batchnorm"), ("fit-centers", "centers")])
def test_help_lists_what_each_reference_sets(run, command, kind):
    text = " ".join(ok(run(command, "--help")).stdout.split())
    for ref in REFERENCES.values():
        assert f"{ref.name}: {ref.summary(kind)}" in text


def test_the_table_in_library_terms():
    assert with_reference("pytorch-ext", "centers", {"alpha": 0.5, "rule": "batch-mean"}, {"alpha"}) == {
        "alpha": 0.5, "rule": "per-sample"}
    assert reference("dandelion").options("batchnorm") == {"eps": 1e-4, "alpha": 0.1, "ddof": 0}
    with pytest.raises(TypeError):
        REFERENCES["dandelion"].settings["batchnorm"]["eps"] = 1.0  # one table, read-only
