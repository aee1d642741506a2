"""A fit or an apply cut into independent tasks over row ranges, for any engine.

A task is plain data (file names, row counts, options), so it pickles to a
forked process or a Dask worker, opens its own read-only handles (HDF5
handles do not pickle) to the shards its rows touch, and runs the same state
object code as a serial fit. The states of the ranges combine in order:
exact ones by their (Chan) ``merge``, moving averages by ``follow``, which
appends a later range's batches. Both are associative, so engines may
combine them in a tree.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from .normalize import Normalizer
from .pipeline import feed, in_pieces, normalized_blocks, normalized_rows
from .readers.remote import absolute as absolute_path
from .recipe import Recipe, State
from .stream import Stream, open_window
from .writers.rows import RowRegion

FEATURES = "features"


def make_state(recipe: Union[Recipe, dict]) -> State:
    """A fresh state from a :class:`Recipe` (or its mapping form)."""
    return Recipe.of(recipe).build()


def join(earlier: State, later: State) -> State:
    """The state of two consecutive row ranges: `later` appended to `earlier`
    (``combine``: a Chan merge for exact states, appended batches for ema).

    Neither input changes: an engine may run a join again (Dask does, when a
    worker holding its result is lost) on the inputs it still holds.
    """
    return copy.deepcopy(earlier).combine(later)


def split_rows(rows: int, block_rows: int, *, parts: Optional[int] = None,
               rows_per_task: Optional[int] = None) -> list[tuple[int, int]]:
    """Cut ``range(rows)`` into ranges of whole read blocks (for a moving
    average the blocks are whole batches, so the ranges are too).

    Either into `parts` near-equal ranges, or into ranges of about
    `rows_per_task` rows (rounded to blocks, at least one block).
    """
    blocks = -(-rows // block_rows)
    if parts is None:
        per_task = max(1, (rows_per_task or rows) // block_rows)
        parts = -(-blocks // per_task)
        cuts = [block_rows * per_task * j for j in range(parts)] + [rows]
    else:
        cuts = [block_rows * (blocks * j // parts) for j in range(parts)] + [rows]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


@dataclass(frozen=True)
class Inputs:
    """The shards of a job's streams and their row counts: what a task needs to
    open its share. ``shards`` maps each stream ('features', 'labels',
    'weights', 'groups') to its (path, dataset, rows); ``dtypes`` to the whole
    stream's block dtype.
    """

    shards: dict
    dtypes: dict
    allow_external: bool

    @classmethod
    def of(cls, stream: Stream, side: dict[str, Stream], *, allow_external: bool,
           absolute: bool = False) -> "Inputs":
        """Describe opened streams; with `absolute`, by absolute paths (for
        workers that do not share this process's working folder)."""
        streams = {FEATURES: stream, **side}
        where = absolute_path if absolute else str  # (str keeps a URL's RemotePath and its storage options)
        return cls(
            shards={name: tuple((where(s.path), s.dataset, s.rows) for s in each.sources)
                    for name, each in streams.items()},
            dtypes={name: each.dtype.str for name, each in streams.items()},
            allow_external=allow_external,
        )

    @contextlib.contextmanager
    def open(self, start: int, stop: int) -> Iterator[tuple[Stream, dict[str, Stream]]]:
        """Rows ``start:stop`` of the features and of each side stream."""
        with contextlib.ExitStack() as stack:
            streams = {
                name: stack.enter_context(open_window(shards, start, stop, allow_external=self.allow_external,
                                                      dtype=np.dtype(self.dtypes[name])))
                for name, shards in self.shards.items()
            }
            features = streams.pop(FEATURES)
            yield features, streams


@dataclass(frozen=True)
class FitTask:
    """Fit rows ``start:stop``; returns the state to :func:`join` with the others.

    A moving-average state of a range after the first starts from zero (its
    contribution is appended with ``combine``). The state's ``first_row`` is
    `start`, so row numbers in errors count from the start of the whole
    stream while its counters count its own rows.
    """

    recipe: Recipe
    inputs: Inputs
    start: int
    stop: int
    block_rows: int
    open_batches: bool = False  # batches span read blocks (see pipeline.read_plan)
    read_ahead: bool = True  # a reader thread beside the reduction (see pipeline.feed)

    def __call__(self) -> State:
        state = self.recipe.build()
        if self.recipe.mode == "ema" and self.start > 0:
            state.zero_start()
        prelude = self.recipe.prelude(self.start)
        if prelude < self.start:  # the batches a pooled range needs before its own (not averaged)
            with self.inputs.open(prelude, self.start) as (stream, side), state.priming(prelude):
                feed(state, stream, side, self.block_rows, 0, None, open_batches=self.open_batches,
                     read_ahead=self.read_ahead)
        state.first_row = self.start
        with self.inputs.open(self.start, self.stop) as (stream, side):
            feed(state, stream, side, self.block_rows, 0, None, open_batches=self.open_batches,
                 read_ahead=self.read_ahead)
        return state


@dataclass(frozen=True)
class ApplyTask:
    """Normalize rows ``start:stop`` into the same rows of a preallocated output."""

    normalizer: Normalizer
    inputs: Inputs
    start: int
    stop: int
    block_rows: int
    target: RowRegion

    def __call__(self) -> int:
        row = self.start
        with self.inputs.open(self.start, self.stop) as (stream, side):
            if in_pieces(self.normalizer, stream):  # rows larger than a read block: written in pieces
                for local, pieces in normalized_rows(self.normalizer, stream, side):
                    for e0, piece in pieces:
                        self.target.write_piece(self.start + local, e0, piece)
                row = self.stop
            else:
                for block in normalized_blocks(self.normalizer, stream, side, self.block_rows):
                    self.target.write(row, block)
                    row += block.shape[0]
        self.target.sync()
        return row - self.start


def run(task: Union[FitTask, ApplyTask]) -> Union[State, int]:
    """Run one task (a module-level function, for process pools)."""
    return task()
