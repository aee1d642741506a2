"""Kaldi feature archives: ``scp:feats.scp``, ``ark:feats.ark``, bare ``.scp`` / ``.ark``.

The frames of the utterances are the rows, in the order of the scp (or the
archive). Only an index is kept: for an scp, each entry's archive and byte
offset, and the matrix shape read from the few header bytes there (archive
by archive in offset order, checked in batches); for an
ark without scp, one scan over the headers builds the same index (each
matrix's data is skipped, not read). Reading loads one utterance at a time
with kaldiio (uncompressed ``FM``/``DM`` and compressed ``CM``/``CM2``/``CM3``
matrices), so memory is bounded by the read block and the longest utterance.
"""

from __future__ import annotations

import array
import os
import re
import struct
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import DataError, UsageError
from ..limits import check_fits_memory, check_stored, elements, require_regular_file
from .base import KeyTable, KeyTableBuilder, SequenceSource, _identity, check_index_memory, require

# token -> (dtype read, bytes of the header after the token, bytes per element, per-column bytes)
MATRICES = {"FM": (np.float32, 10, 4, 0), "DM": (np.float64, 10, 8, 0), "CM": (np.float32, 16, 1, 8),
            "CM2": (np.float32, 16, 2, 0), "CM3": (np.float32, 16, 1, 0)}
KEY_LIMIT = 4096  # bytes of one key; longer is not a Kaldi archive
_OFFSET = re.compile(r"^(.*):(\d+)$", flags=re.S)
TOKENS = list(MATRICES)  # a token's number in the index


def looks_like_ark(path: str) -> bool:
    """Whether `path` starts as a binary Kaldi archive does: ``KEY \\0B`` then a matrix token."""
    with open(path, "rb") as f:
        head = f.read(KEY_LIMIT + 8)
    key, space, rest = head.partition(b" ")
    return bool(space) and 0 < len(key) <= KEY_LIMIT and not any(c < 33 for c in key) and \
        any(rest.startswith(b"\0B" + token.encode() + b" ") for token in MATRICES)


HEADER_BYTES = 22  # '\0B', the longest token and its space, and the longest header after it
SCP_BATCH = 1 << 16  # headers read and checked together
SCP_READ_BYTES = 1 << 20  # scp lines parsed between two checks of the index's memory


