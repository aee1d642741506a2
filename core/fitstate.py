"""Bookkeeping shared by every state object: counters, row positions, continuation.

A state counts the rows and logical batches it has seen; ``first_row`` is the
stream row of its first row (0 for a serial fit, the range start for a task of
a split fit), so that errors name stream rows while the counters stay the
state's own. ``combine`` joins the state of the rows right after these.
"""

from __future__ import annotations

from typing import Optional

from ._version import __version__


class FitState:
    """Counters and their metadata; subclasses add the arithmetic."""

    kind = ""
    mode = ""

    def __init__(self, batch_size: Optional[int], nan_policy: str) -> None:
        self.batch_size = batch_size
        self.nan_policy = nan_policy
        self.first_row = 0  # the stream row of this state's first row
        self.rows_seen = 0
        self.batches_seen = 0
        self.row_shape: Optional[tuple[int, ...]] = None
        self.input_dtype: Optional[str] = None

    @property
    def position(self) -> int:
        """The stream row of the next row to come (for messages and batch counting)."""
        return self.first_row + self.rows_seen

    def batches_in(self, rows: int) -> int:
        """Logical batches that `rows` more rows complete or start, counted on the
        stream's batch grid (so the blocks the rows came in do not matter)."""
        if not self.batch_size:
            return 1 if rows else 0
        batch, start = self.batch_size, self.position
        return -(-(start + rows) // batch) - -(-start // batch)

    def _meta(self) -> dict:
        return {
            "normstats_version": __version__,
            "kind": self.kind,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "rows_seen": self.rows_seen,
            "batches_seen": self.batches_seen,
            "row_shape": list(self.row_shape),
            "input_dtype": self.input_dtype,
            "nan_policy": self.nan_policy,
        }

    def _restore_counters(self, meta: dict) -> None:
        self.row_shape = tuple(meta["row_shape"])
        self.input_dtype = meta["input_dtype"]
        self.rows_seen = int(meta["rows_seen"])
        self.batches_seen = int(meta["batches_seen"])

    def _add_counters(self, other: "FitState") -> None:
        self.rows_seen += other.rows_seen
        self.batches_seen += other.batches_seen

    def combine(self, later: "FitState") -> "FitState":
        """Join the state of the rows right after these (exact: merge; ema: follow)."""
        raise NotImplementedError


def file_options(meta: dict, options: dict, *names: str) -> dict:
    """Options a continued fit takes from its stats file unless given anew."""
    for name in names:
        if name in meta:
            options.setdefault(name, meta[name])
    return options
