"""What a file that ``normstats export`` writes is, for ``normstats inspect``.

Export files carry another toolkit's layout, not a stats file's: a PyTorch
BatchNorm state dict (``.safetensors``), Keras ``Normalization`` weights or
ESPnet GlobalMVN statistics (``.npz``), Kaldi CMVN matrices. They are
recognized by their contents (whoever wrote them), summarized, and the lines
that load them are named.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from .errors import NormstatsError
from .interop import TARGET_FORMATS, torch_key, torch_prefixes
from .writers.safetensors_file import SAFETENSORS_META_KEY, read_safetensors, safetensors_index
from .writers.base import require_file
from .writers.stats_npz import open_npz

KALDI_HINT = "pip install kaldiio"  # normstats reads Kaldi's binary matrices through kaldiio only


def describe_export(path: str) -> Optional[dict[str, Any]]:
    """A summary of the toolkit file at `path`, or None if it is not one.

    Returns
    -------
    dict or None
        ``kind`` (what it is), ``written_by`` ('normstats export' when the
        file says so), ``layers`` / ``arrays`` (names and shapes) and
        ``load`` (how to read it back); None for anything else (a stats
        file included).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> np.savez(os.path.join(folder, "k.npz"), mean=np.zeros(3), variance=np.ones(3), axis=np.array([1]))
    >>> describe_export(os.path.join(folder, "k.npz"))["kind"]
    'Keras Normalization weights'
    """
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension == ".safetensors":
            return _torch(path)
        if extension == ".npz":
            return _npz(path)
        if extension in TARGET_FORMATS["kaldi"]:
            return _kaldi(path, extension)
    except NormstatsError:
        return None
    return None


def _torch(path: str) -> Optional[dict[str, Any]]:
    names, metadata = safetensors_index(path)
    layers = torch_prefixes(names)
    if SAFETENSORS_META_KEY in metadata or not layers:
        return None
    means, _ = read_safetensors(path, [torch_key(prefix, "running_mean") for prefix in layers])  # one pass
    shown = {}
    for prefix in layers:
        mean = means[torch_key(prefix, "running_mean")]
        shown[prefix or "(top level)"] = f"{mean.shape[0] if mean.ndim else 1} channels"
    first = layers[0]
    return {
        "kind": "PyTorch BatchNorm state dict",
        "written_by": "normstats export --to torch" if "normstats" in metadata else "unknown",
        "eps": metadata.get("eps", "not recorded (PyTorch's default is 1e-5)"),
        "layers": shown,
        "load": "layer.load_state_dict(safetensors.torch.load_file(FILE)) for torch.nn.BatchNormNd(C, eps=eps); "
                "back to a stats file: normstats import FILE" + (f" --prefix {first}" if first else "") + " -o STATS",
    }


def _npz(path: str) -> Optional[dict[str, Any]]:
    require_file(path, "file")
    with open_npz(path) as archive:  # opened once: its names, then the arrays shown
        names = set(archive.files)
        if "meta" in names:
            return None
        if {"mean", "variance"} <= names:
            kind = "Keras Normalization weights"
            load = "z = np.load(FILE); keras.layers.Normalization(axis=tuple(z['axis'].tolist()), mean=z['mean'], variance=z['variance'])"
        elif {"count", "sum", "sum_square"} <= names:
            kind = "ESPnet GlobalMVN statistics"
            load = "espnet2 GlobalMVN(stats_file=FILE) (or np.load(FILE))"
        else:
            return None
        arrays = {name: _shape_text(archive[name]) for name in sorted(names)}
    return {"kind": kind, "written_by": "unknown (an .npz names no writer)", "arrays": arrays, "load": load}


def _kaldi(path: str, extension: str) -> Optional[dict[str, Any]]:
    try:
        import kaldiio
    except ImportError:
        return {"kind": "Kaldi file (not read)", "written_by": "unknown",
                "load": f"normstats reads Kaldi matrices through kaldiio: {KALDI_HINT}"}
    try:
        if extension == ".ark":
            matrices = dict(kaldiio.load_ark(path))
        else:
            matrices = {"(matrix)": kaldiio.load_mat(path)}
    except Exception:  # kaldiio's own errors (damaged or not Kaldi): not an export we know
        return None
    if not matrices or any(np.ndim(m) != 2 or np.shape(m)[0] != 2 for m in matrices.values()):
        return None
    shown = {key: f"{m.shape[1] - 1} dims, count {m[0, -1]:,.15g}" for key, m in list(matrices.items())[:10]}
    if len(matrices) > 10:
        shown["..."] = f"{len(matrices)} keys in all"
    return {
        "kind": "Kaldi CMVN statistics" + (" archive (one matrix per key)" if extension == ".ark" else ""),
        "written_by": "unknown (Kaldi files name no writer)",
        "matrices": shown,
        "load": "apply-cmvn " + ("--utt2spk=ark:utt2spk ark:FILE" if extension == ".ark" else "FILE")
                + " scp:feats.scp ark:out.ark (or kaldiio.load_mat / load_ark)",
    }


def _shape_text(array: np.ndarray) -> str:
    return f"{array.dtype} {tuple(array.shape)}"
