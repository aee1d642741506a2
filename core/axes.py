"""Reduction axes: ``'auto'``, ``'auto:A'`` or a tuple, normalized against an input rank.

``'auto'`` keeps axis 1 (channels-first, as BatchNorm layers do); ``'auto:A'``
keeps axis ``A`` instead and reduces every other one, e.g. ``'auto:-1'`` for
channels-last input (N, H, W, C): statistics of shape (C,) whatever the rank.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import numpy as np

from .errors import DataError, UsageError

AxesSpec = Union[str, Sequence[int]]
CHANNEL_SPEC = re.compile(r"^auto:([+-]?\d+)$")


def parse_axes(text: str) -> AxesSpec:
    """Parse the command-line form of ``--axes``: ``auto``, ``auto:-1`` or ``0,2,3``.

    Raises
    ------
    UsageError
        If the text is neither ``auto[:A]`` nor a comma-separated list of integers.
    """
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    if CHANNEL_SPEC.match(text.lower()):
        return channel_spec(int(text.split(":")[1]))
    try:
        axes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(
            f"--axes must be 'auto' or comma-separated integers such as 0,2,3, not {text!r}"
        ) from None
    return axes


def channel_spec(channel_axis: int) -> str:
    """The axes spec that reduces every axis but `channel_axis` (counted on the
    input, so -1 is its last axis): ``'auto:-1'``.

    Raises
    ------
    UsageError
        `channel_axis` is 0, the row axis, which every statistic reduces.
    """
    channel_axis = int(channel_axis)
    if channel_axis == 0:
        raise UsageError("the channel axis cannot be axis 0, the row axis that is streamed and always "
                         "reduced; give the channels' axis counted on the input, e.g. -1 for (N, H, W, C)")
    return f"auto:{channel_axis}"


def channel_axis(axes: AxesSpec, ndim: int) -> Optional[int]:
    """The non-negative channel axis an ``'auto:A'`` spec keeps on `ndim`-D input
    (None for other specs).

    Raises
    ------
    UsageError
        ``A`` is out of range for `ndim`, or names axis 0 (the row axis).
    """
    found = CHANNEL_SPEC.match(axes) if isinstance(axes, str) else None
    if found is None:
        return None
    given = int(found.group(1))
    if not -ndim <= given < ndim:
        raise UsageError(f"channel axis {given} is out of range for {ndim}-D input (valid: {-ndim}..{ndim - 1}, "
                         "not 0); choose the axis that holds the channels")
    if given % ndim == 0:
        raise UsageError(f"channel axis {given} is axis 0 of {ndim}-D input, the row axis that every statistic "
                         "reduces; choose the axis that holds the channels")
    return given % ndim


def stored_axes(meta: dict) -> AxesSpec:
    """The axes spec a stats file was fitted with: ``'auto:A'`` when its metadata
    records a ``channel_axis``, else its axes."""
    if meta.get("channel_axis") is not None:
        return channel_spec(int(meta["channel_axis"]))
    return tuple(int(a) for a in meta["axes"])


def channel_meta(axes: AxesSpec, ndim: int) -> dict:
    """``{'channel_axis': A}`` (A non-negative, on the input) for an ``'auto:A'``
    spec, else nothing: what a stats file records of its layout besides its axes."""
    found = channel_axis(axes, ndim)
    return {} if found is None else {"channel_axis": found}


def check_channel_meta(meta: dict) -> Optional[str]:
    """What is wrong with a stats file's ``channel_axis`` (None if absent or right):
    it must be the one axis its reduction keeps."""
    if meta.get("channel_axis") is None:
        return None
    ndim = len(meta["row_shape"]) + 1
    kept = kept_axes(meta["axes"], ndim)
    if kept != [meta["channel_axis"]]:
        return (f"the metadata channel_axis {meta['channel_axis']!r} is not the one axis its axes "
                f"{list(meta['axes'])} keep on {ndim}-D input")
    return None


def resolve_axes(axes: AxesSpec, ndim: int) -> tuple[int, ...]:
    """Return the sorted, non-negative reduction axes for an input of rank `ndim`.

    ``'auto'`` reduces every axis but the second (the channel axis), as
    BatchNorm does: ``(0,)`` for 1-D and 2-D input, ``(0, 2, 3)`` for 4-D.
    ``'auto:A'`` reduces every axis but ``A``: ``'auto:-1'`` on 4-D input
    gives ``(0, 1, 2)``.
    Axis 0 is the streaming (row) axis, so it must always be reduced: a
    statistic that keeps it would grow with the number of rows.

    Raises
    ------
    UsageError
        If an axis is out of range for `ndim`, repeated, or axis 0 is missing.

    Examples
    --------
    >>> resolve_axes("auto", 4), resolve_axes("auto:-1", 4), resolve_axes("auto:2", 3)
    ((0, 2, 3), (0, 1, 2), (0, 1))
    """
    if ndim < 1:
        raise DataError("input has no axes; normstats needs at least one (the row axis)")
    if isinstance(axes, str):
        kept = channel_axis(axes, ndim)
        if kept is not None:
            return tuple(axis for axis in range(ndim) if axis != kept)
        if axes != "auto":
            raise UsageError(f"axes must be 'auto', 'auto:A' or a tuple of integers, not {axes!r}")
        return (0,) + tuple(range(2, ndim))
    resolved = []
    for axis in axes:
        axis = int(axis)
        if not -ndim <= axis < ndim:
            raise UsageError(
                f"axis {axis} is out of range for {ndim}-D input "
                f"(valid: {-ndim}..{ndim - 1}); choose --axes that fit the input rank"
            )
        resolved.append(axis % ndim)
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"axes {tuple(axes)} repeat an axis for {ndim}-D input")
    if 0 not in resolved:
        raise UsageError(
            f"axes {tuple(axes)} do not include axis 0, the row axis that is streamed; "
            "statistics must reduce over it"
        )
    return tuple(sorted(resolved))


def kept_axes(axes: Sequence[int], ndim: int) -> list[int]:
    """The axes of `ndim`-D input (rows at axis 0) a reduction over `axes` keeps."""
    return [axis for axis in range(ndim) if axis not in axes]


def kept_shape(row_shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a statistic: the input's axes that are not reduced.

    `row_shape` is the input shape without its first (row) axis.
    """
    return tuple(size for axis, size in enumerate(row_shape, start=1) if axis not in axes)


