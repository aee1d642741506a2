"""Drivers: feed streamed blocks to a state object, or through a normalizer.

A fit is ``for block in stream: state.update(block)``; these functions add
the block sizing, label alignment, progress callback and provenance, and
nothing else.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Union

from .batchnorm import BatchNormEMA, BatchNormExact
from .centers import CentersEMA, CentersExact
from .errors import DataError
from .normalize import Normalizer, output_dtype
from .sources import Stream, block_rows_for
from .stats import Stats
from .stores import ArrayWriter

Progress = Optional[Callable[[int], None]]
BatchNormState = Union[BatchNormEMA, BatchNormExact]
CentersState = Union[CentersEMA, CentersExact]


def _provenance(stats: Stats, stream: Stream, seconds: float, **extra) -> Stats:
    stats.meta["sources"] = stream.names
    stats.meta["seconds"] = round(seconds, 6)
    stats.meta["bytes_read"] = stream.nbytes
    stats.meta.update(extra)
    return stats


def fit_batchnorm(
    state: BatchNormState, stream: Stream, *, block_rows: Optional[int] = None, progress: Progress = None
) -> Stats:
    """Stream every row of `stream` through `state`; return its result.

    Parameters
    ----------
    state : BatchNormEMA or BatchNormExact
    stream : Stream
        The feature shards, read in order.
    block_rows : int, optional
        Rows read per block (default about 8 MB, a whole number of batches).
    progress : callable, optional
        Called with the number of rows after each block.
    """
    block_rows = block_rows or block_rows_for(stream.row_bytes, state.batch_size)
    started = time.perf_counter()
    for block in stream.blocks(block_rows):
        state.update(block)
        if progress:
            progress(block.shape[0])
    return _provenance(state.result(), stream, time.perf_counter() - started)


def fit_centers(
    state: CentersState,
    features: Stream,
    labels: Stream,
    *,
    block_rows: Optional[int] = None,
    progress: Progress = None,
) -> Stats:
    """Stream features and their labels, in lockstep, through `state`."""
    if labels.rows != features.rows:
        raise DataError(
            f"{labels.rows} labels ({', '.join(labels.names)}) for {features.rows} feature rows "
            f"({', '.join(features.names)}); they must have the same number of rows"
        )
    block_rows = block_rows or block_rows_for(features.row_bytes, state.batch_size)
    started = time.perf_counter()
    for block, block_labels in zip(features.blocks(block_rows), labels.blocks(block_rows)):
        state.update(block, block_labels)
        if progress:
            progress(block.shape[0])
    stats = state.result()
    return _provenance(stats, features, time.perf_counter() - started, labels=labels.names)


def apply_stats(
    normalizer: Normalizer,
    stream: Stream,
    output: str,
    *,
    dataset: Optional[str] = None,
    block_rows: Optional[int] = None,
    progress: Progress = None,
) -> dict:
    """Normalize every row of `stream` into `output` (`.npy` or HDF5), atomically.

    An HDF5 output's dataset is the one named in `output` (``out.h5:NAME``),
    else `dataset`, else the input's dataset name, else ``data``.

    Returns
    -------
    dict
        rows, bytes read and seconds taken.
    """
    normalizer.check(stream.row_shape, stream.dtype, ", ".join(stream.names))
    dataset = dataset or stream.sources[0].dataset or "data"
    block_rows = block_rows or block_rows_for(stream.row_bytes, None)
    started = time.perf_counter()
    with ArrayWriter(output, stream.shape, output_dtype(stream.dtype), dataset=dataset) as writer:
        for block in stream.blocks(block_rows):
            writer.write(normalizer(block))
            if progress:
                progress(block.shape[0])
    return {"rows": stream.rows, "bytes_read": stream.nbytes, "seconds": time.perf_counter() - started}
