"""Click parameter types: option values validated where they are parsed."""

from __future__ import annotations

from typing import Any, Optional

import click

from normstats.axes import parse_axes
from normstats.errors import NormstatsError, StatsFileError
from normstats.stats import CENTERS
from normstats.stores import read_array, read_stats


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


class FloatOrNone(click.ParamType):
    """A number, or ``none`` to disable the statistic (returned as None)."""

    name = "VALUE|none"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "none":
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(f"expected a number or 'none', got {value!r}", param, ctx)


class ValueOrFile(click.ParamType):
    """A number, ``none``, or an array file (``.npy``, ``.npz``, ``file.h5:NAME``)."""

    name = "VALUE|FILE|none"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str):
            return value
        if value.lower() == "none":
            return None
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return read_array(value)
        except NormstatsError as error:
            self.fail(str(error), param, ctx)


class CenterInit(click.ParamType):
    """``random``, ``zeros``, ``first``, a file of initial centers, or a centers
    stats file to continue from (read here)."""

    name = "random|zeros|first|FILE"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str) or value in ("random", "zeros", "first"):
            return value
        try:
            return read_stats(value).require(CENTERS, value)
        except StatsFileError:
            pass  # not a normstats file: an array of centers
        except NormstatsError as error:
            self.fail(str(error), param, ctx)
        try:
            return read_array(value)
        except NormstatsError as error:
            self.fail(f"not random, zeros or first, and not a readable centers file: {error}", param, ctx)


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


def positive_int(ctx: click.Context, param: click.Parameter, value: Optional[int]) -> Optional[int]:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value
