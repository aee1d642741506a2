"""Checkpoints of a running fit, and where a fit resumed from one goes on."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Optional, Sequence

from .errors import DataError, UsageError
from .files import identities, identity_mismatch
from .stats import Stats
from .stream import Stream
from .writers.stats_files import write_stats


class Checkpointer:
    """Saves a running fit's state to `path`, atomically, at most every `every` seconds.

    The checkpoint is an ordinary stats file whose metadata also records how
    many rows of which inputs it covers (``meta['checkpoint']``: the shard
    names, and each input file's absolute path, dataset, size and
    modification time), so a later run can resume from it over the same
    files only (:func:`normstats.pipeline.resume_row`).
    """

    def __init__(self, path: str, every: float, *, sources: Sequence[str], rows_total: int,
                 inputs: Sequence[dict] = ()) -> None:
        self.path, self.every = path, float(every)
        self._info = {"sources": list(sources), "rows_total": int(rows_total), "inputs": list(inputs)}
        self._last = time.monotonic()

    def __call__(self, state: Any, rows_done: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every or rows_done >= self._info["rows_total"]:
            return
        try:
            stats = state.result()
        except DataError:  # too few rows so far for a result; the next block may do
            return
        stats.meta["checkpoint"] = dict(self._info, rows_done=int(rows_done))
        write_stats(stats, self.path, replace=True)  # its own file, replaced at each save
        self._last = now

    def remove(self) -> None:
        """Delete the checkpoint once the fit it protects is written."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def resume_row(checkpoint: Stats, stream: Stream, name: str = "checkpoint",
               side: Optional[dict[str, Stream]] = None) -> int:
    """The row of `stream` at which a fit saved in `checkpoint` goes on.

    A checkpoint that recorded its inputs' identities (absolute path,
    dataset, size, modification time; see :func:`normstats.files.identities`)
    resumes only over those very files, with `side` (labels, weights,
    groups) as when it was made.

    Raises
    ------
    UsageError
        The file is not a checkpoint, or was made over other inputs.
    """
    info = checkpoint.meta.get("checkpoint")
    if not info:
        raise UsageError(f"{name} is not a checkpoint (it records no rows done); use --init to continue from it")
    same = [os.path.basename(n) for n in info["sources"]] == [os.path.basename(n) for n in stream.names]
    if not same or int(info["rows_total"]) != stream.rows:
        raise UsageError(
            f"{name} was made over {', '.join(info['sources'])} ({info['rows_total']} rows), not over "
            f"{', '.join(stream.names)} ({stream.rows} rows); resume with the same inputs"
        )
    if info.get("inputs"):
        mismatch = identity_mismatch(info["inputs"], identities({"features": stream, **(side or {})}))
        if mismatch:
            raise UsageError(f"{name} was made over other files: {mismatch}; resume with the same inputs, "
                             "or start over without --resume")
    return int(info["rows_done"])
