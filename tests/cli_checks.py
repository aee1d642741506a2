"""Checks on a finished command-line run, shared by test files."""

from __future__ import annotations


def error_line(result) -> str:
    """The one ``Error:`` line of a failed run (and no traceback, nothing on stdout)."""
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert result.stdout == ""
    return lines[0]
