"""Drivers: feed streamed blocks to a state object, or through a normalizer.

A fit is ``for block in stream: state.update(block)``; these functions add
block sizing, alignment of per-row side data (labels, groups, weights),
checkpoints, progress and provenance, and nothing else.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from ._version import __version__
from .assign import NearestCenters
from .batchnorm import BatchNormEMA, BatchNormExact, batchnorm_state
from .centers import CentersEMA, CentersExact, centers_state
from .recipe import Recipe, State
from .errors import DataError, RowError, UsageError
from .normalize import Normalizer
from .flush_ahead import flush_ahead
from .normalize_pieces import PieceNormalizer
from .readers.parallel import ordered_map, parallel_stream
from .row_pieces import piece_shape, row_template
from .stream import Stream, block_rows_for, rows_per_block
from .stats import BATCHNORM, Stats, check_values
from .writers.h5_chunked import CompressedArrayWriter
from .writers.rows import ArrayWriter, DatasetsWriter

Progress = Optional[Callable[[int], None]]
Checkpoint = Optional[Callable[[object, int], None]]


def aligned_blocks(
    stream: Stream, side: dict[str, Stream], block_rows: int, start_row: int, stop_row: Optional[int] = None,
    *, read_ahead: bool = True,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Blocks of `stream` with the same rows of each per-row side stream (`read_ahead`:
    read in threads while the caller works, see :meth:`Stream.blocks`)."""
    check_side(stream, side)
    blocks = [s.blocks(block_rows, start_row, stop_row, prefetch=read_ahead) for s in [stream, *side.values()]]
    for block, *extras in zip(*blocks):
        yield block, dict(zip(side, extras))


def normalized_blocks(normalizer: Normalizer, stream: Stream, side: dict[str, Stream],
                      block_rows: int) -> Iterator[np.ndarray]:
    """The rows of `stream` normalized block by block (each a reused buffer);
    an error about a row names its file and row."""
    done = 0
    for block, extras in aligned_blocks(stream, side, block_rows, 0):
        try:
            normalized = normalizer(block, **extras)
        except RowError as error:
            raise _located(error, stream, side, done + error.row) from None
        yield normalized
        done += block.shape[0]


def normalized_rows(normalizer: Normalizer, stream: Stream, side: dict[str, Stream]
                    ) -> Iterator[tuple[int, Iterator[tuple[int, np.ndarray]]]]:
    """apply for rows larger than a read block: ``(row, pieces)`` per row, `pieces`
    yielding ``(e0, normalized)`` for pieces of at most a block (each a reused
    buffer, to be written at its place before the next; an error names file and row)."""
    pieces_of = PieceNormalizer(normalizer)
    for (row, pieces), extras in zip(stream.wide_rows(), side_rows(stream, side, 0, None)):
        yield row, _normalized_pieces(pieces_of, pieces, extras.get("groups"), stream, side, row)


def in_pieces(normalizer: Normalizer, stream: Stream) -> bool:
    """Whether apply takes `stream`'s rows in pieces: rows larger than a read block,
    unless the normalizer holds whole batches (``--batch-stats``, under its own
    memory limit), whose statistics need every row of the batch at once."""
    return stream.wide and getattr(normalizer, "batch_size", None) is None


def _normalized_pieces(pieces_of: PieceNormalizer, pieces: Iterator[tuple[int, np.ndarray]],
                       group: Optional[np.ndarray], stream: Stream, side: dict[str, Stream],
                       row: int) -> Iterator[tuple[int, np.ndarray]]:
    try:
        for e0, piece in pieces:
            yield e0, pieces_of(piece, e0, group)
    except RowError as error:
        raise _located(error, stream, side, row + error.row) from None


def _located(error: RowError, stream: Stream, side: dict[str, Stream], row: int) -> RowError:
    """`error` placed at `row` of the stream it is about (the features or a side input)."""
    return error.located(*(side[error.side] if error.side else stream).locate(row))


def check_side(stream: Stream, side: dict[str, Stream]) -> None:
    """Per-row side streams must have the features' rows; labels and groups, integers."""
    for name, other in side.items():
        if other.rows != stream.rows:
            raise DataError(
                f"{other.rows} {name} ({', '.join(other.names)}) for {stream.rows} feature rows "
                f"({', '.join(stream.names)}); they must have the same number of rows"
            )
        if name in ("labels", "groups") and other.dtype.kind not in "iu":
            raise DataError(
                f"{', '.join(other.names)}: {name} have dtype {other.dtype}; they must be integers"
            )


