"""Kaldi's binary double matrix, as ``copy-matrix`` reads it."""

from __future__ import annotations

import struct

import numpy as np


def kaldi_binary_matrix(matrix: np.ndarray) -> bytes:
    """`matrix` in Kaldi's binary ``Matrix<double>`` format, as ``copy-matrix`` reads it.

    Kaldi's layout (matrix/kaldi-matrix.cc ``MatrixBase::Write`` after
    ``Output::Open``'s binary header): ``\\0B`` (binary mode), the token
    ``DM `` (double matrix), then rows and columns each as a size byte 4 and a
    little-endian int32, then the values row by row as little-endian float64.
    """
    matrix = np.asarray(matrix, dtype="<f8")
    rows, cols = matrix.shape
    return (b"\0B" + b"DM " + b"\x04" + struct.pack("<i", rows) + b"\x04" + struct.pack("<i", cols)
            + np.ascontiguousarray(matrix).tobytes())