class KaldiSource(SequenceSource):
    """The matrices of a Kaldi scp or ark, frames as rows (see the module's docstring).

    The index is arrays: each utterance's archive (a number into ``_arks``),
    byte offset and length, and the keys in one :class:`KeyTable`. The
    headers an scp points to are read archive by archive in offset order,
    one handle per archive, and checked together.

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
        if self.kind == "scp":
            keys, arks, ark_of, offsets = self._index_scp()
            rows, cols, tokens = self._headers(keys, arks, ark_of, offsets)
        else:
            keys, arks, ark_of, offsets, rows, cols, tokens = self._scan_ark()
        self._arks, self._ark_of, self._offsets = arks, ark_of, offsets
        if len(keys) and np.any(cols != cols[0]):
            other = int(np.flatnonzero(cols != cols[0])[0])
            raise DataError(f"utterance {keys[other]!r} of {self.name} has {int(cols[other])} dims but utterance "
                            f"{keys[0]!r} has {int(cols[0])}; every matrix of an archive must have the same dims")
        if len(keys):
            largest = int(np.argmax(rows))
            check_fits_memory(elements((int(rows[largest]), int(cols[0]))) * 8, self.where_key(keys[largest]))
        dtypes = [MATRICES[token][0] for token in TOKENS if np.any(tokens == TOKENS.index(token))]
        self._set_sequences(keys, rows, (int(cols[0]),) if len(keys) else (), np.result_type(*dtypes or [np.float32]))

    def where_key(self, key: str) -> str:
        return f"utterance {key!r} of {self.name}"

    # --- the index --------------------------------------------------------------------------

    def _index_scp(self) -> tuple[KeyTable, list[str], np.ndarray, np.ndarray]:
        """The keys, archives, each entry's archive and offset, from the scp's lines."""
        # read once, its index checked as it grows (at most a block of lines past the limit): a first
        # pass to count the lines was ~2% of indexing
        keys, arks, ark_of, offsets = KeyTableBuilder(), {}, array.array("i"), array.array("q")
        with open(self.path, "rb") as f:
            number = 0
            for lines in iter(lambda: f.readlines(SCP_READ_BYTES), []):
                if len(offsets):  # more lines follow those indexed
                    check_index_memory(len(offsets), self.name, so_far=True)
                for number, raw in enumerate(lines, number + 1):
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        continue
                    key, _, target = line.partition(" ")
                    target = target.strip()
                    if not target:
                        raise DataError(f"{self._line(number, key)} names no archive; an scp line is "
                                        "'KEY ARCHIVE:OFFSET'")
                    if target.endswith("|") or target.startswith("|") or target.endswith("]"):
                        raise DataError(f"{self._line(number, key)} reads {target!r} through a pipe or a "
                                        "slice, which normstats does not run; copy the features to an archive "
                                        "first (copy-feats)")
                    match = _OFFSET.match(target)
                    ark, offset = (match.group(1), int(match.group(2))) if match else (target, 0)
                    keys.append(key.encode("utf-8", "surrogateescape"))
                    ark_of.append(arks.setdefault(ark, len(arks)))
                    offsets.append(offset)
        check_index_memory(len(offsets), self.name)
        return keys.table(), list(arks), np.array(ark_of, np.int32), np.array(offsets, np.int64)

    def _line(self, number: int, key: str) -> str:
        return f"{self.path} line {number} (utterance {key!r})"

    def _where_entry(self, index: int, key: str) -> str:
        """An scp entry for messages: its line (found again only for the message)."""
        if self.kind != "scp":
            return self.where_key(key)
        with open(self.path, "rb") as f:
            seen = -1
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    seen += 1
                    if seen == index:
                        return self._line(number, key)
        return self.where_key(key)

    def _headers(self, keys: KeyTable, arks: list[str], ark_of: np.ndarray,
                 offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, token number) of every entry: each archive's headers read in offset order
        with one handle, in batches, and checked together (one bad entry is then read alone
        for its message)."""
        rows = np.zeros(len(keys), np.int64)
        cols = np.zeros(len(keys), np.int64)
        tokens = np.zeros(len(keys), np.int8)
        for number, ark in enumerate(arks):
            entries = np.flatnonzero(ark_of == number)
            entries = entries[np.argsort(offsets[entries], kind="stable")]
            first = int(entries[0])
            f = self._file(ark, lambda: self._where_entry(first, keys[first]))
            fd, size = f.fileno(), os.fstat(f.fileno()).st_size
            for begin in range(0, len(entries), SCP_BATCH):
                batch = entries[begin:begin + SCP_BATCH]
                heads = b"".join(os.pread(fd, HEADER_BYTES, offset).ljust(HEADER_BYTES, b"\xff")
                                 for offset in offsets[batch].tolist())
                parsed = _parse_headers(np.frombuffer(heads, np.uint8).reshape(-1, HEADER_BYTES),
                                        offsets[batch], size)
                if isinstance(parsed, int):
                    bad = int(batch[parsed])
                    self._header(ark, int(offsets[bad]), self._where_entry(bad, keys[bad]))
                    raise DataError(f"{self._where_entry(bad, keys[bad])}: {ark} has a damaged matrix header at "
                                    f"byte {int(offsets[bad])}")
                rows[batch], cols[batch], tokens[batch] = parsed
        return rows, cols, tokens

    def _scan_ark(self) -> tuple:
        """One pass over the archive's headers (no scp given): each key, its offset and shape."""
        keys, offsets, rows, cols, tokens = KeyTableBuilder(), array.array("q"), array.array("q"), \
            array.array("q"), array.array("b")
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
            count, dims, token = self._header(self.path, offset, self.where_key(key), head[space + 1:], size)
            _, extra, item, per_column = MATRICES[token]
            position = offset + 2 + len(token) + 1 + extra + dims * per_column + count * dims * item
            keys.append(key.encode("utf-8", "surrogateescape"))
            offsets.append(offset)
            rows.append(count)
            cols.append(dims)
            tokens.append(TOKENS.index(token))
            if len(keys) % SCP_BATCH == 0:
                # (the count this far scaled to the whole file: an estimate, said so)
                check_index_memory(len(keys) * max(1, size // max(position, 1)), self.name, estimated=True)
        arrays = [np.array(a, dtype) for a, dtype in
                  ((offsets, np.int64), (rows, np.int64), (cols, np.int64), (tokens, np.int8))]
        return (keys.table(), [self.path], np.zeros(len(keys), np.int32), *arrays)

    def _file(self, ark: str, where: Union[str, Callable[[], str]]) -> Any:
        if ark not in self._fds:
            try:
                require_regular_file(ark, "archive")
                self._fds[ark] = open(ark, "rb")
            except UsageError as error:
                relative = "" if os.path.isabs(ark) else (
                    f" (an scp's relative paths are read from the working directory, {os.getcwd()}, "
                    "as Kaldi reads them)")
                raise DataError(f"{where() if callable(where) else where}: {error}{relative}") from None
            self._files.setdefault(ark, _identity(os.fstat(self._fds[ark].fileno())))
        return self._fds[ark]

    def _header(self, ark: str, offset: int, where: str, head: Optional[bytes] = None,
                size: Optional[int] = None) -> tuple[int, int, str]:
        """(rows, cols, token) of the matrix at `offset` (its first bytes `head`, if read
        already), its declared size checked against the archive's `size`."""
        f = self._file(ark, where)
        if head is None or len(head) < HEADER_BYTES:
            f.seek(offset)
            head = f.read(HEADER_BYTES)
        if size is None:
            size = os.fstat(f.fileno()).st_size
        if head[:2] != b"\0B":
            raise DataError(f"{where}: {ark} holds no binary Kaldi matrix at byte {offset} (text-mode "
                            "archives are not read; convert with copy-feats ark,t:... ark:...)")
        token, _, rest = head[2:HEADER_BYTES].partition(b" ")
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
        check_stored(offset + data, size, f"{where} ({ark} at byte {offset})")
        return rows, cols, token

    # --- reading ----------------------------------------------------------------------------

    def read_sequence(self, index: int, begin: int, end: int, out: np.ndarray) -> None:
        if self._cached is None or self._cached[0] != index:
            self._cached = None
            self._cached = (index, self._load(index))
        out[...] = self._cached[1][begin:end]

    def _load(self, index: int) -> np.ndarray:
        import kaldiio

        ark, offset = self._arks[int(self._ark_of[index])], int(self._offsets[index])
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


def _parse_headers(heads: np.ndarray, offsets: np.ndarray, size: int) -> Any:
    """(rows, cols, token numbers) of matrix headers, one row of `heads` (HEADER_BYTES
    each, padded with 0xff past the end of the file) per matrix at `offsets`; or the
    position of the first header that is not a sound feature matrix inside `size` bytes."""
    token = np.full(len(heads), -1, np.int64)
    start = np.zeros(len(heads), np.int64)  # where the rows/cols fields begin
    for number, name in enumerate(TOKENS):
        spelled = np.frombuffer(b"\0B" + name.encode() + b" ", np.uint8)
        match = np.all(heads[:, :len(spelled)] == spelled, axis=1)
        token[match] = number
        start[match] = len(spelled) + (1 if name in ("FM", "DM") else 8)
    known = token >= 0
    at = np.where(known, start, 0)[:, None] + np.arange(4)
    fields = np.take_along_axis(heads, np.clip(np.concatenate([at, at + 4 + (token[:, None] < 2)], axis=1),
                                               0, HEADER_BYTES - 1), axis=1)
    rows = fields[:, :4].copy().view("<i4")[:, 0].astype(np.int64)
    cols = fields[:, 4:].copy().view("<i4")[:, 0].astype(np.int64)
    plain = token < 2  # FM, DM: a size byte 4 before each field
    marks = np.take_along_axis(heads, np.clip(np.stack([start - 1, start + 4], axis=1), 0, HEADER_BYTES - 1), 1)
    sound = known & (~plain | np.all(marks == 4, axis=1)) & (rows >= 0) & (cols > 0)
    header = np.array([2 + len(t) + 1 + MATRICES[t][1] for t in TOKENS])[np.where(known, token, 0)]
    item = np.array([MATRICES[t][2] for t in TOKENS])[np.where(known, token, 0)]
    per_column = np.array([MATRICES[t][3] for t in TOKENS])[np.where(known, token, 0)]
    # in floats: rows * cols * item of two int32 fields may pass int64
    sound &= offsets + (header + cols * per_column).astype(np.float64) + rows.astype(np.float64) * cols * item <= size
    if not sound.all():
        return int(np.flatnonzero(~sound)[0])
    return rows, cols, token.astype(np.int8)