def broadcastable(stat: np.ndarray, axes: tuple[int, ...], row_shape: Sequence[int]) -> np.ndarray:
    """View `stat` (of the kept shape) with size-1 axes where `axes` reduced,
    so that it broadcasts against a batch of rows of `row_shape`."""
    return np.reshape(stat, [1] + [1 if axis in axes else size for axis, size in enumerate(row_shape, start=1)])


def check_stat_shape(value: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Return `value`, an array given per statistic (an initial mean, ...), if it
    has the statistics' `shape` (or is 0-d, a number for every statistic).

    Raises
    ------
    DataError
        ``WHAT holds an array of shape (...); the statistics have shape (...)``.
    """
    value = np.asarray(value)
    if value.ndim and value.shape != tuple(shape):
        raise DataError(f"{what} holds an array of shape {value.shape}; the statistics of this input have "
                        f"shape {tuple(shape)}: give an array of that shape")
    return value


CHANNELS_LAST_SIZES = (1, 3, 4)  # grey, RGB, RGBA
CHANNELS_LAST_MIN_SIDE = 8


def looks_channels_last(row_shape: Sequence[int]) -> bool:
    """Whether rows of 4-D input look like images stored channels-last, (H, W, C)
    with C in 1, 3 or 4 and both sides at least 8.

    The rule is narrow so that channels-first data does not meet it: there it
    would take rows (C, H, W) at least 8 x 8 wide whose last side is 1, 3 or 4,
    which no image or feature map of a normal network has.

    >>> looks_channels_last((32, 32, 3)), looks_channels_last((3, 32, 32)), looks_channels_last((64, 8, 8))
    (True, False, False)
    """
    row_shape = tuple(int(n) for n in row_shape)
    return (len(row_shape) == 3 and row_shape[2] in CHANNELS_LAST_SIZES
            and min(row_shape[:2]) >= CHANNELS_LAST_MIN_SIDE)
