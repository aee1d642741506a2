"""Sequence collections as outputs: what an output spec names, and its writer.

``ark:OUT.ark`` / ``ark,scp:OUT.ark,OUT.scp`` (Kaldi, :mod:`.kaldi_ark`) and
``OUT.h5:/`` / ``OUT.h5:/GROUP`` (one dataset per key, :mod:`.h5_collection`;
the leading slash names a group, as for inputs). Anything else is an array
output (:mod:`.rows`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import UsageError
from .h5_collection import H5CollectionWriter
from .kaldi_ark import KaldiArkWriter, parse_wspecifier

H5_GROUP = re.compile(r"\A(?P<path>.+\.(?:h5|hdf5)):(?P<group>/.*)\Z", re.I | re.S)


@dataclasses.dataclass(frozen=True)
class CollectionOutput:
    """Where a collection goes.

    Attributes
    ----------
    kind : {'kaldi', 'hdf5'}
    files : tuple of (path, formats)
        Every file written, with the extensions it may have.
    group : str
        HDF5: the group holding the keys.
    """

    spec: str
    kind: str
    files: tuple[tuple[str, tuple[str, ...]], ...]
    group: str = "/"

    @property
    def block_bytes(self) -> Optional[int]:
        """Bytes per read block that suit this output, None for the usual (three blocks
        are in flight: the read-ahead pair and the normalized one). An HDF5 group spends
        tens of MB on HDF5's metadata of the datasets it makes, and its sequences are
        written one by one whatever the block: 2 MB blocks (apply of 100 000 utterances
        73 -> 51 MB). A Kaldi archive writes faster from the usual blocks (2 MB ones were
        25 % slower)."""
        return None if self.kind == "kaldi" else 2 << 20

    def writer(self, keys: Sequence[str], lengths: Sequence[int], row_shape: tuple[int, ...], dtype: np.dtype,
               compression: Optional[str] = None) -> Union[KaldiArkWriter, H5CollectionWriter]:
        """The writer of these sequences (use it as a context manager)."""
        if self.kind == "kaldi":
            if compression is not None:
                raise uncompressed(self.spec)
            (ark, _), *scp = self.files
            return KaldiArkWriter(ark, scp[0][0] if scp else None, keys, lengths, row_shape, dtype)
        return H5CollectionWriter(self.files[0][0], self.group, keys, lengths, row_shape, dtype,
                                  compression=compression)


def collection_output(spec: str) -> Optional[CollectionOutput]:
    """The collection that output `spec` names, or None for an array output.

    >>> collection_output("ark,scp:o.ark,o.scp").files
    (('o.ark', ('.ark',)), ('o.scp', ('.scp',)))
    >>> collection_output("o.h5:/train").group, collection_output("o.h5:train")
    ('/train', None)
    """
    kaldi = parse_wspecifier(spec)
    if kaldi is not None:
        ark, scp = kaldi
        files = ((ark, (".ark",)),) + (((scp, (".scp",)),) if scp else ())
        return CollectionOutput(spec, "kaldi", files)
    match = H5_GROUP.match(spec)
    if match:
        return CollectionOutput(spec, "hdf5", ((match["path"], (".h5", ".hdf5")),), match["group"])
    return None


def uncompressed(spec: str) -> UsageError:
    """The refusal of --compression for an output that is not HDF5."""
    return UsageError(f"--compression is for HDF5 outputs, not {spec} (written as it is)")
