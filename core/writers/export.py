"""Files for other toolkits (``normstats export``): safetensors, plain `.npz`,
a Kaldi matrix or archive."""

from __future__ import annotations

import io

import numpy as np

from ..errors import UsageError
from . import stats_h5
from .atomic import atomic_path, held_signals
from .kaldi_matrix import kaldi_binary_matrix
from .safetensors_file import write_safetensors


EXPORT_CONTAINERS = ("safetensors", "npz", "npy", "hdf5", "kaldi-matrix", "kaldi-ark")


def write_export(container: str, arrays: dict[str, np.ndarray], metadata: dict[str, str], path: str) -> None:
    """Write arrays in another toolkit's layout to `path`, atomically.

    Parameters
    ----------
    container : {'safetensors', 'npz', 'npy', 'hdf5', 'kaldi-matrix', 'kaldi-ark'}
        ``safetensors``: tensors plus `metadata` in the header; ``npz``: plain
        arrays, nothing else (tools such as ESPnet's aggregate_stats_dirs.py
        sum every entry); ``npy``: the one array of `arrays`; ``hdf5``: a
        dataset per key, nothing else; ``kaldi-matrix``: the one array of `arrays` as a
        Kaldi binary matrix; ``kaldi-ark``: each array under its key in a
        binary Kaldi archive.
    """
    if container not in EXPORT_CONTAINERS:
        raise UsageError(f"unknown export container {container!r}")
    with atomic_path(path) as temporary, held_signals():  # as in write_stats
        if container == "safetensors":
            write_safetensors(arrays, temporary, metadata)
        elif container == "npz":
            with open(temporary, "wb") as f:
                np.savez(f, **arrays)
        elif container == "npy":
            (array,) = arrays.values()
            # np.save to a real file writes with ndarray.tofile, whose short write is an OSError
            # without errno ("N requested and M written"); a plain write keeps ENOSPC / EFBIG
            encoded = io.BytesIO()
            np.save(encoded, array)
            with open(temporary, "wb") as f:
                f.write(encoded.getbuffer())
        elif container == "hdf5":
            stats_h5._write_stats_h5(arrays, {}, temporary)
        else:
            with open(temporary, "wb") as f:
                for key, matrix in arrays.items():
                    if container == "kaldi-ark":
                        f.write(key.encode() + b" ")  # an archive entry: "key " then the object
                    f.write(kaldi_binary_matrix(matrix))
