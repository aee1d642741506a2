"""Kaldi archives as outputs: ``ark:out.ark`` and ``ark,scp:out.ark,out.scp``.

The matrices are written with kaldiio (``save_ark``, the writer Kaldi
recipes in Python use), one utterance at a time, into temporaries placed
together at the end (:func:`normstats.writers.atomic.atomic_paths`); the scp
names the archive by its final path, as Kaldi's ``ark,scp:`` writers do.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DataError, UsageError
from ..readers.base import require
from .atomic import atomic_paths

# A wspecifier's options before the colon: ark / scp, and the flags Kaldi writers take
WSPECIFIER = re.compile(r"\A(?P<options>[a-z]+(?:,[a-z]+)*):(?P<files>.*)\Z", re.S)
FLAGS = {"b", "f", "nf"}  # binary (the default here), flush or not: nothing to do for a file written whole
KALDI_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def parse_wspecifier(spec: str) -> Optional[tuple[str, Optional[str]]]:
    """The (archive, scp or None) of a Kaldi write specifier; None if `spec` is not one.

    >>> parse_wspecifier("ark,scp:out.ark,out.scp"), parse_wspecifier("out.npy")
    (('out.ark', 'out.scp'), None)

    Raises
    ------
    UsageError
        A specifier Kaldi would read differently or that cannot be written
        all or nothing (text archives, pipes, standard output, an scp alone).
    """
    match = WSPECIFIER.match(spec)
    if not match:
        return None
    options = match["options"].split(",")
    kinds = [option for option in options if option in ("ark", "scp")]
    if not kinds:
        return None
    if "t" in options:
        raise UsageError(f"output {spec}: text archives (,t) are not written; drop ',t' for a binary archive")
    unknown = [option for option in options if option not in FLAGS and option not in kinds]
    if unknown or len(set(kinds)) != len(kinds):
        raise UsageError(f"output {spec}: unknown or repeated option {(unknown or kinds)[0]!r}; "
                         "write ark:OUT.ark or ark,scp:OUT.ark,OUT.scp")
    if "ark" not in kinds:
        raise UsageError(f"output {spec}: an scp is written with its archive: ark,scp:OUT.ark,OUT.scp")
    files = match["files"].split(",") if len(kinds) == 2 else [match["files"]]
    if len(files) != len(kinds) or not all(files):
        raise UsageError(f"output {spec}: {','.join(kinds)}: needs {len(kinds)} file name(s), separated by a comma")
    named = dict(zip(kinds, files))
    for name in named.values():
        if name == "-" or name.rstrip().endswith("|") or name.lstrip().startswith("|"):
            raise UsageError(f"output {spec}: pipes and standard output are not written (the archive is "
                             "placed whole at the end); name a file")
    return named["ark"], named.get("scp")


class _Named:
    """The open temporary archive under the name its scp must give: the final one."""

    def __init__(self, file: Any, name: str) -> None:
        self._file, self.name = file, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._file, attribute)


class KaldiArkWriter:
    """Sequences written in order as Kaldi matrices under their keys, atomically.

    Use as a context manager; :meth:`write` takes the frames of a sequence
    in order, in one or more pieces (a piece is copied only when a sequence
    spans pieces, so memory is bounded by the longest sequence).

    Parameters
    ----------
    ark, scp : str
        The archive and, optionally, its scp (``key ark:offset`` lines).
    keys, lengths : sequence
        Every sequence's key and frame count, in the order written.
    row_shape : tuple of int
        The shape of one frame: Kaldi matrices are frames x dims, so ``(D,)``.
    dtype : numpy dtype
        float32 (``FM``) or float64 (``DM``).
    """

    def __init__(self, ark: str, scp: Optional[str], keys: Sequence[str], lengths: Sequence[int],
                 row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.ark, self.scp = ark, scp
        self.keys, self.lengths = list(keys), np.asarray(lengths, dtype=np.int64)
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        if len(self.row_shape) != 1:
            raise UsageError(f"{ark}: a Kaldi archive holds matrices (frames x dims), and the frames here have "
                             f"shape {self.row_shape}; write an HDF5 collection (OUT.h5:/) instead")
        if self.dtype not in KALDI_DTYPES:
            raise UsageError(f"{ark}: Kaldi matrices are float32 or float64, not {self.dtype}; "
                             "pass --dtype float32")
        for key in self.keys:
            if not key or any(c.isspace() for c in key):
                raise DataError(f"key {key!r} cannot be a Kaldi archive key (empty or with white space); "
                                "write an HDF5 collection (OUT.h5:/) instead")
        self._kaldiio = require("kaldiio", f"ark:{ark}", action="writing")
        self._next = 0  # the sequence written next
        self._pending: Optional[np.ndarray] = None  # the frames so far of a sequence that spans pieces
        self._filled = 0

    def __enter__(self) -> "KaldiArkWriter":
        self._context = atomic_paths([self.ark] + ([self.scp] if self.scp else []))
        temporaries = self._context.__enter__()
        try:
            self._files = [open(temporaries[0], "wb")]
            if self.scp:
                self._files.append(open(temporaries[1], "w", encoding="utf-8"))
        except BaseException as error:
            self._close_files()
            if not self._context.__exit__(type(error), error, error.__traceback__):
                raise
        self._archive = _Named(self._files[0], self.ark)
        return self

    def write(self, index: int, begin: int, frames: np.ndarray) -> None:
        """Frames ``begin:begin + len(frames)`` of sequence `index` (sequences in order)."""
        self._empty_until(index)
        length = int(self.lengths[index])
        if begin == 0 and frames.shape[0] == length:
            self._save(index, frames)
            return
        if begin == 0:
            self._pending, self._filled = np.empty((length,) + self.row_shape, self.dtype), 0
        if self._pending is None or begin != self._filled:
            raise ValueError(f"frames of {self.keys[index]!r} out of order")
        self._pending[begin:begin + frames.shape[0]] = frames
        self._filled += frames.shape[0]
        if self._filled == length:
            pending, self._pending = self._pending, None
            self._save(index, pending)

    def _empty_until(self, index: int) -> None:
        """Sequences without frames before `index` are written too: every key is kept."""
        while self._next < index:
            if self.lengths[self._next] or self._pending is not None:
                raise ValueError(f"sequence {self.keys[self._next]!r} was not written whole")
            self._save(self._next, np.empty((0,) + self.row_shape, self.dtype))

    def _save(self, index: int, matrix: np.ndarray) -> None:
        scp = self._files[1] if self.scp else None
        self._kaldiio.save_ark(self._archive, {self.keys[index]: np.asarray(matrix, self.dtype)}, scp=scp)
        self._next = index + 1

    def _close_files(self) -> None:
        for file in getattr(self, "_files", []):
            with contextlib.suppress(OSError):  # a failed write is reported already
                file.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._empty_until(len(self.keys))
                for file in self._files:
                    file.flush()  # a full disk shows here, not in a close that hides it
            except BaseException as error:
                self._close_files()
                self._context.__exit__(type(error), error, error.__traceback__)
                raise
            self._close_files()
            self._context.__exit__(None, None, None)
            return
        self._close_files()
        self._context.__exit__(exc_type, exc, tb)  # removes the temporaries; a full disk becomes one error
