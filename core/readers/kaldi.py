"""Kaldi feature archives: ``scp:feats.scp``, ``ark:feats.ark``, bare ``.scp`` / ``.ark``.

The frames of the utterances are the rows, in the order of the scp (or the
archive). Only an index is kept: for an scp, each entry's archive and byte
offset, and the matrix shape read from the few header bytes there; for an
ark without scp, one scan over the headers builds the same index (each
matrix's data is skipped, not read). Reading loads one utterance at a time
with kaldiio (uncompressed ``FM``/``DM`` and compressed ``CM``/``CM2``/``CM3``
matrices), so memory is bounded by the read block and the longest utterance.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any, Optional

import numpy as np

from ..errors import DataError, UsageError
from ..limits import check_fits_memory, check_stored, elements, require_regular_file
from .base import SequenceSource, _identity, require

# token -> (dtype read, bytes of the header after the token, bytes per element, per-column bytes)
MATRICES = {"FM": (np.float32, 10, 4, 0), "DM": (np.float64, 10, 8, 0), "CM": (np.float32, 16, 1, 8),
            "CM2": (np.float32, 16, 2, 0), "CM3": (np.float32, 16, 1, 0)}
KEY_LIMIT = 4096  # bytes of one key; longer is not a Kaldi archive
_OFFSET = re.compile(r"^(.*):(\d+)$", flags=re.S)


def looks_like_ark(path: str) -> bool:
    """Whether `path` starts as a binary Kaldi archive does: ``KEY \\0B`` then a matrix token."""
    with open(path, "rb") as f:
        head = f.read(KEY_LIMIT + 8)
    key, space, rest = head.partition(b" ")
    return bool(space) and 0 < len(key) <= KEY_LIMIT and not any(c < 33 for c in key) and \
        any(rest.startswith(b"\0B" + token.encode() + b" ") for token in MATRICES)


class KaldiSource(SequenceSource):
    """The matrices of a Kaldi scp or ark, frames as rows (see the module's docstring).

    Parameters
    ----------
    path : str
        The scp or ark file.
    kind : {'scp', 'ark'}
    """

    def __init__(self, path: str, kind: str) -> None:
        require("kaldiio", f"{kind}:{path}")
        require_regular_file(path, "input")
        self.path, self.kind, self.name = path, kind, f"{kind}:{path}"
        self._fds: dict[str, Any] = {}  # archive -> open file (kaldiio's fd_dict)
        self._files: dict[str, tuple] = {}  # archive -> identity when indexed
        self._cached: Optional[tuple[int, np.ndarray]] = None  # the utterance last loaded
        self._identity = _identity(os.stat(path))
        try:
            self._build_index()
        finally:
            self.close()  # opened again at the first read

    def _build_index(self) -> None:
        entries = self._index_scp() if self.kind == "scp" else self._scan_ark()
        self._entries = [(ark, offset) for _, ark, offset, _ in entries]
        keys = [key for key, *_ in entries]
        lengths, dims, dtypes = [], None, set()
        for key, ark, offset, (rows, cols, token) in entries:
            if dims is not None and cols != dims[1]:
                raise DataError(f"utterance {key!r} of {self.name} has {cols} dims but utterance {dims[0]!r} "
                                f"has {dims[1]}; every matrix of an archive must have the same dims")
            dims = dims or (key, cols)
            lengths.append(rows)
            dtypes.add(MATRICES[token][0])
        self._set_sequences(keys, lengths, (dims[1],), np.result_type(*dtypes))

    # --- the index --------------------------------------------------------------------------

    def _index_scp(self) -> list[tuple]:
        entries = []
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                key, _, target = line.partition(" ")
                target = target.strip()
                where = f"{self.path} line {number} (utterance {key!r})"
                if not target:
                    raise DataError(f"{where} names no archive; an scp line is 'KEY ARCHIVE:OFFSET'")
                if target.endswith("|") or target.startswith("|") or target.endswith("]"):
                    raise DataError(f"{where} reads {target!r} through a pipe or a slice, which normstats "
                                    "does not run; copy the features to an archive first (copy-feats)")
                match = _OFFSET.match(target)
                ark, offset = (match.group(1), int(match.group(2))) if match else (target, 0)
                entries.append((key, ark, offset, self._header(ark, offset, key, where)))
        return entries

    def _scan_ark(self) -> list[tuple]:
        """One pass over the archive's headers (no scp given): each key, its offset and shape."""
        entries = []
        size = os.path.getsize(self.path)
        position = 0
        f = self._file(self.path, f"{self.name}")
        while position < size:
            f.seek(position)
            head = f.read(KEY_LIMIT + 1)
            space = head.find(b" ")
            if space <= 0:
                raise DataError(f"{self.name}: byte {position} does not start 'KEY ' as a Kaldi archive entry "
                                "does; the file is damaged or not a Kaldi archive")
            key = head[:space].decode("utf-8", "replace")
            offset = position + space + 1
            header = self._header(self.path, offset, key, f"utterance {key!r} of {self.name}")
            rows, cols, token = header
            _, extra, item, per_column = MATRICES[token]
            position = offset + 2 + len(token) + 1 + extra + cols * per_column + rows * cols * item
            entries.append((key, self.path, offset, header))
        return entries

    def _file(self, ark: str, where: str) -> Any:
        if ark not in self._fds:
            try:
                require_regular_file(ark, "archive")
                self._fds[ark] = open(ark, "rb")
            except UsageError as error:
                relative = "" if os.path.isabs(ark) else (
                    f" (an scp's relative paths are read from the working directory, {os.getcwd()}, "
                    "as Kaldi reads them)")
                raise DataError(f"{where}: {error}{relative}") from None
            self._files.setdefault(ark, _identity(os.fstat(self._fds[ark].fileno())))
        return self._fds[ark]

    def _header(self, ark: str, offset: int, key: str, where: str) -> tuple[int, int, str]:
        """(rows, cols, token) of the matrix at `offset`, its declared size checked."""
        f = self._file(ark, where)
        f.seek(offset)
        head = f.read(2 + 4 + 16)
        if head[:2] != b"\0B":
            raise DataError(f"{where}: {ark} holds no binary Kaldi matrix at byte {offset} (text-mode "
                            "archives are not read; convert with copy-feats ark,t:... ark:...)")
        token, _, rest = head[2:].partition(b" ")
        token = token.decode("ascii", "replace")
        if token not in MATRICES:
            raise DataError(f"{where}: {ark} holds a Kaldi {token!r} object at byte {offset}, not a feature "
                            "matrix (FM, DM, CM, CM2, CM3)")
        _, extra, item, per_column = MATRICES[token]
        if len(rest) < extra:
            raise DataError(f"{where}: {ark} ends inside the matrix header at byte {offset}; it is truncated")
        if token in ("FM", "DM"):
            if rest[0:1] != b"\4" or rest[5:6] != b"\4":
                raise DataError(f"{where}: {ark} has a damaged matrix header at byte {offset}")
            rows, cols = struct.unpack("<i", rest[1:5])[0], struct.unpack("<i", rest[6:10])[0]
        else:
            rows, cols = struct.unpack("<ii", rest[8:16])
        if rows < 0 or cols <= 0:
            raise DataError(f"{where}: {ark} declares a {rows} x {cols} matrix at byte {offset}; it is damaged")
        data = 2 + len(token) + 1 + extra + cols * per_column + rows * cols * item
        check_stored(offset + data, os.fstat(f.fileno()).st_size, f"{where} ({ark} at byte {offset})")
        check_fits_memory(elements((rows, cols)) * 8, where)
        return rows, cols, token

    # --- reading ----------------------------------------------------------------------------

    def read_sequence(self, index: int, begin: int, end: int, out: np.ndarray) -> None:
        if self._cached is None or self._cached[0] != index:
            self._cached = None
            self._cached = (index, self._load(index))
        out[...] = self._cached[1][begin:end]

    def _load(self, index: int) -> np.ndarray:
        import kaldiio

        ark, offset = self._entries[index]
        where = self.where(index)
        fd = self._file(ark, where)
        try:
            matrix = kaldiio.load_mat(f"{ark}:{offset}", fd_dict={ark: fd})
        except (ValueError, AssertionError, struct.error, OSError, EOFError) as error:
            raise DataError(f"{where} ({ark} at byte {offset}) cannot be read ({error or type(error).__name__}); "
                            "the archive is damaged") from None
        now = _identity(os.fstat(fd.fileno()))
        if now != self._files[ark]:
            raise DataError(f"{ark} changed while it was read ({where}); nothing was written: run again once "
                            "no other program writes to it")
        if matrix.shape != (int(self.lengths[index]),) + self.row_shape:
            raise DataError(f"{where} ({ark} at byte {offset}) holds a {matrix.shape} matrix, not the "
                            f"{(int(self.lengths[index]),) + self.row_shape} its header declared; it is damaged")
        return matrix

    def close(self) -> None:
        for f in self._fds.values():
            f.close()
        self._fds = {}
        self._cached = None
