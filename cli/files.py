"""Wiring of :class:`normstats.files.CommandFiles` into the commands.

Options whose value may be a file read while click parses (``--gamma``,
``--beta``, fit-centers' ``--init``) keep the spec they were given, so the
command can declare the file among its inputs.
"""

from __future__ import annotations

from typing import Any, Optional

import click

from normstats.files import CommandFiles
from normstats.writers.atomic import overwriting

SPECS = "normstats.file_specs"  # ctx.meta key: parameter name -> the file spec it was given
FILES = "normstats.command_files"  # ctx.meta key: the command's CommandFiles, once guarded


class KeepsSpec(click.ParamType):
    """`inner`, remembering the spec of a value that was read from a file."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner, self.name = inner, inner.name

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        converted = self.inner.convert(value, param, ctx)
        read = converted is not None and not isinstance(converted, (str, int, float))
        if read and isinstance(value, str) and ctx is not None and param is not None:
            ctx.meta.setdefault(SPECS, {})[param.name] = value  # a file was read
        return converted

    def get_metavar(self, *args: Any, **kwargs: Any) -> Optional[str]:
        return self.inner.get_metavar(*args, **kwargs)


def given_file(ctx: click.Context, name: str) -> Optional[str]:
    """The file spec the option `name` was given, if its value was read from a file."""
    return ctx.meta.get(SPECS, {}).get(name)


def guard(ctx: click.Context, files: CommandFiles, *, force: bool) -> None:
    """Check `files` before any work; for the rest of the command, outputs replace an
    existing file only with --force (not one that appeared while the command ran)."""
    files.check(force=force)
    ctx.meta[FILES] = files
    ctx.with_resource(overwriting(force))


def guarded_files() -> Optional[CommandFiles]:
    """The files the running command declared to :func:`guard` (None outside a guarded command)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(FILES) if ctx is not None else None
