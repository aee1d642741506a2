"""Click parameter types: option values validated where they are parsed."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import click

from normstats.axes import channel_spec, parse_axes
from normstats.errors import NormstatsError, StatsFileError, UsageError
from normstats.stats import CENTERS, check_values
from normstats.readers.remote import parse_storage_option
from normstats.readers.small_arrays import read_array
from normstats.specs import split_spec
from normstats.writers.stats_files import read_stats
from normstats.validate import SEED_MAX, check_alpha, check_eps, check_finite, check_max_distance

# More worker processes than this is a typo, not a machine (the planner would also build
# a list of that many row ranges).
JOBS_MAX = 1024


class OnceOption(click.Option):
    """An option that takes one value: given twice, it is a usage error.

    click keeps the last of repeated values ("--alpha 0.1 --alpha 0.5" means
    0.5; pallets/click#955 asks for a way to refuse it). Here the parser
    collects every occurrence, and more than one is refused before any value
    is converted. Flags, counters and ``multiple=True`` options are left as
    click makes them.
    """

    def _single(self) -> bool:
        return not (self.multiple or self.is_flag or self.count)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        if not self._single():
            return super().add_to_parser(parser, ctx)
        parser.add_option(obj=self, opts=self.opts, dest=self.name, action="append", nargs=self.nargs)

    def handle_parse_result(self, ctx: click.Context, opts: Any, args: list[str]) -> Any:
        given = opts.get(self.name) if self._single() else None
        if isinstance(given, list):  # the occurrences the parser appended
            if len(given) > 1 and not ctx.resilient_parsing:  # (shell completion parses leniently)
                times = "twice" if len(given) == 2 else f"{len(given)} times"
                raise click.UsageError(f"{self.opts[-1]} was given {times}; give it once", ctx)
            opts = {**opts, self.name: given[0]}
        return super().handle_parse_result(ctx, opts, args)


#: ``click.option`` for the commands: every option taking one value takes it once.
option = functools.partial(click.option, cls=OnceOption)


class Number(click.ParamType):
    """A float checked by a library validator (which raises UsageError)."""

    name = "float"

    def __init__(self, check: Callable[[float], Any]) -> None:
        self.check = check

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"expected a number, got {value!r}", param, ctx)
        try:
            self.check(number)
        except UsageError as error:
            self.fail(str(error), param, ctx)
        return number


def _seconds(seconds: float) -> float:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UsageError(f"seconds must be a finite number >= 0, got {seconds}")
    return seconds


ALPHA = Number(check_alpha)
EPS = Number(check_eps)
DISTANCE = Number(check_max_distance)
SECONDS = Number(_seconds)
SEED = click.IntRange(0, SEED_MAX)
JOBS = click.IntRange(1, JOBS_MAX)


class AxesType(click.ParamType):
    """``auto`` or comma-separated integers."""

    name = "auto|0,2,3"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return parse_axes(value)
        except NormstatsError as error:
            self.fail(str(error), param, ctx)


class ValueOrFile(click.ParamType):
    """A number, ``none`` (returned as None), or an array file (``.npy``,
    ``file.npz:NAME``, ``file.h5:NAME``, ``file.safetensors:NAME``), its values
    finite (and > 0 with `positive`)."""

    name = "VALUE|FILE|none"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str):
            return value
        if value.lower() == "none":
            return None
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if not math.isfinite(number) or (self.positive and not number > 0):
                self.fail(f"expected a finite number{' > 0' if self.positive else ''}, a file or 'none', "
                          f"got {value!r}", param, ctx)
            return number
        try:
            return check_finite(read_array(value), value, positive=self.positive)
        except NormstatsError as error:
            self.fail(str(error), param, ctx)


class ChannelAxis(click.ParamType):
    """An input axis other than 0 (the row axis), negative counting from the end."""

    name = "AXIS"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        try:
            axis = int(value)
        except (TypeError, ValueError):
            self.fail(f"expected an integer axis such as -1, got {value!r}", param, ctx)
        try:
            channel_spec(axis)  # refuses axis 0
        except NormstatsError as error:
            self.fail(str(error), param, ctx)
        return axis


class CenterInit(click.ParamType):
    """``random``, ``zeros``, ``first``, a file of initial centers, or a centers
    stats file to continue from (read here)."""

    name = "random|zeros|first|FILE"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str) or value in ("random", "zeros", "first"):
            return value
        try:
            # `file:NAME` names one array (no stats file is named so); else a centers file
            # to continue from, or a file of one array
            stats = None if split_spec(value)[1] else read_stats(value).require(CENTERS, value)
        except StatsFileError:
            stats = None  # not a normstats file: an array of centers
        except NormstatsError as error:
            self.fail(str(error), param, ctx)
        if stats is not None:
            try:
                return check_values(stats)
            except NormstatsError as error:
                self.fail(str(error), param, ctx)
        try:
            centers = read_array(value)
        except NormstatsError as error:
            self.fail(f"not random, zeros or first, and not a readable centers file: {error}", param, ctx)
        try:
            return check_finite(centers, value)
        except NormstatsError as error:
            self.fail(str(error), param, ctx)


class ShapeType(click.ParamType):
    """Comma-separated positive integers, e.g. ``64,32,32``."""

    name = "N[,N...]"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str):
            return value
        try:
            shape = tuple(int(part) for part in value.split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            self.fail(f"expected comma-separated positive integers such as 64,32,32, got {value!r}", param, ctx)
        return shape


def given(ctx: click.Context, name: str) -> bool:
    """Whether option `name` was set by the user (not left at its default)."""
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def check_mode_only(ctx: click.Context, mode: str, wanted: str, *names: str) -> None:
    """Options `names` that only mean something with ``--mode wanted``, refused when given without it."""
    for name in names:
        if mode != wanted and ctx.params.get(name) is not None:
            raise click.UsageError(f"--{name.replace('_', '-')} needs --mode {wanted}")


def positive_int(ctx: click.Context, param: click.Parameter, value: Optional[int]) -> Optional[int]:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


class StorageOption(click.ParamType):
    """``KEY=VALUE`` for fsspec, the value parsed as JSON when it parses (``anon=true``)."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_storage_option(value)
        except UsageError as error:
            self.fail(str(error), param, ctx)
