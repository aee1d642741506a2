"""Reduction axes: ``'auto'`` or a tuple, normalized against an input rank."""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from .errors import DataError, UsageError

AxesSpec = Union[str, Sequence[int]]


def parse_axes(text: str) -> AxesSpec:
    """Parse the command-line form of ``--axes``: ``auto`` or ``0,2,3``.

    Raises
    ------
    UsageError
        If the text is neither ``auto`` nor a comma-separated list of integers.
    """
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    try:
        axes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(
            f"--axes must be 'auto' or comma-separated integers such as 0,2,3, not {text!r}"
        ) from None
    return axes


def resolve_axes(axes: AxesSpec, ndim: int) -> tuple[int, ...]:
    """Return the sorted, non-negative reduction axes for an input of rank `ndim`.

    ``'auto'`` reduces every axis but the second (the channel axis), as
    BatchNorm does: ``(0,)`` for 1-D and 2-D input, ``(0, 2, 3)`` for 4-D.
    Axis 0 is the streaming (row) axis, so it must always be reduced: a
    statistic that keeps it would grow with the number of rows.

    Raises
    ------
    UsageError
        If an axis is out of range for `ndim`, repeated, or axis 0 is missing.
    """
    if ndim < 1:
        raise DataError("input has no axes; normstats needs at least one (the row axis)")
    if isinstance(axes, str):
        if axes != "auto":
            raise UsageError(f"axes must be 'auto' or a tuple of integers, not {axes!r}")
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


def kept_shape(row_shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a statistic: the input's axes that are not reduced.

    `row_shape` is the input shape without its first (row) axis.
    """
    return tuple(size for axis, size in enumerate(row_shape, start=1) if axis not in axes)


def broadcastable(stat: np.ndarray, axes: tuple[int, ...], row_shape: Sequence[int]) -> np.ndarray:
    """View `stat` (of the kept shape) with size-1 axes where `axes` reduced,
    so that it broadcasts against a batch of rows of `row_shape`."""
    return np.reshape(stat, [1] + [1 if axis in axes else size for axis, size in enumerate(row_shape, start=1)])
