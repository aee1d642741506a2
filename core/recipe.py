"""What a fit builds: one frozen description of its state, shared by every engine.

A :class:`Recipe` is plain data (kind, mode, options), so it pickles to
worker processes and Dask tasks; each builds its state from it with
:meth:`Recipe.build`. It also knows what the engines must respect: the
logical batch (block and range boundaries of a moving average fall on whole
batches, exact fits need none), what a row range after the first starts
from, and how much memory the state will take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np

from .batchnorm import BatchNormEMA, BatchNormExact, batchnorm_state
from .boundaries import BatchBoundaries
from .centers import CentersEMA, CentersExact, centers_state
from .errors import UsageError
from .stream import rows_per_block, wider_than_block
from .stats import BATCHNORM, CENTERS, Stats

State = Union[BatchNormEMA, BatchNormExact, CentersEMA, CentersExact]
KINDS = (BATCHNORM, CENTERS)


@dataclass(frozen=True)
class Recipe:
    """A fit's state, described.

    Parameters
    ----------
    kind : {'batchnorm', 'centers'}
    mode : {'ema', 'exact'}
    options : mapping
        Keyword options of the state (centers: ``num_classes`` among them;
        ``init``: a :class:`Stats` to continue from, or for ema centers an
        initial array / 'random' / 'zeros' / 'first').

    Examples
    --------
    >>> recipe = Recipe("batchnorm", "exact", {"batch_size": 256})
    >>> type(recipe.build()).__name__, recipe.row_unit
    ('BatchNormExact', None)
    """

    kind: str
    mode: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"a recipe builds {' or '.join(KINDS)} statistics, not {self.kind!r}")
        if self.mode not in ("ema", "exact"):
            raise UsageError(f"mode must be 'ema' or 'exact', got {self.mode!r}")
        if self.kind == CENTERS and "num_classes" not in self.options:
            raise UsageError("a centers recipe needs num_classes")

    @classmethod
    def of(cls, recipe: Union["Recipe", Mapping[str, Any]]) -> "Recipe":
        """A Recipe, also from the ``{"kind", "mode", "options"}`` mapping of earlier versions."""
        if isinstance(recipe, Recipe):
            return recipe
        return cls(recipe["kind"], recipe["mode"], dict(recipe.get("options", {})))

    @classmethod
    def for_state(cls, state: State) -> "Recipe":
        """What sizes `state`'s memory: its kind, mode and number of classes or groups."""
        kind = CENTERS if isinstance(state, (CentersEMA, CentersExact)) else BATCHNORM
        options = {"nan_policy": state.nan_policy, "batch_size": state.batch_size}
        for name in ("boundaries", "pool_batches"):
            if getattr(state, name, None) is not None:
                options[name] = getattr(state, name)
        options["num_classes" if kind == CENTERS else "num_groups"] = getattr(
            state, "num_classes" if kind == CENTERS else "num_groups", None)
        return cls(kind, state.mode, options)

    @property
    def batch_size(self) -> Optional[int]:
        return self.options.get("batch_size")

    @property
    def boundaries(self) -> Optional[BatchBoundaries]:
        """The rows where variable batches start (``--batch-boundaries``), if given."""
        return self.options.get("boundaries")

    @property
    def row_unit(self) -> Optional[int]:
        """Rows that block and range boundaries must be multiples of: the logical
        batch of a moving average; None for exact fits (any boundary will do) and
        for variable batches (the state keeps a batch open across blocks)."""
        return self.batch_size if self.mode == "ema" and self.boundaries is None else None

    def check_rows(self, rows: int) -> None:
        """Refuse batch boundaries beyond an input of `rows` rows (before anything is read)."""
        if self.boundaries is not None:
            self.boundaries.check_rows(rows)

    @property
    def continues(self) -> bool:
        """Whether the state starts from a stats file (``init`` a :class:`Stats`)."""
        return isinstance(self.options.get("init"), Stats)

    def build(self) -> State:
        """A fresh state object."""
        options = dict(self.options)
        if self.kind == BATCHNORM:
            return batchnorm_state(self.mode, **options)
        return centers_state(options.pop("num_classes"), self.mode, **options)

    def later(self) -> "Recipe":
        """The recipe of a row range after the first, when a fit is split.

        Its moving-average state starts from zero (``zero_start``) and is
        appended to the earlier ones, so initial ema centers (possibly
        K x D) need not travel with it.

        Raises
        ------
        UsageError
            The fit continues a stats file: every range would count that
            file's population (or counters) again.
        """
        self.check_splittable()
        if self.kind == CENTERS and self.mode == "ema":
            return Recipe(self.kind, self.mode, dict(self.options, init="zeros"))
        return self

    def check_splittable(self) -> None:
        """Refuse a split fit that continues a stats file, pools batches or has
        variable batches (a range would need the batches before it)."""
        if self.boundaries is not None:
            raise UsageError(
                "--batch-boundaries runs in one process: a row range after the first would need "
                "its batches cut from the boundaries; use --jobs 1 and --engine local"
            )
        if self.continues:
            raise UsageError(
                "a fit that continues a stats file (init) cannot be split into row ranges: each "
                "range would add the file's population again; run it in one process, or fit the "
                "new rows apart and merge the files"
            )

    def prelude(self, start: int) -> int:
        """The first row a range starting at `start` reads before its own rows: a pooled
        moving average primes its buffer with the K-1 batches before it (else `start`)."""
        pool = self.options.get("pool_batches")
        if self.mode != "ema" or not pool or not start:
            return start
        return max(0, start - (int(pool) - 1) * int(self.batch_size or 0))

    def state_bytes(self, row_shape: tuple[int, ...]) -> int:
        """Memory the state and its result take at most, for rows of `row_shape`."""
        elements = int(np.prod(row_shape, dtype=np.int64))
        omit = self.options.get("nan_policy") == "omit"
        if self.kind == CENTERS:
            rows = int(self.options["num_classes"])
            # exact: shift, offset, m2 (+ count) held; centers, var (+ weight) built by result()
            arrays = (5 + 2 * omit) if self.mode == "exact" else 3  # ema: centers, first means, result
            return 8 * rows * (elements * arrays + 4)
        groups = int(self.options.get("num_groups") or 1)
        # per statistic: shift, offset, m2 (+ count) held, five arrays built by result()
        held = 8 * groups * (elements * (8 + omit) + 2)
        pooled = int(self.options.get("pool_batches") or 0)  # count, mean, M2 of the last K batches, twice
        return held + 8 * 6 * pooled * elements

    def spans(self, block_rows: int) -> bool:
        """Whether a logical batch is larger than a read block of `block_rows` rows, or
        batches are variable (the state then accumulates a batch across blocks)."""
        if self.mode == "ema" and self.boundaries is not None:
            return True
        return bool(self.row_unit and self.row_unit > block_rows)

    def open_batch_bytes(self, row_shape: tuple[int, ...], row_bytes: int) -> int:
        """Bytes an ema centers state adds for a batch larger than a read block, which it
        accumulates across blocks (or rows larger than a block, which it takes one by
        one): per class a weight, a shift and a sum per feature."""
        opens = self.spans(rows_per_block(row_bytes)) or (self.mode == "ema" and wider_than_block(row_bytes))
        if self.kind != CENTERS or not opens:
            return 0
        features = int(np.prod(row_shape, dtype=object))
        return 8 * int(self.options["num_classes"]) * (2 * features + 1)

    def check_memory(self, row_shape: tuple[int, ...], *, copies: int = 1, row_bytes: int = 0,
                     max_memory: Optional[int] = None) -> None:
        """Refuse a state (with, for ema centers whose batches span read blocks of
        `row_bytes` rows, what it holds of the open batch) larger than `max_memory`
        bytes or than the memory available.

        Raises
        ------
        UsageError
            Naming the figure, before anything is allocated.
        """
        needed = (self.state_bytes(row_shape) + self.open_batch_bytes(row_shape, row_bytes)) * max(copies, 1)
        limit, where = (max_memory, "the max_memory given") if max_memory else (_available(), "available")
        if limit is not None and needed > limit:
            pooled = self.options.get("pool_batches")
            if pooled:
                what, remedy = f"a buffer of {pooled} pooled batches", "use a smaller --pool-batches"
            elif self.kind == CENTERS:
                what, remedy = f"{self.options['num_classes']} classes", "use fewer classes"
            else:
                groups = self.options.get("num_groups") or 1
                what, remedy = f"{groups} group{'s' if groups != 1 else ''}", "use fewer groups"
            raise UsageError(
                f"the {self.mode} {self.kind} state for {what} of rows shaped {tuple(row_shape)} needs "
                f"{_size(needed)} of memory, but {_size(limit)} are {where}; {remedy} (or more memory)"
            )


def _available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None if not hasattr(os, "sysconf") else _sysconf_available()


def _sysconf_available() -> Optional[int]:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return None


def _size(nbytes: float) -> str:
    """`nbytes` in decimal units: '614.4 MB'."""
    units = ("bytes", "KB", "MB", "GB", "TB", "PB", "EB")
    power = 0
    while nbytes >= 1000 and power < len(units) - 1:
        nbytes /= 1000
        power += 1
    return f"{nbytes:.0f} bytes" if power == 0 else f"{nbytes:.1f} {units[power]}"
