"""fit-bn's options that depend on the input's layout: ``--channel-axis``, and
``--mean`` / ``--inv-std`` given as files of the statistics' shape."""

from __future__ import annotations

from typing import Optional

import click

import normstats as ns
from normstats.axes import AxesSpec, channel_spec, check_stat_shape, kept_shape, looks_channels_last, resolve_axes

from .files import given_file

INITIAL = ("mean", "inv_std")  # the options that may name a file of starting values


def fit_axes(axes: AxesSpec, channel_axis: Optional[int]) -> AxesSpec:
    """``--axes``, with ``--channel-axis A`` folded in as the spec ``'auto:A'``.

    ``--channel-axis`` goes with ``--axes auto`` only: it says which axis auto
    keeps, and an axes list already says every axis reduced.
    """
    if channel_axis is None:
        return axes
    if axes != "auto":
        raise click.UsageError("--channel-axis A reduces every axis but A, so it replaces an --axes list; "
                               "give one of them (--axes auto, the default, goes with --channel-axis)")
    return channel_spec(channel_axis)


def check_initial_files(ctx: click.Context, inputs: tuple, dataset: Optional[str], allow_external: bool,
                        axes: AxesSpec, start: Optional[ns.Stats]) -> None:
    """Refuse a ``--mean`` / ``--inv-std`` file whose array does not have the
    statistics' shape: that of the continued stats file, else the one the
    input's rows give (the input is opened for its shape only)."""
    given = {name: file for name in INITIAL if (file := given_file(ctx, name))}
    if not given:
        return
    if start is not None:
        row_shape, reduced = tuple(start.meta["row_shape"]), tuple(start.meta["axes"])
    else:
        with ns.open_stream(inputs, dataset, allow_external=allow_external) as stream:
            row_shape = tuple(stream.row_shape)
        reduced = resolve_axes(axes, len(row_shape) + 1)
    shape = kept_shape(row_shape, reduced)
    for name, spec in given.items():
        check_stat_shape(ctx.params[name], shape, f"the --{name.replace('_', '-')} file {spec}")


def channels_last_hint(stats: ns.Stats) -> Optional[str]:
    """A line for stderr when ``--axes auto`` kept axis 1 of rows that look
    channels-last (see :func:`normstats.axes.looks_channels_last`)."""
    row_shape = tuple(stats.meta["row_shape"])
    if not looks_channels_last(row_shape):
        return None
    return (f"hint: rows of shape {row_shape} look channels-last (H, W, C), and --axes auto kept axis 1: "
            f"these are {row_shape[0]} statistics per row of the image, not per channel; if the last axis "
            "holds the channels, fit with --channel-axis -1")
