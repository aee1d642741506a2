"""Pictures of a stats or centers file (``normstats inspect --plot``).

matplotlib is optional (``pip install 'normstats[plot]'``) and imported only
here, only when a plot is asked for. Figures are drawn on matplotlib's Agg
canvas directly, without pyplot, so a caller's interactive backend and global
figure state are left alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UsageError
from .inspection import center_distances
from .stats import BATCHNORM, Stats
from .writers.atomic import atomic_path

PLOT_FORMATS = (".png",)
SERIES_LIMIT = 10  # groups drawn as their own lines; more would be unreadable
ERRORBAR_LIMIT = 64  # channels drawn with error bars; more as a band
BAR_LIMIT = 100  # classes drawn as one bar each; more as a histogram of counts
MATRIX_LIMIT = 200  # centers in the distance matrix; more are subsampled evenly
DPI = 100


def _figure_class() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'normstats[plot]'") from None
    return Figure, FigureCanvasAgg


def draw(stats: Stats) -> tuple[Any, str]:
    """The matplotlib Figure of `stats` (on an Agg canvas), and what it shows.

    BatchNorm statistics: per channel the mean with ± std (std = 1/inv_std =
    sqrt(var + eps)) and the std alone (log axis when it spans a decade);
    multi-dimensional statistics are flattened in C order, per-group ones
    drawn one line per group (the first SERIES_LIMIT), a statistic fitted as
    'none' is left out. Centers: the rows per class (empty classes marked; a
    histogram past BAR_LIMIT classes) and the matrix of distances between
    centers (empty classes gray; evenly subsampled past MATRIX_LIMIT classes,
    as its title says).

    Raises
    ------
    UsageError
        matplotlib is not installed.
    """
    figure_class, canvas_class = _figure_class()
    if stats.kind == BATCHNORM:
        figure, what = _batchnorm_figure(figure_class, stats)
    else:
        figure, what = _centers_figure(figure_class, stats)
    canvas_class(figure)
    return figure, what


def plot_stats(stats: Stats, path: str) -> str:
    """Draw `stats` (see :func:`draw`) to the PNG file `path`, atomically; return what it shows."""
    figure, what = draw(stats)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return what


def _title(stats: Stats) -> str:
    meta = stats.meta
    return f"{stats.source or 'statistics'}: {meta['mode']}, {meta['rows_seen']:,} rows"


# --- BatchNorm -----------------------------------------------------------------------------


def _channel_axis(stats: Stats, kept: tuple[int, ...]) -> str:
    """Label of the flattened statistics axis: which input axes it runs over."""
    meta = stats.meta
    ndim = len(meta["row_shape"]) + 1
    axes = [a for a in range(1, ndim) if a not in meta["axes"]]
    if len(kept) == 1:
        return "channel" if axes == [1] else f"input axis {axes[0]}"
    return f"input axes {', '.join(map(str, axes))} of shape {kept}, flattened (C order)"


def _batchnorm_figure(figure_class: Any, stats: Stats) -> tuple[Any, str]:
    arrays, meta = stats.arrays, stats.meta
    groups = meta.get("groups")
    mean = arrays.get("mean")
    std = None
    if "inv_std" in arrays:
        with np.errstate(divide="ignore"):
            std = 1.0 / np.asarray(arrays["inv_std"], dtype=np.float64)
    first = mean if mean is not None else std
    kept = first.shape[1:] if groups is not None else first.shape
    channels = int(np.prod(kept, dtype=np.int64))

    def rows(values):  # (series, channels): one series per group, or one
        return None if values is None else np.asarray(values, np.float64).reshape(-1, channels)

    mean, std = rows(mean), rows(std)
    series = (mean if mean is not None else std).shape[0]
    shown = min(series, SERIES_LIMIT)
    panels = [p for p in ("mean", "std") if (mean if p == "mean" else std) is not None]
    figure = figure_class(figsize=(9, 3.2 * len(panels) + 0.6), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(channels)
    group_note = "" if groups is None else (
        f", {groups} groups" + (f" (first {shown} shown)" if shown < series else ""))
    figure.suptitle(f"{_title(stats)}, {_plural(channels, 'channel')}{group_note}", fontsize=11)
    for ax, panel in zip(axes, panels):
        for s in range(shown):
            label = None if groups is None else f"group {s}"
            if panel == "std":
                ax.plot(x, std[s], marker="." if channels <= ERRORBAR_LIMIT else None, lw=1, label=label)
                continue
            if groups is not None or std is None:
                ax.plot(x, mean[s], marker="." if channels <= ERRORBAR_LIMIT else None, lw=1, label=label)
            elif channels <= ERRORBAR_LIMIT:
                ax.errorbar(x, mean[s], yerr=std[s], fmt="o", ms=3, capsize=2, lw=1, label="mean ± std")
            else:
                ax.plot(x, mean[s], lw=1, label="mean")
                ax.fill_between(x, mean[s] - std[s], mean[s] + std[s], alpha=0.3, lw=0, label="± std")
        if panel == "mean":
            with_std = std is not None and groups is None
            ax.set_ylabel("mean ± std" if with_std else "mean")
            if mean is not None and std is None:
                ax.set_title("inv_std not fitted (--inv-std none)", fontsize=9)
        else:
            ax.set_ylabel("std = 1/inv_std")
            finite = std[:shown][np.isfinite(std[:shown])]
            if finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
                ax.set_yscale("log")  # near-constant channels (std = sqrt(eps)) stay visible
            if mean is None:
                ax.set_title("mean not fitted (--mean none)", fontsize=9)
        ax.grid(alpha=0.3)
        if groups is not None and panel == panels[0]:
            ax.legend(fontsize=7, ncol=min(shown, 5))
        elif panel == "mean" and std is not None and groups is None:
            ax.legend(fontsize=8)
    if len(kept) > 1:  # where the first kept axis steps: the flattened blocks stay readable
        inner = int(np.prod(kept[1:], dtype=np.int64))
        for ax in axes:
            for edge in np.arange(inner, channels, inner):
                ax.axvline(edge - 0.5, color="gray", lw=0.6, alpha=0.5)
    axes[-1].set_xlabel(_channel_axis(stats, tuple(kept)))
    if channels <= 20:
        axes[-1].set_xticks(x)
        axes[-1].set_xlim(-0.5 - 0.1 * (5 - min(channels, 5)), channels - 0.5 + 0.1 * (5 - min(channels, 5)))
    return figure, f"{' and '.join(panels)} of {_plural(channels, 'channel')}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


# --- centers -------------------------------------------------------------------------------


def _centers_figure(figure_class: Any, stats: Stats) -> tuple[Any, str]:
    centers = np.asarray(stats.arrays["centers"], dtype=np.float64)
    counts = np.asarray(stats.arrays["counts"])
    classes = len(counts)
    flat = centers.reshape(classes, -1)
    empty = counts == 0
    figure = figure_class(figsize=(11, 4.6), layout="constrained")
    figure.suptitle(_title(stats), fontsize=11)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})

    if classes <= BAR_LIMIT:
        left.bar(np.arange(classes), counts, color="tab:blue")
        if empty.any():
            left.plot(np.flatnonzero(empty), np.zeros(int(empty.sum())), "x", color="tab:red", ms=8, mew=2,
                      label="empty class", clip_on=False)
            left.legend(fontsize=8)
        left.set_xlabel("class")
        if classes <= 20:
            left.set_xticks(np.arange(classes))
        left.set_ylabel("rows")
        left.set_title(f"rows per class ({int(empty.sum())} of {classes} empty)", fontsize=10)
    else:
        seen = counts[~empty]
        if seen.size:
            left.hist(seen, bins=min(50, max(1, len(np.unique(seen)))), color="tab:blue", label="seen classes")
        if empty.any():
            left.bar([0], [int(empty.sum())], width=max(1.0, 0.02 * float(counts.max() or 1)),
                     color="tab:red", label="empty classes (0 rows)")
        left.legend(fontsize=8)
        left.set_xlabel("rows in a class")
        left.set_ylabel("classes")
        left.set_title(f"rows per class: histogram over {classes:,} classes ({int(empty.sum()):,} empty)",
                       fontsize=10)
    left.grid(alpha=0.3, axis="y")

    shown = np.arange(classes)
    if classes > MATRIX_LIMIT:
        shown = np.unique(np.linspace(0, classes - 1, MATRIX_LIMIT).round().astype(np.int64))
    points = flat[shown]
    valid = np.isfinite(points).all(axis=1) & ~empty[shown]
    distance = np.full((len(shown), len(shown)), np.nan)
    if valid.any():
        distance[np.ix_(valid, valid)] = center_distances(points[valid])
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    extent = None
    if len(shown) < classes:  # ticks in class numbers, not matrix positions
        extent = (-0.5, classes - 0.5, classes - 0.5, -0.5)
    image = right.imshow(np.ma.masked_invalid(distance), cmap=cmap, interpolation="nearest", extent=extent)
    figure.colorbar(image, ax=right, label="euclidean distance")
    notes = [] if len(shown) == classes else [f"{len(shown)} of {classes:,} classes, evenly spaced"]
    if empty[shown].any():
        notes.append("gray: empty classes")
    right.set_title("distances between centers" + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=10)
    right.set_xlabel("class")
    right.set_ylabel("class")
    if classes <= 20:
        right.set_xticks(np.arange(classes))
        right.set_yticks(np.arange(classes))
    return figure, f"class counts and distances of {classes:,} centers"
