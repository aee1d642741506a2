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


class StatsFileError(DataError):
    """A stats or centers file is unreadable or does not fit the request."""
