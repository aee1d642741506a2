"""apply over sequence collections: each sequence normalized under its own key.

The input is one sequence collection (``scp:``, ``ark:``, ``file.h5:/group``);
the output another (:mod:`normstats.writers.collections`). Frames stream in
blocks as for an array output; each block is cut at the sequences' ends and
every piece written to its sequence, so memory is bounded by the read block
(and, for a Kaldi archive, which takes each matrix whole, the longest sequence).
"""

from __future__ import annotations

import time
from typing import Optional

from .errors import UsageError
from .normalize import Normalizer
from .pipeline import Progress, normalized_blocks
from .readers.base import SequenceSource
from .stream import Stream, block_rows_for
from .writers.base import split_output
from .writers.collections import CollectionOutput, collection_output, uncompressed


def apply_collection(normalizer: Normalizer, stream: Stream, output: CollectionOutput, *,
                     groups: Optional[Stream] = None, compression: Optional[str] = None,
                     block_rows: Optional[int] = None, progress: Progress = None) -> dict:
    """Normalize every sequence of `stream` into `output`, under the same keys, atomically.

    Parameters
    ----------
    normalizer : Normalizer
    stream : Stream
        One sequence collection.
    output : CollectionOutput
    groups : Stream, optional
        Each row's group, for per-group statistics (e.g. by key,
        :func:`normstats.keygroups.group_stream`).
    compression : {None, 'gzip', 'lzf'}
        HDF5 collections only.

    Returns
    -------
    dict
        rows, sequences, bytes read and seconds taken.

    Raises
    ------
    UsageError
        The input is not one sequence collection, or compression is asked
        of a Kaldi archive.
    """
    source = collection_of(stream, output.spec)
    normalizer.check(stream.row_shape, stream.dtype, ", ".join(stream.names))
    rows = max(1, output.block_bytes // stream.row_bytes) if output.block_bytes else None
    block_rows = block_rows or block_rows_for(stream.row_bytes, None, rows=rows)
    side = {} if groups is None else {"groups": groups}
    started = time.perf_counter()
    writer = output.writer(source.keys, source.lengths, stream.row_shape, normalizer.result_dtype(stream.dtype),
                           compression)
    with writer:
        row = 0
        for block in normalized_blocks(normalizer, stream, side, block_rows):
            for index, begin, end, offset in source.spans(row, block.shape[0]):
                writer.write(index, begin, block[offset:offset + end - begin])
            row += block.shape[0]
            if progress:
                progress(block.shape[0])
    return {"rows": stream.rows, "sequences": len(source.keys), "bytes_read": stream.nbytes,
            "seconds": time.perf_counter() - started}


def collection_of(stream: Stream, output: str) -> SequenceSource:
    """The one sequence collection `stream` reads, for an output that keeps its keys."""
    if len(stream.sources) != 1 or not isinstance(stream.sources[0], SequenceSource):
        raise UsageError(f"output {output} keeps the input's keys, and {', '.join(stream.names)} has none: "
                         "give a collection (scp:, ark:, file.h5:/group), or an array output (.npy, .h5)")
    return stream.sources[0]


def apply_output(output: str, compression: Optional[str], engine: str = "local") -> Optional[CollectionOutput]:
    """The collection `output` names (None for an array output), checked against the options.

    Raises
    ------
    UsageError
        Compression of a `.npy` or a Kaldi archive; a collection or compressed
        output on the Dask engine.
    """
    collection = collection_output(output)
    if compression is not None:
        path = split_output(output)[0] if collection is None else collection.files[0][0]
        if collection is not None and collection.kind == "kaldi" or path.lower().endswith(".npy"):
            raise uncompressed(output)
    if engine == "dask" and (collection is not None or compression is not None):
        what = "a collection output" if collection is not None else "--compression"
        raise UsageError(f"{what} runs on the local engine for now; leave out --engine dask")
    return collection


def collection_for(output: Optional[CollectionOutput], stream: Stream) -> Optional[CollectionOutput]:
    """The collection to write for `stream`: a Kaldi archive always (it needs keys), an HDF5
    group only for an input with keys (``out.h5:/a/b`` names a dataset for one without)."""
    if output is None or output.kind == "kaldi":
        return output
    sources = stream.sources
    return output if len(sources) == 1 and isinstance(sources[0], SequenceSource) else None
