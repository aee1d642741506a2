"""Sources read by ``pread`` keep a path, never a descriptor, in a pickle: a copy sent to a
--jobs worker or a Dask task after the source has read opens the file itself."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns


@pytest.fixture
def x() -> np.ndarray:
    return np.arange(40 * 3, dtype=np.float32).reshape(40, 3)


def _write(tmp_path: Path, x: np.ndarray, layout: str) -> str:
    if layout == "npy":
        np.save(tmp_path / "x.npy", x)
        return str(tmp_path / "x.npy")
    if layout == "fortran.npy":
        np.save(tmp_path / "f.npy", np.asfortranarray(x))
        return str(tmp_path / "f.npy")
    if layout == "npz":  # an uncompressed member, read raw at its offset
        np.savez(tmp_path / "x.npz", feats=x)
        return f"{tmp_path / 'x.npz'}:feats"
    with h5py.File(tmp_path / "g.h5", "w") as f:  # contiguous members, read by pread
        f["g/a"], f["g/b"] = x[:25], x[25:]
    return f"{tmp_path / 'g.h5'}:/g"


@pytest.mark.parametrize("layout", ["npy", "fortran.npy", "npz", "h5 collection"])
def test_a_source_pickled_after_reading_reads_on_once_the_original_is_closed(tmp_path: Path, x: np.ndarray,
                                                                             layout: str) -> None:
    source = ns.open_source(_write(tmp_path, x, layout))
    block = np.empty((10, 3), np.float32)
    source.read_into(0, block)  # the original's descriptor is open now
    copy = pickle.loads(pickle.dumps(source))
    source.close()  # the number it had may now name another file, or none
    other = open(tmp_path / "other", "wb")  # takes the lowest free descriptor: the one just closed
    try:
        copy.read_into(20, block)
    finally:
        other.close()
        copy.close()
    np.testing.assert_array_equal(block, x[20:30])
