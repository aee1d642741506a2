"""Statistics for other toolkits: PyTorch, Keras, Kaldi and ESPnet, and back from PyTorch.

The conversions (:func:`to_torch`, :func:`to_keras`, :func:`to_kaldi`,
:func:`to_espnet`, :func:`stats_from_torch`) take statistics or tensors and
return them in the other layout; they never touch files. :func:`export_stats`
and :func:`import_torch` add the reading and writing, through
:mod:`normstats.writers`.

Each target gets only what it can represent faithfully; anything else is
refused with the reason, never approximated:

- torch: one mean and variance per channel, i.e. statistics that keep one axis
  of input of 2 or more dimensions (``axes='auto'``: axis 1; ``'auto:-1'``:
  channels-last, the layer then takes the input with that axis moved to 1),
  ungrouped;
- keras: any axes, ungrouped;
- kaldi and espnet: exact statistics (they store sums over every frame) that
  keep only the input's trailing (feature) axes; Kaldi per group as an archive
  (global statistics too, under the key ``global``); ESPnet2's GlobalMVN
  ungrouped, ESPnet1's CMVN matrices as its compute_cmvn_stats.py writes them.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from ._version import __version__
from .axes import kept_axes, kept_shape, resolve_axes
from .errors import StatsFileError, UsageError
from .normalize import affine_array
from .stats import BATCHNORM, Stats, check_values
from .writers.base import require_file
from .writers.export import write_export
from .writers.safetensors_file import SAFETENSORS_META_KEY, read_safetensors, safetensors_index
from .validate import check_eps

TARGETS = ("torch", "keras", "kaldi", "espnet")
GLOBAL_KEY = "global"  # the key of statistics without groups in an archive
TORCH_DEFAULT_EPS = 1e-5  # torch.nn.BatchNorm*d's default; a state dict does not hold its eps
LISTED_PREFIXES = 10  # BatchNorm layers named when a state dict holds several

Scale = Union[float, np.ndarray, None]


@dataclass
class Export:
    """Statistics in another toolkit's layout, ready to be written.

    Attributes
    ----------
    target : {'torch', 'keras', 'kaldi', 'espnet'}
    container : {'safetensors', 'npz', 'kaldi-matrix', 'kaldi-ark'}
        How :func:`normstats.writers.export.write_export` writes `arrays`.
    arrays : dict of str to ndarray
        The arrays under their names in the target (for ``kaldi-ark``, the
        archive keys; ``kaldi-matrix`` holds one matrix).
    metadata : dict of str to str
        Written where the container has room for it (a safetensors header).
    summary : str
        What was made, for one line of output.
    """

    target: str
    container: str
    arrays: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)
    summary: str = ""


# --- checks shared by the targets -------------------------------------------------------


def _name(stats: Stats) -> str:
    return stats.source or "the statistics"


def _batchnorm(stats: Stats, toolkit: str, layer: str, *, per_group: bool = False) -> None:
    """Refuse centers, and per-group statistics unless `per_group`: `toolkit`'s
    `layer` holds one set of statistics."""
    if stats.kind != BATCHNORM:
        raise StatsFileError(
            f"{_name(stats)} holds {stats.kind} statistics; {toolkit} takes BatchNorm statistics "
            "from fit-bn"
        )
    if stats.meta.get("groups") is not None and not per_group:
        raise StatsFileError(
            f"{_name(stats)} holds per-group statistics ({stats.meta['groups']} groups); {layer} "
            "holds one set for all rows: fit without --groups (Kaldi takes per-group exact "
            "statistics as an .ark)"
        )


def _exact(stats: Stats, what: str) -> None:
    if stats.mode != "exact":
        raise StatsFileError(
            f"{_name(stats)} holds {stats.mode} statistics; {what} are sums over all frames, which "
            "moving averages do not give: fit with --mode exact"
        )


def _trailing_features(stats: Stats, toolkit: str) -> tuple[int, ...]:
    """The statistics' shape, if they keep only the input's trailing axes (the
    feature axes of frames, which Kaldi and ESPnet normalize)."""
    axes = tuple(stats.meta["axes"])
    row_shape = tuple(stats.meta["row_shape"])
    if axes != tuple(range(len(axes))):
        raise StatsFileError(
            f"{_name(stats)} holds statistics over axes {axes} of {len(row_shape) + 1}-D input; "
            f"{toolkit} normalizes the trailing feature axes of frames: fit with --axes 0 (frames x "
            "dims input) or --axes 0,1 ((utterances, frames, dims) input)"
        )
    return kept_shape(row_shape, axes)


def _sums(stats: Stats, toolkit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """count, sum and sum of squares per statistic, from exact (count, mean, var).

    ``sum = count * mean`` and ``sum_sq = M2 + count * mean**2`` with
    ``M2 = var * (count - ddof)``: the identity the raw sums satisfy, so a
    toolkit that computes ``sum_sq / count - mean**2`` gets the population
    variance (its own rounding aside).
    """
    arrays = stats.arrays
    count = np.asarray(arrays["count"], dtype=np.float64)
    mean = np.asarray(arrays.get("mean", arrays.get("moment_mean")), dtype=np.float64)
    m2 = np.asarray(arrays["var"], dtype=np.float64) * (count - int(stats.meta["ddof"]))
    seen = count > 0
    per_set = count.reshape(stats.meta.get("groups") or 1, -1)  # a row per group, or one for all
    if (per_set.min(axis=1) != per_set.max(axis=1)).any():
        raise StatsFileError(
            f"{_name(stats)} counts different numbers of values per dimension (NaN/Inf values were "
            f"omitted); {toolkit} stores one count for all dimensions: clean the data or refit with "
            "--nan-policy error"
        )
    total = np.where(seen, count * mean, 0.0)
    squares = np.where(seen, m2 + count * mean * mean, 0.0)
    return count, total, squares


# --- PyTorch ------------------------------------------------------------------------------


def torch_key(prefix: str, name: str) -> str:
    """The state-dict key of buffer `name` of the layer `prefix` ('' for a bare layer)."""
    return f"{prefix}.{name}" if prefix else name


def running_variance(inv_std: np.ndarray, eps: float, name: str = "the statistics") -> np.ndarray:
    """``1 / inv_std**2 - eps``: the running_var that torch turns back into
    ``1 / sqrt(running_var + eps) = inv_std``.

    A channel of zero variance has ``inv_std = 1/sqrt(eps)`` and so a result
    of 0, up to rounding, which is clamped to 0. A larger inv_std has no
    running_var >= 0 (torch would take the square root of a negative number).

    Raises
    ------
    StatsFileError
        Some inv_std exceeds ``1/sqrt(eps)`` beyond rounding, or is negative.
    """
    inv_std = np.asarray(inv_std, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):  # inv_std**2 = inf gives 0: refused below
        spread = 1.0 / np.square(inv_std)  # var + eps, as inv_std holds it
    var = spread - eps
    rounding = 8 * np.finfo(np.float64).eps * spread
    bad = (var < -rounding) | (inv_std < 0)  # NaN compares false: NaN stays NaN
    if bad.any():
        index = np.unravel_index(np.flatnonzero(bad)[0], bad.shape)
        where = f" of channel {index[0]}" if index else ""
        raise StatsFileError(
            f"{name}: inv_std{where} is {inv_std[index]:.6g}, above 1/sqrt(eps) = {eps ** -0.5:.6g}; "
            f"no running_var >= 0 reproduces it with eps={eps:g}: export with a smaller --eps"
        )
    return np.where(var < 0, 0.0, var)


def to_torch(stats: Stats, *, prefix: str = "", eps: Optional[float] = None, gamma: Scale = None,
             beta: Scale = None) -> Export:
    """A ``torch.nn.BatchNorm*d`` state dict that, in eval mode, computes what
    ``normstats apply`` computes.

    torch computes ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``,
    so ``running_var = 1/inv_std**2 - eps`` (:func:`running_variance`) with
    the layer's `eps`. A disabled mean becomes zeros, a disabled inv_std a
    running_var of ``1 - eps`` (a scale of 1).

    Parameters
    ----------
    stats : Stats
        BatchNorm statistics over ``axes='auto'`` of input with 2 or more
        dimensions (one value per channel), not per group.
    prefix : str
        The layer's name in a model's state dict (``layer1.0.bn1``): keys
        become ``prefix.running_mean``, ...; '' for the layer alone.
    eps : float, optional
        eps of the layer that will load it; default the statistics' eps.
    gamma, beta : float, ndarray or None
        ``weight`` and ``bias`` (default ones and zeros), numbers or arrays of
        shape (C,).

    Returns
    -------
    Export
        float32 ``running_mean``, ``running_var``, ``weight``, ``bias`` (C,)
        and the int64 scalar ``num_batches_tracked`` (batches seen).

    Raises
    ------
    StatsFileError
        Centers, per-group or not per-channel statistics, or an inv_std that
        no running_var can give.
    """
    _batchnorm(stats, "torch", "a BatchNorm layer")
    meta = stats.meta
    row_shape, axes = tuple(meta["row_shape"]), tuple(meta["axes"])
    ndim = len(row_shape) + 1
    kept = kept_axes(axes, ndim)
    if ndim < 2 or len(kept) != 1:
        raise StatsFileError(
            f"{_name(stats)} holds statistics of shape {kept_shape(row_shape, axes)} over axes {axes} "
            f"of {ndim}-D input; a BatchNorm layer holds one value per channel: fit with --axes auto "
            "(channels at axis 1) or --channel-axis A (channels at axis A, e.g. -1) on input of 2 or more "
            "dimensions"
        )
    channel_axis = kept[0]
    channels = row_shape[channel_axis - 1]
    eps = float(meta["eps"]) if eps is None else check_eps(eps)
    mean = stats.arrays.get("mean", np.zeros(channels))
    inv_std = stats.arrays.get("inv_std", np.ones(channels))
    prefix = prefix.strip(".")
    tensors = {
        "running_mean": np.asarray(mean, dtype=np.float32),
        "running_var": running_variance(inv_std, eps, _name(stats)).astype(np.float32),
        "weight": affine_array(1.0 if gamma is None else gamma, (channels,), "gamma").astype(np.float32),
        "bias": affine_array(0.0 if beta is None else beta, (channels,), "beta").astype(np.float32),
        "num_batches_tracked": np.array(int(meta["batches_seen"]), dtype=np.int64),
    }
    layer = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}.get(ndim, "batch_norm")
    provenance = {"source": stats.source, "mode": stats.mode, "row_shape": list(row_shape),
                  "channel_axis": channel_axis, "rows_seen": meta["rows_seen"], "normstats_version": __version__}
    # torch's layers take channels at axis 1 (channels_last is a memory format, not a shape)
    moved = (f"; feed it the input with axis {channel_axis} moved to 1 (x.movedim({channel_axis}, 1))"
             if channel_axis != 1 else "")
    return Export(
        target="torch",
        container="safetensors",
        arrays={torch_key(prefix, name): value for name, value in tensors.items()},
        # "format": "pt" is what Hugging Face's loaders expect of a PyTorch file.
        metadata={"format": "pt", "eps": repr(eps), "normstats": json.dumps(provenance)},
        summary=f"{layer}({channels}, eps={eps:g}) state dict"
                + (f" under '{prefix}.'" if prefix else "") + f", {len(tensors)} tensors" + moved,
    )


def torch_prefixes(names: Sequence[str]) -> list[str]:
    """The BatchNorm layers of a state dict: prefixes holding both running_mean
    and running_var ('' for a bare layer)."""
    present = set(names)
    found = []
    for name in names:
        if name == "running_mean" or name.endswith(".running_mean"):
            prefix = name[: -len("running_mean")].rstrip(".")
            if torch_key(prefix, "running_var") in present:
                found.append(prefix)
    return sorted(found)


def choose_prefix(names: Sequence[str], prefix: Optional[str], source: str) -> str:
    """The layer to import: `prefix` if given (and present), else the only one.

    Raises
    ------
    StatsFileError
        The state dict holds no BatchNorm running statistics.
    UsageError
        `prefix` is not among them, or it was not given and there are several.
    """
    found = torch_prefixes(names)
    if not found:
        raise StatsFileError(
            f"{source} holds no BatchNorm running statistics (no running_mean with running_var)"
        )
    shown = ", ".join(repr(p) for p in found[:LISTED_PREFIXES]) + (
        f", ... ({len(found)} in all)" if len(found) > LISTED_PREFIXES else "")
    if prefix is not None:
        prefix = prefix.strip(".")
        if prefix not in found:
            raise UsageError(f"{source} has no BatchNorm layer {prefix!r}; it has {shown}")
        return prefix
    if len(found) > 1:
        raise UsageError(f"{source} holds {len(found)} BatchNorm layers; choose one with --prefix: {shown}")
    return found[0]


def stats_from_torch(tensors: dict[str, np.ndarray], *, prefix: str = "", eps: float = TORCH_DEFAULT_EPS,
                     source: str = "the state dict", row_shape: Optional[Sequence[int]] = None) -> Stats:
    """BatchNorm statistics from a PyTorch layer's running_mean and running_var.

    ``mean = running_mean`` and ``inv_std = 1 / sqrt(running_var + eps)``, so
    ``normstats apply`` with them (and ``--gamma``/``--beta`` set to the
    layer's weight and bias) computes what the layer computes in eval mode.
    They are recorded as mode 'ema' (a training loop's running averages, of
    the variance in torch's case) with ``imported_from``; rows_seen is 0
    (unknown) and batches_seen is num_batches_tracked when present.

    Parameters
    ----------
    tensors : dict of str to ndarray
        The layer's state dict entries, under `prefix`.
    prefix : str
        The layer's name ('' for a bare layer).
    eps : float
        The layer's eps (not part of its state dict).
    source : str
        Where the tensors come from, for messages and provenance.
    row_shape : sequence of int, optional
        Shape of one input row the statistics will apply to, starting with
        the channels: ``(C,)`` (the default) for (batch, C) input,
        ``(C, H, W)`` for images.

    Raises
    ------
    StatsFileError
        The buffers are not two float vectors of one length, or some
        ``running_var + eps`` is not positive.
    UsageError
        `row_shape` does not start with the layer's channel count.
    """
    eps = check_eps(eps)
    layer = prefix or "the layer"
    mean, var = (np.asarray(tensors[torch_key(prefix, n)]) for n in ("running_mean", "running_var"))
    if mean.ndim != 1 or mean.shape != var.shape or mean.size == 0 or not (
            mean.dtype.kind == "f" and var.dtype.kind == "f"):
        raise StatsFileError(
            f"{source}: {layer} has running_mean {mean.shape} {mean.dtype} and running_var {var.shape} "
            f"{var.dtype}; a BatchNorm layer holds two float vectors of one length"
        )
    channels = mean.shape[0]
    row_shape = (channels,) if row_shape is None else tuple(int(n) for n in row_shape)
    if not row_shape or row_shape[0] != channels or min(row_shape) < 1:
        raise UsageError(
            f"--row-shape {','.join(map(str, row_shape))} does not fit {layer} of {channels} channels; "
            f"give the shape of one input row, channels first, e.g. {channels} or {channels},32,32"
        )
    spread = var.astype(np.float64) + eps
    usable = np.isfinite(spread) & (spread > 0)  # NaN included: it would give no inverse standard deviation
    if not usable.all():
        channel = int(np.flatnonzero(~usable)[0])
        raise StatsFileError(
            f"{source}: {torch_key(prefix, 'running_var')} of channel {channel} is {var[channel]:g}; "
            f"with eps={eps:g} it has no finite inverse standard deviation"
        )
    if not np.isfinite(mean).all():
        channel = int(np.flatnonzero(~np.isfinite(mean))[0])
        raise StatsFileError(
            f"{source}: {torch_key(prefix, 'running_mean')} of channel {channel} is {mean[channel]:g}; "
            "a running mean must be finite"
        )
    batches = tensors.get(torch_key(prefix, "num_batches_tracked"))
    batches_seen = int(np.asarray(batches).reshape(-1)[0]) if batches is not None and np.size(batches) == 1 else 0
    meta = {
        "normstats_version": __version__,
        "kind": BATCHNORM,
        "mode": "ema",
        "axes": list(resolve_axes("auto", len(row_shape) + 1)),
        "eps": eps,
        "ddof": 1,  # torch's running_var averages unbiased batch variances
        "batch_size": None,
        "rows_seen": 0,
        "batches_seen": batches_seen,
        "batches_skipped": 0,
        "row_shape": list(row_shape),
        "input_dtype": str(mean.dtype),
        "use_mean": True,
        "use_inv_std": True,
        "nan_policy": "error",
        "sources": [source],
        "imported_from": source,
        "imported_layer": prefix,
    }
    arrays = {"mean": mean.astype(np.float64), "inv_std": 1.0 / np.sqrt(spread)}
    return Stats(BATCHNORM, arrays, meta)


# --- Keras ------------------------------------------------------------------------------------


def to_keras(stats: Stats) -> Export:
    """``mean``, ``variance`` and ``axis`` for ``keras.layers.Normalization``.

    Keras computes ``(x - mean) / max(sqrt(variance), epsilon)`` (epsilon
    1e-7), so ``variance = 1 / inv_std**2`` (``var + eps`` for exact
    statistics) gives what ``normstats apply`` gives whenever
    ``1/inv_std >= 1e-7`` (always, for eps >= 1e-14). ``axis`` is the kept
    (not reduced) axes of the input, batch axis included, as Keras counts
    them. A disabled mean becomes zeros, a disabled inv_std a variance of ones.

    Raises
    ------
    StatsFileError
        Centers or per-group statistics.
    """
    _batchnorm(stats, "Keras", "a Normalization layer")
    row_shape, axes = tuple(stats.meta["row_shape"]), tuple(stats.meta["axes"])
    shape = kept_shape(row_shape, axes)
    kept = tuple(axis for axis in range(len(row_shape) + 1) if axis not in axes)
    mean = np.asarray(stats.arrays.get("mean", np.zeros(shape)), dtype=np.float64)
    inv_std = np.asarray(stats.arrays.get("inv_std", np.ones(shape)), dtype=np.float64)
    with np.errstate(divide="ignore"):
        variance = 1.0 / np.square(inv_std)
    return Export(
        target="keras",
        container="npz",
        arrays={"mean": mean, "variance": variance, "axis": np.array(kept, dtype=np.int64)},
        summary=f"Normalization(axis={kept}), mean/variance {shape}",
    )


# --- Kaldi and ESPnet -------------------------------------------------------------------------


def to_kaldi(stats: Stats) -> Export:
    """Kaldi CMVN statistics, as ``compute-cmvn-stats`` writes and ``apply-cmvn`` reads.

    A 2 x (D+1) double matrix: row 0 holds the per-dimension sums and the
    count in its last column, row 1 the sums of squares and 0 (see
    :func:`_sums`). Per-group statistics become one matrix per group, keyed
    by the group names (``fit-bn --groups utterance`` / ``utt2spk=FILE``: the
    utterance or speaker ids) or ``group0``, ``group1``, ... (groups without
    rows are left out), for an
    archive that ``apply-cmvn --utt2spk`` reads per speaker.

    Note that apply-cmvn uses the population variance (no ddof) and no eps
    (it floors the variance at 1e-20), so its output differs from
    ``normstats apply`` by those.

    Raises
    ------
    StatsFileError
        Not exact, not over the trailing feature axis, more than one feature
        axis, or counts that differ per dimension.
    """
    _batchnorm(stats, "Kaldi", "Kaldi's CMVN statistics", per_group=True)
    _exact(stats, "Kaldi's CMVN statistics")
    shape = _trailing_features(stats, "Kaldi's apply-cmvn")
    if len(shape) > 1:
        raise StatsFileError(
            f"{_name(stats)} holds statistics of shape {shape}; Kaldi's CMVN statistics are per "
            "dimension of 2-D (frames x dims) features"
        )
    count, total, squares = _sums(stats, "Kaldi's CMVN")
    grouped = stats.meta.get("groups") is not None
    dims = int(np.prod(shape, dtype=np.int64))
    count, total, squares = (a.reshape(-1, dims) for a in (count, total, squares))

    def matrix(g: int) -> np.ndarray:
        out = np.zeros((2, dims + 1))
        out[0, :dims], out[0, dims] = total[g], count[g, 0]
        out[1, :dims] = squares[g]
        return out

    if not grouped:
        return Export("kaldi", "kaldi-matrix", {"cmvn": matrix(0)},
                      summary=f"CMVN stats 2 x {dims + 1} ({dims} dims, count {count[0, 0]:,.15g})")
    rows = np.asarray(stats.arrays["group_rows"])
    names = group_keys(stats)
    matrices = {names[g]: matrix(g) for g in range(len(rows)) if rows[g] > 0}
    left_out = len(rows) - len(matrices)
    keys = "keys from group_names" if stats.meta.get("group_names") else f"keys group0..group{len(rows) - 1}"
    return Export("kaldi", "kaldi-ark", matrices,
                  summary=f"CMVN stats 2 x {dims + 1} for {len(matrices)} groups ({keys})"
                          + (f", {left_out} without rows left out" if left_out else ""))


def group_keys(stats: Stats) -> list[str]:
    """The key of each group: its name (``--groups utterance`` / ``utt2spk=``) or ``group<g>``.

    Raises
    ------
    StatsFileError
        ``group_names`` does not hold one unique name per group.
    """
    count = int(stats.meta.get("groups") or 0)
    names = stats.meta.get("group_names")
    if names is None:
        return [f"group{g}" for g in range(count)]
    if len(names) != count or len(set(names)) != count:
        raise StatsFileError(f"{_name(stats)}: group_names holds {len(names)} names ({len(set(names))} distinct) "
                             f"for {count} groups; re-create the file")
    return list(names)


def to_espnet(stats: Stats) -> Export:
    """ESPnet2's GlobalMVN statistics file: ``count``, ``sum``, ``sum_square``.

    As ``espnet2/main_funcs/collect_stats.py`` writes it: ``count`` a scalar
    (frames; the weight sum for weighted statistics), ``sum`` and
    ``sum_square`` of the feature shape. GlobalMVN computes
    ``mean = sum / count``, ``var = sum_square / count - mean**2`` (the
    population variance) and divides by ``sqrt(max(var, eps))``.

    Raises
    ------
    StatsFileError
        Not exact, per group, not over the trailing feature axes, or counts
        that differ per dimension.
    """
    _batchnorm(stats, "ESPnet", "GlobalMVN")
    _exact(stats, "ESPnet's GlobalMVN statistics")
    shape = _trailing_features(stats, "ESPnet's GlobalMVN")
    count, total, squares = _sums(stats, "ESPnet's GlobalMVN")
    frames = float(np.asarray(count).reshape(-1)[0])
    # collect_stats.py writes an integer frame count; weights make it a real number
    scalar = np.array(int(frames) if frames.is_integer() and not stats.meta.get("weighted") else frames)
    return Export("espnet", "npz", {"count": scalar, "sum": total, "sum_square": squares},
                  summary=f"GlobalMVN stats {shape}, count {frames:,.15g}")


def to_espnet_cmvn(stats: Stats, extension: str) -> Export:
    """ESPnet1's CMVN statistics, as ``utils/compute_cmvn_stats.py`` writes them.

    The matrices are Kaldi's 2 x (D+1) ones (:func:`to_kaldi`). Global
    statistics (a wxfilename there): a ``.npy`` of the matrix (its
    ``--out-filetype npy``); per speaker or utterance (a wspecifier with
    ``--spk2utt``): a Kaldi archive (``.ark``, ``--out-filetype mat``) or an
    HDF5 file with one dataset per key (``.h5``, ``--out-filetype hdf5``).

    Raises
    ------
    UsageError
        Per-group statistics to ``.npy`` or global ones to ``.h5`` (layouts
        that script never writes).
    StatsFileError
        As :func:`to_kaldi`.
    """
    kaldi = to_kaldi(stats)
    grouped = kaldi.container == "kaldi-ark"
    if extension == ".npy" and grouped:
        raise UsageError(f"{_name(stats)} holds per-group statistics; ESPnet writes those to a Kaldi archive "
                         "(.ark) or an HDF5 file (.h5), one matrix per key, and only global ones to .npy")
    if extension in (".h5", ".hdf5") and not grouped:
        raise UsageError(f"{_name(stats)} holds global statistics; ESPnet writes those to .npy (or a Kaldi "
                         "matrix: --to kaldi -o cmvn.mat), and only per-group ones to HDF5")
    container = {".npy": "npy", ".ark": "kaldi-ark"}.get(extension, "hdf5")
    arrays = kaldi.arrays if grouped or container == "npy" else {GLOBAL_KEY: kaldi.arrays["cmvn"]}
    return Export("espnet", container, arrays, summary=kaldi.summary.replace("CMVN stats", "ESPnet1 CMVN stats", 1))


def _to_kaldi_archive(stats: Stats) -> Export:
    """:func:`to_kaldi` as a Kaldi archive: per-group matrices by key, global
    statistics as the archive's one entry, under the key ``global``."""
    export = to_kaldi(stats)
    if export.container == "kaldi-ark":
        return export
    return Export(export.target, "kaldi-ark", {GLOBAL_KEY: export.arrays["cmvn"]},
                  summary=f"{export.summary}, key {GLOBAL_KEY!r}")


# The conversion behind each (target, output extension): within a target, the extension
# chooses the layout (ESPnet2's GlobalMVN .npz or ESPnet1's CMVN matrices; a Kaldi matrix
# or archive). Options (torch's prefix, eps, gamma, beta) are passed on as given.
CONVERSIONS = {
    ("torch", ".safetensors"): to_torch,
    ("keras", ".npz"): to_keras,
    ("kaldi", ".cmvn"): to_kaldi,
    ("kaldi", ".mat"): to_kaldi,
    ("kaldi", ".ark"): _to_kaldi_archive,  # per-group statistics, one matrix per key
    ("espnet", ".npz"): to_espnet,
    # ESPnet1's CMVN, as utils/compute_cmvn_stats.py writes it
    **{("espnet", ext): functools.partial(to_espnet_cmvn, extension=ext) for ext in (".npy", ".ark", ".h5", ".hdf5")},
}
# The extensions each target writes, in the order the table gives them.
TARGET_FORMATS = {target: tuple(ext for t, ext in CONVERSIONS if t == target) for target in TARGETS}


# --- files ------------------------------------------------------------------------------------


def export_stats(stats: Stats, target: str, path: str, **options) -> Export:
    """Convert `stats` for `target` and write the result to `path`, atomically.

    Parameters
    ----------
    stats : Stats
    target : {'torch', 'keras', 'kaldi', 'espnet'}
    path : str
        Output file; its extension must be one of ``TARGET_FORMATS[target]``
        (Kaldi: ``.ark`` exactly for per-group statistics; global ones go to
        ``.cmvn`` / ``.mat`` or, under the key ``global``, to ``.ark``;
        ESPnet: ``.npz`` for ESPnet2, ``.npy`` / ``.ark`` / ``.h5`` for ESPnet1,
        see :func:`to_espnet_cmvn`).
    **options
        Passed to the conversion (torch: `prefix`, `eps`, `gamma`, `beta`).

    Returns
    -------
    Export
        What was written.

    Raises
    ------
    UsageError
        Unknown target, options the target does not take, or an extension
        that does not fit.
    StatsFileError
        The statistics cannot be represented in the target (see the
        conversion functions).
    """
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    extension = os.path.splitext(path)[1].lower()
    if extension not in TARGET_FORMATS[target]:
        raise UsageError(f"--to {target} writes {' or '.join(TARGET_FORMATS[target])}, not {path!r}")
    with np.errstate(over="ignore"):  # an overflow leaves inf, refused just below
        export = CONVERSIONS[target, extension](check_values(stats), **options)
    _check_finite_export(export, _name(stats))
    # Only to_kaldi's result depends on the statistics (a matrix, or an archive per group); the
    # name -o gives is not known to the conversion, so the remedy is named here.
    if export.container == "kaldi-ark" and extension != ".ark":
        raise UsageError(f"per-group statistics go to a Kaldi archive: write {os.path.splitext(path)[0]}.ark")
    write_export(export.container, export.arrays, export.metadata, path)
    return export


def _check_finite_export(export: Export, name: str) -> None:
    """Every number written must be finite: the target has no marker for 'undefined'."""
    for key, array in export.arrays.items():
        array = np.asarray(array)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
            at = f" at index {', '.join(map(str, index))}" if index else ""
            raise StatsFileError(
                f"{name}: its {export.target} {key} would hold {array[index]}{at} (a statistic the fit left "
                f"undefined, or one beyond the range of {array.dtype}); {export.target} needs finite values"
            )


def import_torch(path: str, *, prefix: Optional[str] = None, eps: Optional[float] = None,
                 row_shape: Optional[Sequence[int]] = None) -> Stats:
    """Read one BatchNorm layer's running statistics from a `.safetensors` state dict.

    Only the layer's tensors are read. Without `eps`, the eps that
    ``normstats export`` recorded in the file is used, else torch's default
    1e-5; without `row_shape`, the one it recorded, else ``(C,)``.

    Raises
    ------
    UsageError
        The file is missing or not `.safetensors` (``torch.save`` files are
        pickles, never loaded), or the layer is ambiguous or absent.
    StatsFileError
        The file is damaged or holds no usable BatchNorm statistics.
    """
    require_file(path, "state dict")
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise UsageError(
            f"{path}: normstats reads state dicts as .safetensors (torch.save files are pickles, "
            "which it never loads): save one with safetensors.torch.save_file(model.state_dict(), "
            "'model.safetensors')"
        )
    names, metadata = safetensors_index(path)
    if SAFETENSORS_META_KEY in metadata:
        raise StatsFileError(f"{path} is a normstats stats file already; give it to apply, merge or inspect as it is")
    chosen = choose_prefix(names, prefix, path)
    keys = [torch_key(chosen, n) for n in ("running_mean", "running_var", "num_batches_tracked")]
    tensors, _ = read_safetensors(path, [key for key in keys if key in names])
    recorded = _recorded(metadata)
    if eps is None:
        eps = recorded.get("eps", TORCH_DEFAULT_EPS)
    if row_shape is None and recorded.get("row_shape"):
        row_shape = recorded["row_shape"]
        if row_shape[0] != np.size(tensors[keys[0]]):
            row_shape = None  # recorded for another layer
    return stats_from_torch(tensors, prefix=chosen, eps=eps, source=path, row_shape=row_shape)


def _recorded(metadata: dict[str, str]) -> dict:
    """What ``normstats export`` recorded in a safetensors header (eps, row shape), if anything."""
    recorded: dict = {}
    try:
        recorded["eps"] = float(metadata["eps"])
    except (KeyError, ValueError):
        pass
    try:
        shape = json.loads(metadata["normstats"])["row_shape"]
        if isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape):
            recorded["row_shape"] = shape
    except (KeyError, ValueError, TypeError):
        pass
    return recorded