def run_fit(
    state: State,
    stream: Stream,
    *,
    side: Optional[dict[str, Stream]] = None,
    start_row: int = 0,
    block_rows: Optional[int] = None,
    progress: Progress = None,
    checkpoint: Checkpoint = None,
    max_memory: Optional[int] = None,
    spend: bool = False,
) -> Stats:
    """Stream the rows of `stream` (from `start_row` on) through `state`.

    Parameters
    ----------
    state : state object
        Any estimator; its ``update`` takes each block and, by keyword, the
        same rows of every `side` stream.
    stream : Stream
        The feature shards, read in order.
    side : dict of str to Stream, optional
        Per-row data passed to ``update`` under its key ('labels', 'groups',
        'weights').
    start_row : int
        First row to read (to resume from a checkpoint).
    block_rows : int, optional
        Rows read per block (default about 8 MB); for a moving average
        rounded to whole batches, since the logical batches must not depend
        on it (exact fits take any block).
    progress : callable, optional
        Called with the number of rows after each block.
    checkpoint : callable, optional
        Called with the state and the rows done after each block.
    max_memory : int, optional
        Bytes the state may take (default: the memory available); a larger
        state (many classes or groups of wide rows) is refused before any
        allocation.
    spend : bool
        Let the result take over the state's arrays where the state allows
        it (exact centers, exact per-group BatchNorm: no (classes, features)
        copies, so 100 000 classes need little more memory than their state);
        the state is unusable after.

    Returns
    -------
    Stats
        ``state.result()`` with the sources, time and bytes read added.

    Raises
    ------
    NonFiniteError
        Naming the shard and row of the first NaN / Inf (policy 'error').
    UsageError
        The state would not fit in memory.
    """
    side = side or {}
    recipe = Recipe.for_state(state)
    recipe.check_rows(stream.rows)
    if recipe.boundaries is not None:  # the boundaries count rows of `stream` (a resume starts inside it)
        state.grid_origin = state.position - start_row
    if state.row_shape is None:
        recipe.check_memory(stream.row_shape, row_bytes=stream.row_bytes, max_memory=max_memory)
    block_rows, open_batches = read_plan(stream.row_bytes, recipe, block_rows)
    started = time.perf_counter()
    if side or open_batches or stream.wide or not parallel_stream(stream):
        feed(state, stream, side, block_rows, start_row, None, progress, checkpoint, open_batches=open_batches)
    else:
        feed_parallel(state, stream, block_rows, start_row, progress, checkpoint)
    result = state.result(spend=True) if spend and isinstance(state, (CentersExact, BatchNormExact)) else state.result()
    return with_provenance(result, stream, side, time.perf_counter() - started, stream.rows - start_row)


def read_plan(row_bytes: int, recipe: Recipe, block_rows: Optional[int] = None) -> tuple[int, bool]:
    """Rows per read block, and whether logical batches span blocks.

    A moving average needs its blocks in whole batches; when one batch is
    larger than a block, the state accumulates it across blocks instead
    (memory stays bounded by the block), so the block keeps its size.
    """
    rows = block_rows or rows_per_block(row_bytes)
    if recipe.spans(rows):
        return rows, True
    return block_rows_for(row_bytes, recipe.row_unit, rows=rows), False


def with_provenance(stats: Stats, stream: Stream, side: dict[str, Stream], seconds: float, rows: int) -> Stats:
    """Add provenance to a fit's result: sources, and the `rows` this run read (fewer than
    ``rows_seen`` after a resume or an --init) in `seconds`."""
    stats.meta["sources"] = stream.names
    stats.meta["seconds"] = round(seconds, 6)
    stats.meta["rows_read"] = rows
    stats.meta["bytes_read"] = rows * stream.row_bytes
    for name, other in side.items():
        stats.meta[f"{name}_sources"] = other.names
    return stats


