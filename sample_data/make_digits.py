"""Build the small sample data set ``digits.h5``.

This script loads the handwritten digits bundled with scikit-learn
(:func:`sklearn.datasets.load_digits`: 1797 grey-scale images of 8x8
pixels, values 0..16, ten classes 0..9; shipped inside the scikit-learn
package, so nothing is downloaded) and writes them to an HDF5 file.

The file holds three uncompressed, contiguous datasets:

``images``
    ``float32``, shape ``(1797, 1, 8, 8)`` (N, C, H, W layout).
``features``
    ``float32``, shape ``(1797, 64)``: the same pixels, flattened.
``labels``
    ``int64``, shape ``(1797,)``: the digit class, 0..9.

The file attributes ``source``, ``made_by`` and ``sklearn_version`` record
the provenance. The output is written to a temporary name in the target
folder and then moved into place with :func:`os.replace`, so a reader never
sees a half-written file. The data are deterministic for a given
scikit-learn data set; no timestamps are stored.

scikit-learn is only needed to run this script, not by the project::

    pip install scikit-learn h5py numpy
    python sample_data/make_digits.py [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import sklearn
from sklearn.datasets import load_digits

SOURCE = (
    "scikit-learn load_digits (UCI ML hand-written digits, "
    "test set of Alpaydin & Kaynak 1998)"
)
MADE_BY = "sample_data/make_digits.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "digits.h5"


def load_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the digits and return ``(images, features, labels)``.

    Returns
    -------
    images : numpy.ndarray
        ``float32`` array of shape ``(N, 1, 8, 8)``.
    features : numpy.ndarray
        ``float32`` array of shape ``(N, 64)``, ``images`` flattened.
    labels : numpy.ndarray
        ``int64`` array of shape ``(N,)`` with classes 0..9.
    """
    digits = load_digits()
    images = np.ascontiguousarray(digits.images, dtype=np.float32)[:, None, :, :]
    features = np.ascontiguousarray(images.reshape(len(images), -1))
    labels = np.ascontiguousarray(digits.target, dtype=np.int64)
    return images, features, labels


def write_h5(out: Path) -> None:
    """Write the digits to ``out`` atomically.

    Parameters
    ----------
    out : pathlib.Path
        Destination file; its folder is created if missing.
    """
    images, features, labels = load_arrays()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{out.name}.", suffix=".tmp", dir=out.parent
    )
    os.close(fd)
    try:
        with h5py.File(tmp_name, "w", libver="earliest", track_order=False) as f:
            f.attrs["source"] = SOURCE
            f.attrs["made_by"] = MADE_BY
            f.attrs["sklearn_version"] = sklearn.__version__
            for name, data in (
                ("images", images),
                ("features", features),
                ("labels", labels),
            ):
                f.create_dataset(name, data=data, track_times=False)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and write the file.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output HDF5 file (default: {DEFAULT_OUT.name} beside this script)",
    )
    args = parser.parse_args(argv)
    write_h5(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
