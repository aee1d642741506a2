"""Groups from the keys of a sequence collection: ``--groups utterance`` and
``--groups utt2spk=FILE`` / ``spk2utt=FILE``.

Kaldi's ``compute-cmvn-stats --spk2utt`` fits one set of statistics per
speaker from the utterance keys of an archive. Here the keys of the input's
sequences (see :class:`normstats.readers.base.SequenceSource`) are mapped to
group names (each utterance its own group, or its speaker), the names sorted
(speakers) or in input order (utterances), and each row gets its sequence's
group index through a side stream that is fed to a fit exactly like a
``--groups`` file. The names are stored in the stats file (meta
``group_names``), so exports and reports name groups by key.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Optional, Sequence

import numpy as np

from .errors import DataError, UsageError
from .limits import require_regular_file
from .readers.base import ArraySource, _identity
from .stream import Stream

KINDS = ("utterance", "utt2spk", "spk2utt")
MAP_LINE_LIMIT = 1 << 20  # bytes of one map line; past it, not a Kaldi map


@dataclasses.dataclass(frozen=True)
class KeyGroups:
    """How rows are grouped by their sequence's key.

    Attributes
    ----------
    kind : {'utterance', 'utt2spk', 'spk2utt'}
    file : str or None
        The Kaldi map (utt2spk: ``UTT SPK`` lines; spk2utt: ``SPK UTT...`` lines).
    """

    kind: str
    file: Optional[str] = None
    names: Optional[tuple[str, ...]] = None  # the group names and their order, when already fixed
    short: tuple[str, ...] = ()  # the groups with too few rows for a variance (for messages)

    @property
    def spec(self) -> str:
        return self.kind if self.file is None else f"{self.kind}={self.file}"


def parse_groups(value: Optional[str]) -> Optional[KeyGroups]:
    """The key grouping a ``--groups`` value names, or None for a file of group indices.

    Raises
    ------
    UsageError
        ``utt2spk=`` / ``spk2utt=`` without a file.
    """
    if value is None:
        return None
    if value == "utterance":
        return KeyGroups("utterance")
    kind, sep, file = value.partition("=")
    if sep and kind in KINDS[1:]:
        if not file:
            raise UsageError(f"--groups {value}: name the Kaldi {kind} file, e.g. --groups {kind}=data/{kind}")
        return KeyGroups(kind, file)
    return None


def sequence_keys(stream: Stream) -> tuple[list[str], np.ndarray]:
    """The keys and lengths of every sequence of `stream`, in order.

    Raises
    ------
    UsageError
        A shard is not a sequence collection.
    DataError
        A key appears in two shards.
    """
    keys: list[str] = []
    lengths = []
    for source in stream.sources:
        if not hasattr(source, "keys"):
            raise UsageError(f"{source.name} is one array, without sequence keys; --groups utterance / "
                             "utt2spk= / spk2utt= need a sequence collection (scp:, ark:, file.h5:/group)")
        keys.extend(source.keys)
        lengths.append(source.lengths)
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        twice = next(k for k in keys if k in seen or seen.add(k))
        raise DataError(f"the key {twice!r} appears in two input shards; keys must be unique")
    return keys, np.concatenate(lengths)


def read_map(groups: KeyGroups) -> dict[str, str]:
    """utterance -> speaker, from a Kaldi utt2spk or spk2utt file."""
    path = groups.file
    require_regular_file(path, f"--groups {groups.kind} file")
    mapping: dict[str, str] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            fields = raw.decode("utf-8", "replace").split()
            if not fields:
                continue
            where = f"{path} line {number}"
            if groups.kind == "utt2spk":
                if len(fields) != 2:
                    raise DataError(f"{where} has {len(fields)} fields; an utt2spk line is 'UTTERANCE SPEAKER'")
                pairs = [(fields[0], fields[1])]
            else:
                if len(fields) < 2:
                    raise DataError(f"{where} names no utterance; a spk2utt line is 'SPEAKER UTT1 UTT2 ...'")
                pairs = [(utt, fields[0]) for utt in fields[1:]]
            for utt, speaker in pairs:
                if mapping.get(utt, speaker) != speaker:
                    raise DataError(f"{where}: utterance {utt!r} belongs to {mapping[utt]!r} and {speaker!r}")
                mapping[utt] = speaker
    return mapping


def sequence_labels(groups: KeyGroups, stream: Stream) -> tuple[list[str], np.ndarray]:
    """Each sequence's label (its key, or its speaker from the map) and the sequences' lengths.

    Computed once per stream and grouping (a fit asks when it fixes the
    group names, when it checks them for short groups and when it fits):
    a map of 100 000 utterances is read once.

    Raises
    ------
    DataError
        A key that the map does not name.
    """
    memo = _LABELS.setdefault(stream, {})
    # the map's identity too: a map edited between two uses is read again
    seen = _identity(require_regular_file(groups.file, f"--groups {groups.kind} file")) if groups.file else None
    key = (groups.kind, groups.file, seen)
    if key not in memo:
        keys, lengths = sequence_keys(stream)
        if groups.kind == "utterance":
            labels = keys
        else:
            mapping = read_map(groups)
            missing = [k for k in keys if k not in mapping]
            if missing:
                raise DataError(f"utterance {missing[0]!r} is not in {groups.file}"
                                + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + "; every utterance of the input needs its speaker there")
            labels = [mapping[k] for k in keys]
        memo[key] = (labels, lengths)
    return memo[key]


_LABELS: "weakref.WeakKeyDictionary[Stream, dict]" = weakref.WeakKeyDictionary()


def group_names(groups: KeyGroups, labels: Sequence[str],
                names: Optional[Sequence[str]] = None) -> tuple[list[str], np.ndarray]:
    """The group names and each sequence's group index, from the sequences' `labels`.

    `names` (e.g. a stats file's ``group_names``) fixes the names and their
    order; otherwise: utterances in input order, speakers sorted.

    Raises
    ------
    DataError
        A group not among `names`.
    """
    order = list(names) if names is not None else (list(labels) if groups.kind == "utterance"
                                                    else sorted(set(labels)))
    index = {name: i for i, name in enumerate(order)}
    unknown = [label for label in labels if label not in index]
    if unknown:
        raise DataError(f"group {unknown[0]!r} is not among the statistics' {len(order)} groups; fit them "
                        "on data with these keys")
    return order, np.fromiter((index[label] for label in labels), dtype=np.int64, count=len(labels))


class GroupIndexSource(ArraySource):
    """One group index per row: the group of the row's sequence (no file is read
    after opening; the map file, if any, is the identity recorded)."""

    def __init__(self, groups: KeyGroups, stream: Stream, names: Optional[Sequence[str]] = None) -> None:
        labels, lengths = sequence_labels(groups, stream)
        self.names, self._groups = group_names(groups, labels, names)
        self._ends = np.cumsum(lengths)
        self.path = groups.file or stream.sources[0].path
        self.name = f"--groups {groups.spec}"
        self.shape, self.dtype = (int(self._ends[-1]),), np.dtype(np.int64)
        self._identity = _identity(os.stat(self.path))

    def frames(self) -> np.ndarray:
        """The rows of each group."""
        lengths = np.diff(np.r_[0, self._ends])
        return np.bincount(self._groups, weights=lengths, minlength=len(self.names)).astype(np.int64)

    def read_into(self, start: int, out: np.ndarray) -> None:
        rows = np.arange(start, start + out.shape[0])
        out[...] = self._groups[np.searchsorted(self._ends, rows, side="right")]


def short_groups(source: GroupIndexSource, ddof: int) -> list[str]:
    """The names of `source`'s groups with at most `ddof` rows (no variance can be had from them)."""
    return [source.names[g] for g in np.flatnonzero(source.frames() <= ddof)]


def group_stream(groups: KeyGroups, stream: Stream) -> Stream:
    """The side stream of group indices for `stream`'s rows (named by ``groups.names`` if set)."""
    return Stream([GroupIndexSource(groups, stream, groups.names)])
