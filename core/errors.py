"""The one exception hierarchy of normstats.

Every error that a user can cause derives from :class:`NormstatsError`; the CLI
maps it, in one place, to a one-line ``Error: <message>`` and the exit code of
its class (1 for bad data, 2 for bad usage). Anything else is a bug.
"""

from __future__ import annotations


class NormstatsError(Exception):
    """Base class of every error that normstats reports to its user."""

    exit_code = 1


class DataError(NormstatsError):
    """The content of an input file is unusable (shape, dtype, values)."""

    exit_code = 1


class UsageError(NormstatsError, ValueError):
    """An option, argument or path is wrong as given."""

    exit_code = 2


class EngineError(NormstatsError):
    """The machinery running the work failed (e.g. Dask workers kept dying)."""

    exit_code = 1


class OutputError(NormstatsError):
    """The system refused to write an output (disk full, file-size limit); nothing was placed."""

    exit_code = 1


class StatsFileError(DataError):
    """A stats or centers file is unreadable or does not fit the request."""


class RowError(DataError):
    """A bad value in one row; once located, the message names file and row.

    Attributes
    ----------
    row : int
        Row of the value, counted from the first row of the array checked,
        or within `source` once :meth:`located` has placed it.
    problem : str
        What is wrong with it, and what to do.
    side : str or None
        Which per-row input holds it: None for the features, else
        'labels', 'groups' or 'weights'.
    source : str or None
        The file (and dataset) holding the row, once known.
    """

    def __init__(self, row: int, problem: str, *, side: str | None = None, source: str | None = None) -> None:
        self.row, self.problem, self.side, self.source = int(row), problem, side, source
        where = f"{source} row {self.row}" if source else f"row {self.row}"
        super().__init__(f"{where}: {problem}")

    def shifted(self, rows: int) -> "RowError":
        """The same error with its row counted `rows` further on."""
        return self._copy(self.row + rows, self.source)

    def located(self, source: str, row: int) -> "RowError":
        """The same error placed at `row` of the file `source`."""
        return self._copy(row, source)

    def _copy(self, row: int, source: str | None) -> "RowError":
        return RowError(row, self.problem, side=self.side, source=source)

    def __reduce__(self):  # errors cross process boundaries in parallel fits
        return _rebuild_row_error, (self.row, self.problem, self.side, self.source)


class NonFiniteError(RowError):
    """A NaN or infinite value where the NaN policy is 'error'.

    Attributes
    ----------
    index : tuple of int
        Position of the value within its row.
    value : float
    """

    def __init__(self, row: int, index: tuple, value: float, source: str | None = None) -> None:
        self.index, self.value = tuple(int(i) for i in index), value
        position = f"column {', '.join(map(str, self.index))} " if self.index else ""
        super().__init__(
            row,
            f"{position}holds {value}; clean the data or pass --nan-policy omit to leave such "
            "values out",
            source=source,
        )

    def _copy(self, row: int, source: str | None) -> "NonFiniteError":
        return NonFiniteError(row, self.index, self.value, source)

    def __reduce__(self):
        return NonFiniteError, (self.row, self.index, self.value, self.source)


def _rebuild_row_error(row: int, problem: str, side: str | None, source: str | None) -> RowError:
    return RowError(row, problem, side=side, source=source)
