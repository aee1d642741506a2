"""``normstats inspect --plot``: real PNG files of stats and centers, read back, and the
message when matplotlib is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import normstats as ns
import normstats.plots
from normstats.errors import UsageError

matplotlib_image = pytest.importorskip("matplotlib.image")


def read_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib_image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 300 <= image.shape[0] <= 1200 and 600 <= image.shape[1] <= 1600, image.shape
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    return image


def titles(figure) -> str:
    texts = [ax.get_title() for ax in figure.axes] + [ax.get_xlabel() for ax in figure.axes]
    return " | ".join(texts + [figure._suptitle.get_text()])


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(40, 3, 4, 5)) * [[[1.0]], [[2.0]], [[0.5]]]).astype(np.float32)


def _named(stats, name):
    stats.source = name
    return stats


# --- the CLI writes a PNG ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stats", "centers"])
def test_inspect_plot_writes_a_png(run, tmp_path, images, kind):
    x = images.reshape(40, -1)
    if kind == "stats":
        stats = ns.BatchNormExact().update(images).result()
    else:
        stats = ns.CentersExact(5).update(x, np.arange(40) % 4).result()  # class 4 is empty
    ns.write_stats(stats, str(tmp_path / "in.npz"))
    result = run("inspect", tmp_path / "in.npz", "--plot", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        {"stats": "inspect batchnorm: mean and std of 3 channels -> ",
         "centers": "inspect centers: class counts and distances of 5 centers -> "}[kind] + str(tmp_path / "out.png")]
    read_png(tmp_path / "out.png")


@pytest.mark.parametrize("args, message", [
    (["--json"], "--json and --plot exclude each other"),
    (["--force"], None),
])
def test_inspect_plot_options(run, tmp_path, images, args, message):
    ns.write_stats(ns.BatchNormExact().update(images).result(), str(tmp_path / "in.npz"))
    (tmp_path / "out.png").write_bytes(b"old")
    result = run("inspect", tmp_path / "in.npz", "--plot", tmp_path / "out.png", *args)
    if message:
        assert result.exit_code == 2 and message in result.stderr
        assert (tmp_path / "out.png").read_bytes() == b"old"
    else:
        assert result.exit_code == 0
        read_png(tmp_path / "out.png")


@pytest.mark.parametrize("output, message", [("out.png", "exists; pass --force"), ("out.jpg", ".png")])
def test_inspect_plot_refuses_outputs(run, tmp_path, images, output, message):
    ns.write_stats(ns.BatchNormExact().update(images).result(), str(tmp_path / "in.npz"))
    (tmp_path / "out.png").write_bytes(b"old")
    result = run("inspect", tmp_path / "in.npz", "--plot", tmp_path / output)
    assert result.exit_code == 2 and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "out.png"]


def test_without_matplotlib_the_error_says_how_to_install_it(run, tmp_path, images, monkeypatch):
    ns.write_stats(ns.BatchNormExact().update(images).result(), str(tmp_path / "in.npz"))
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    result = run("inspect", tmp_path / "in.npz", "--plot", tmp_path / "out.png")
    assert result.exit_code == 2
    assert result.stderr == "Error: --plot needs matplotlib: pip install 'normstats[plot]'\n"
    assert result.stdout == ""
    assert not (tmp_path / "out.png").exists()
    assert run("inspect", tmp_path / "in.npz").exit_code == 0  # the text summary needs no matplotlib
    with pytest.raises(UsageError):
        normstats.plots.draw(ns.read_stats(str(tmp_path / "in.npz")))


# --- what is drawn ---------------------------------------------------------------------------


@pytest.mark.parametrize("options, panels, label", [
    ({}, 2, "channel"),
    ({"use_mean": False}, 1, "channel"),
    ({"use_inv_std": False}, 1, "channel"),
    ({"axes": (0,)}, 2, "input axes 1, 2, 3 of shape (3, 4, 5), flattened"),
    ({"axes": (0, 1, 3)}, 2, "input axis 2"),
])
def test_batchnorm_variants(tmp_path, images, options, panels, label):
    stats = _named(ns.BatchNormExact(**options).update(images).result(), "s.npz")
    figure, what = normstats.plots.draw(stats)
    assert len(figure.axes) == panels
    assert label in titles(figure)
    if not options.get("use_mean", True):
        assert "mean not fitted" in titles(figure) and what.startswith("std of")
    if not options.get("use_inv_std", True):
        assert "inv_std not fitted" in titles(figure) and what.startswith("mean of")
    figure.savefig(tmp_path / "x.png")
    read_png(tmp_path / "x.png")


def test_batchnorm_std_is_one_over_inv_std(images):
    stats = ns.BatchNormExact().update(images).result()
    figure, _ = normstats.plots.draw(stats)
    std_line = figure.axes[1].get_lines()[0]
    np.testing.assert_allclose(std_line.get_ydata(), 1 / stats.arrays["inv_std"])
    np.testing.assert_allclose(std_line.get_ydata(), np.sqrt(images.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
                                                             + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("groups, shown", [(3, 3), (12, normstats.plots.SERIES_LIMIT)])
def test_per_group_stats_draw_one_line_per_group(images, groups, shown):
    rows = np.arange(40) % groups
    stats = _named(ns.BatchNormExact(num_groups=groups).update(images, groups=rows).result(), "g.npz")
    figure, _ = normstats.plots.draw(stats)
    assert len(figure.axes[0].get_lines()) == shown
    assert f"{groups} groups" in titles(figure)
    assert ("first" in titles(figure)) == (shown < groups)


def test_centers_mark_empty_classes(tmp_path):
    x = np.random.default_rng(1).normal(size=(60, 4))
    stats = _named(ns.CentersExact(8).update(x, np.arange(60) % 6).result(), "c.npz")  # 6, 7 empty
    figure, _ = normstats.plots.draw(stats)
    counts_axes, matrix_axes = figure.axes[:2]
    assert "2 of 8 empty" in counts_axes.get_title()
    marks = counts_axes.get_lines()[0]
    np.testing.assert_array_equal(marks.get_xdata(), [6, 7])
    matrix = matrix_axes.get_images()[0].get_array()
    assert matrix.shape == (8, 8) and matrix.mask[6:].all() and not matrix.mask[:6, :6].any()
    expected = np.linalg.norm(stats.arrays["centers"][:6, None] - stats.arrays["centers"][None, :6], axis=2)
    np.testing.assert_allclose(matrix[:6, :6], expected, atol=1e-6)
    assert "gray: empty classes" in matrix_axes.get_title()


def test_many_centers_are_subsampled_and_counts_histogrammed(tmp_path, monkeypatch):
    monkeypatch.setattr(normstats.plots, "MATRIX_LIMIT", 50)
    K = 700
    x = np.random.default_rng(2).normal(size=(3000, 3))
    labels = np.arange(3000) % (K - 100)  # the last 100 classes are empty
    stats = _named(ns.CentersExact(K).update(x, labels).result(), "many.npz")
    figure, what = normstats.plots.draw(stats)
    counts_axes, matrix_axes = figure.axes[:2]
    assert "histogram over 700 classes (100 empty)" in counts_axes.get_title()
    assert matrix_axes.get_images()[0].get_array().shape == (50, 50)
    assert "50 of 700 classes, evenly spaced" in matrix_axes.get_title()
    assert what == "class counts and distances of 700 centers"
    figure.savefig(tmp_path / "many.png")
    read_png(tmp_path / "many.png")