def feed(
    state: State,
    stream: Stream,
    side: dict[str, Stream],
    block_rows: int,
    start_row: int,
    stop_row: Optional[int],
    progress: Progress = None,
    checkpoint: Checkpoint = None,
    *,
    open_batches: bool = False,
    read_ahead: bool = True,
) -> None:
    """Update `state` with rows ``start_row:stop_row`` of `stream`, block by block.

    The state numbers rows from its ``first_row`` (the stream row of its
    first row in a split fit); an error is located in `stream` by that.
    With `open_batches` (see :func:`read_plan`) a batch spans blocks and a
    checkpoint is taken only between batches. Without `read_ahead`, each block
    is read in this thread, then reduced while it is in the cache: what a worker
    does when the other cores run workers too.
    """
    if stream.wide:
        feed_rows(state, stream, side, start_row, stop_row, progress, checkpoint)
        return
    done = start_row
    more = {"more": True} if open_batches else {}
    cuts = checkpoint is not None and open_batches and hasattr(state, "last_start")
    for block, extras in aligned_blocks(stream, side, block_rows, start_row, stop_row, read_ahead=read_ahead):
        rows = block.shape[0]
        # A batch open at every block end would never let a checkpoint be taken: with one due,
        # the block is fed in two parts, split where its last batch starts.
        cut = state.last_start(rows) if cuts and state.row_shape is not None else 0
        for a, b in ((0, cut), (cut, rows)) if cut else ((0, rows),):
            try:
                state.update(block[a:b], **{k: v[a:b] for k, v in extras.items()}, **more)
            except RowError as error:
                raise _located(error, stream, side, error.row - state.first_row) from None
            done += b - a
            if checkpoint and not getattr(state, "open_rows", 0):
                checkpoint(state, done)
        if progress:
            progress(rows)
    if open_batches:
        state.close()


def feed_rows(
    state: State,
    stream: Stream,
    side: dict[str, Stream],
    start_row: int,
    stop_row: Optional[int],
    progress: Progress = None,
    checkpoint: Checkpoint = None,
) -> None:
    """:func:`feed` for rows larger than a read block: each row read in pieces of
    at most a block (:meth:`Stream.wide_rows`) into the state's ``update_row``,
    which folds once per row or batch as ``update`` does. A batch stays open
    across rows; a checkpoint is taken only between batches."""
    template = row_template(stream.row_shape, stream.dtype)
    done = start_row
    for (row, pieces), extras in zip(stream.wide_rows(start_row, stop_row),
                                     side_rows(stream, side, start_row, stop_row)):
        try:
            state.update_row(pieces, template, **extras)
        except RowError as error:
            raise _located(error, stream, side, error.row - state.first_row) from None
        done += 1
        if checkpoint and not getattr(state, "open_rows", 0):
            checkpoint(state, done)
        if progress:
            progress(1)
    if hasattr(state, "close"):
        state.close()


def side_rows(stream: Stream, side: dict[str, Stream], start_row: int,
              stop_row: Optional[int]) -> Iterator[dict[str, np.ndarray]]:
    """The per-row side data of rows ``start_row:stop_row``, one row at a time (each
    value an array of one row), read in blocks; endless without side streams."""
    check_side(stream, side)
    if not side:
        while True:
            yield {}
    names = list(side)
    rows = min(rows_per_block(other.row_bytes) for other in side.values())  # the same rows in each block
    blocks = [side[name].blocks(rows, start_row, stop_row) for name in names]
    for parts in zip(*blocks):
        for i in range(parts[0].shape[0]):
            yield {name: part[i:i + 1] for name, part in zip(names, parts)}


def feed_parallel(state: State, stream: Stream, block_rows: int, start_row: int, progress: Progress = None,
                  checkpoint: Checkpoint = None) -> None:
    """:func:`feed` (no side streams, whole batches per block) with two readers, each
    reading a block and running the state's kernel on it (see
    :mod:`normstats.readers.parallel`), the sums folded in stream order: the same
    batches as one reader, exact sums to rounding."""
    block_work = getattr(state, "block_work", lambda: None)
    done = start_row
    if block_work() is None and done < stream.rows:
        # No first block read apart (with its own buffer and a serial pass, ~15 % of a 1 GB
        # fit): the stream's row shape starts a moving average, and an exact state takes the
        # shift a first update would take from the first rows (the same sums to the bit).
        state.update(np.empty((0,) + stream.row_shape, stream.dtype))
        if block_work() is None and hasattr(state, "pilot_rows"):
            first = next(stream.blocks(state.pilot_rows(), done, done + state.pilot_rows()))
            block_work = functools.partial(state.block_work, first)
        if block_work() is None:
            done = min(stream.rows, done + block_rows)
            feed(state, stream, {}, block_rows, start_row, done, progress, checkpoint)
    work = block_work()
    if work is None:
        feed(state, stream, {}, block_rows, done, None, progress, checkpoint)
        return
    base = state.position - done  # the state's position of stream row 0

    def reduce(x: np.ndarray, row: int, scratch) -> object:
        return work(x, base + row, scratch)

    try:
        for rows, sums in ordered_map(stream, block_rows, done, reduce):
            state.take(sums, rows)
            done += rows
            if progress:
                progress(rows)
            if checkpoint:
                checkpoint(state, done)
    except RowError as error:
        raise _located(error, stream, {}, error.row - state.first_row) from None


def fit_batchnorm(state: Union[BatchNormEMA, BatchNormExact], stream: Stream, **options) -> Stats:
    """Fit BatchNorm statistics over `stream` (see :func:`run_fit` for options)."""
    return run_fit(state, stream, **options)


def fit_centers(
    state: Union[CentersEMA, CentersExact], features: Stream, labels: Stream, **options
) -> Stats:
    """Fit centers over `features` with their `labels` (see :func:`run_fit`)."""
    side = dict(options.pop("side", None) or {}, labels=labels)
    return run_fit(state, features, side=side, **options)


def state_from_stats(stats: Stats, **options) -> State:
    """The exact state object stored in `stats`, ready to update or merge."""
    if stats.kind == BATCHNORM:
        return batchnorm_state(stats.mode, init=stats, **options)
    return centers_state(int(stats.meta["num_classes"]), stats.mode, init=stats, **options)


def merge_stats(parts: Sequence[Stats], names: Optional[Sequence[str]] = None) -> Stats:
    """Combine exact statistics fitted on shards into those of all the shards.

    Parameters
    ----------
    parts : sequence of Stats
        Exact-mode results of one kind with the same axes, shapes and options.
    names : sequence of str, optional
        Where each part came from, for messages.

    Raises
    ------
    UsageError
        A part was fitted with ``mode='ema'`` (moving averages do not merge).
    DataError
        The parts differ in kind, axes, shape, classes or options.
    """
    names = list(names or [f"part {i + 1}" for i in range(len(parts))])
    if not parts:
        raise UsageError("nothing to merge")
    for stats, name in zip(parts, names):
        check_values(stats)
        if stats.mode != "exact":
            raise UsageError(
                f"{name} holds {stats.mode} statistics, which cannot be merged: a moving average "
                "depends on the order of all batches; fit the shards with --mode exact"
            )
        if stats.kind != parts[0].kind:
            raise DataError(f"{name} holds {stats.kind} statistics but {names[0]} holds {parts[0].kind}")
    merged = state_from_stats(parts[0])
    for stats, name in zip(parts[1:], names[1:]):
        try:
            merged.merge(state_from_stats(stats))
        except DataError as error:
            raise DataError(f"{name} does not fit {names[0]}: {error}") from None
    result = merged.result()
    result.meta["sources"] = [s for stats in parts for s in stats.meta.get("sources", [])]
    result.meta["merged_from"] = names
    return result


def apply_stats(
    normalizer: Normalizer,
    stream: Stream,
    output: str,
    *,
    groups: Optional[Stream] = None,
    dataset: Optional[str] = None,
    block_rows: Optional[int] = None,
    compression: Optional[str] = None,
    progress: Progress = None,
) -> dict:
    """Normalize every row of `stream` into `output` (`.npy` or HDF5), atomically.

    An HDF5 output's dataset is the one named in `output` (``out.h5:NAME``),
    else `dataset`, else the input's dataset name, else ``data``. With
    per-group statistics, `groups` gives each row's group. `compression`
    (``gzip`` / ``lzf``) writes the HDF5 dataset compressed in chunks.

    Returns
    -------
    dict
        rows, bytes read and seconds taken.
    """
    normalizer.check(stream.row_shape, stream.dtype, ", ".join(stream.names))
    dataset = dataset or stream.sources[0].dataset or "data"
    # Batch statistics (apply --batch-stats) need whole batches per block.
    block_rows = block_rows_for(stream.row_bytes, getattr(normalizer, "batch_size", None), rows=block_rows)
    side = {} if groups is None else {"groups": groups}
    started = time.perf_counter()
    dtype = normalizer.result_dtype(stream.dtype)
    # Rows larger than a block are written in pieces; compressed, one chunk per piece.
    wide = in_pieces(normalizer, stream)
    chunks = (1,) + piece_shape(stream.row_shape, *stream.piece_ranges()[0]) if wide else None
    writer = ArrayWriter(output, stream.shape, dtype, dataset=dataset) if compression is None else \
        CompressedArrayWriter(output, stream.shape, dtype, dataset=dataset, compression=compression, chunks=chunks)
    with writer, flush_ahead(getattr(writer, "temporary", None)) as flushing:
        if wide:
            for _, pieces in normalized_rows(normalizer, stream, side):
                for e0, piece in pieces:
                    writer.write_piece(e0, piece)
                    flushing.written(piece.nbytes)
                writer.end_row()
                if progress:
                    progress(1)
        else:
            for block in normalized_blocks(normalizer, stream, side, block_rows):
                writer.write(block)
                flushing.written(block.nbytes)
                if progress:
                    progress(block.shape[0])
    return {"rows": stream.rows, "bytes_read": stream.nbytes, "seconds": time.perf_counter() - started}


def assign_rows(
    nearest: NearestCenters,
    stream: Stream,
    output: str,
    *,
    meta: Optional[dict] = None,
    block_rows: Optional[int] = None,
    progress: Progress = None,
) -> dict:
    """Write the nearest centers of every row of `stream` to the HDF5 file `output`, atomically.

    The file holds ``labels`` (int64) and ``distances`` (float64), of shape
    (rows,) for ``top_k == 1``, else (rows, top_k), nearest first, and as
    attributes the options, the inputs and the classes used.

    Parameters
    ----------
    nearest : NearestCenters
        The centers and options.
    stream : Stream
        Feature rows of the centers' row shape.
    output : str
        ``.h5`` path.
    meta : dict, optional
        More attributes to store (e.g. ``centers``: the centers file).
    block_rows : int, optional
        Rows per read block (default about 8 MB).
    progress : callable, optional
        Called with the number of rows after each block.

    Returns
    -------
    dict
        rows, bytes read, seconds, rejected rows (label -1 first), classes
        used and excluded.

    Raises
    ------
    RowError
        Naming the shard and row of a row holding NaN or Inf.
    """
    nearest.check(stream.row_shape, stream.dtype, ", ".join(stream.names))
    block_rows = block_rows or block_rows_for(stream.row_bytes, None)
    shape = (stream.rows,) + nearest.output_shape
    attrs = dict(
        meta or {},
        metric=nearest.metric, top_k=nearest.top_k, max_distance=nearest.max_distance,
        num_classes=nearest.num_classes, classes_used=int(nearest.classes.size),
        classes_excluded=int(nearest.excluded.size), rows=stream.rows, sources=stream.names,
        input_dtype=str(stream.dtype), normstats_version=__version__,
    )
    arrays = {"labels": (shape, np.int64), "distances": (shape, np.float64)}
    started = time.perf_counter()
    done = rejected = 0
    # Rows larger than a read block are compared piece by piece, one row at a time.
    if stream.wide:
        blocks, find = ((pieces, 1) for _, pieces in stream.wide_rows()), nearest.nearest_in_pieces
    else:
        blocks, find = ((block, block.shape[0]) for block in stream.blocks(block_rows)), nearest
    with DatasetsWriter(output, arrays, attrs) as writer:
        for block, rows in blocks:
            try:
                labels, distances = find(block)
            except RowError as error:
                raise error.located(*stream.locate(done + error.row)) from None
            writer.write(labels=labels, distances=distances)
            rejected += int(np.count_nonzero(labels.reshape(len(labels), -1)[:, 0] < 0))
            done += rows
            if progress:
                progress(rows)
    return {"rows": stream.rows, "bytes_read": stream.nbytes, "seconds": time.perf_counter() - started,
            "rejected": rejected, "classes": int(nearest.classes.size),
            "excluded": int(nearest.excluded.size)}
