"""The batch-grid options of fit-bn and apply: --pool-batches, --pool-below,
--batch-boundaries and apply --batch-stats (the logic lives in normstats.pooling,
normstats.boundaries and normstats.batch_stats)."""

from __future__ import annotations

from typing import Any, Optional

import click

import normstats as ns
from normstats.batch_stats import BatchStatsNormalizer
from normstats.boundaries import SEQUENCES, read_boundaries, sequence_boundaries

from .params import check_mode_only, given, option, positive_int

POOL = (
    option("--pool-batches", type=int, callback=positive_int, metavar="K",
           help="Each batch's mean and variance pooled over the last K batches (this one included), "
                "weighted by element count: the reference layer's update_buffer_size, as it meant it "
                "(its code adds the current batch's inv_std where it meant the buffered ones)."),
    option("--pool-below", type=int, callback=positive_int, metavar="L",
           help="With --pool-batches: use the pool only for a batch with fewer than L elements per "
                "statistic (the layer's update_batch_limit); others keep their own statistics."),
)
BOUNDARIES = option(
    "--batch-boundaries", "batch_boundaries", metavar="FILE|sequences",
    help="ema: batches start at these rows instead of every --batch-size rows: a .npy or text file of "
         "increasing row offsets starting at 0, or 'sequences' (one batch per sequence of a collection: "
         "scp:, ark:, file.h5:/group). The elements per batch are stored (batch_elements).")
BATCH_STATS = option(
    "--batch-stats", is_flag=True,
    help="Training-mode output: normalize each batch of --batch-size rows with its own mean and inv_std "
         "(STATS then gives the axes, eps, ddof, the terms used and the shape of --gamma/--beta, not its "
         "values). A batch is held whole (at most 1 GB).")
APPLY_BATCH_SIZE = option("--batch-size", type=int, callback=positive_int, metavar="B",
                          help="Rows per batch of --batch-stats  [default: the stats file's batch size]")


def _pool_options(params: dict[str, Any]) -> dict[str, Any]:
    """``pool_batches`` / ``pool_below`` as given (empty without --pool-batches)."""
    if params.get("pool_batches") is None:
        if params.get("pool_below") is not None:
            raise click.UsageError("--pool-below needs --pool-batches K")
        return {}
    return {"pool_batches": params["pool_batches"], "pool_below": params.get("pool_below")}


def fit_grid_options(ctx: click.Context, mode: str, inputs: tuple[str, ...], dataset: Optional[str],
                     allow_external: bool) -> dict[str, Any]:
    """The state options of fit-bn's --pool-batches, --pool-below and --batch-boundaries
    (empty when none is given); the boundaries are read and checked here."""
    params = ctx.params
    names = ("pool_batches", "pool_below", "batch_boundaries")
    if all(params.get(name) is None for name in names):
        return {}
    check_mode_only(ctx, mode, "ema", *names)
    if params.get("batch_boundaries") is not None and (params.get("jobs", 1) > 1 or params.get("engine") == "dask"):
        raise click.UsageError("--batch-boundaries runs in one process (a row range would need its batches cut "
                               "from the boundaries); use --jobs 1 and --engine local")
    options = _pool_options(params)
    spec = params.get("batch_boundaries")
    if spec is not None:
        if given(ctx, "batch_size"):
            raise click.UsageError("--batch-boundaries replaces --batch-size; give one of them")
        options.update(boundaries=_boundaries(spec, inputs, dataset, allow_external), batch_size=None)
    return options


def boundaries_file(spec: Optional[str]) -> Optional[str]:
    """The file a --batch-boundaries value reads (None for none or 'sequences')."""
    return None if spec is None or spec == SEQUENCES else spec


def _boundaries(spec: str, inputs: tuple[str, ...], dataset: Optional[str], allow_external: bool) -> Any:
    if spec != SEQUENCES:
        return read_boundaries(spec)
    with ns.open_stream(inputs, dataset, allow_external=allow_external) as stream:
        return sequence_boundaries(stream.sources)


def batch_stats_normalizer(ctx: click.Context, stats: ns.Stats, stats_path: str, *, gamma: Any, beta: Any,
                           dtype: Optional[str], engine: str, groups: Optional[str]) -> Optional[ns.Normalizer]:
    """apply's normalizer for --batch-stats (None without it)."""
    params = ctx.params
    if not params.get("batch_stats"):
        for name in ("batch_size", "pool_batches", "pool_below"):
            if params.get(name) is not None:
                raise click.UsageError(f"--{name.replace('_', '-')} needs --batch-stats")
        return None
    if engine == "dask":
        raise click.UsageError("--batch-stats runs on the local engine (each batch needs the rows "
                               "before it); leave --engine dask out")
    if groups is not None:
        raise click.UsageError("--batch-stats normalizes each batch with its own statistics; leave --groups out")
    pool = _pool_options(params)  # (checked before the batch size: the order of the errors)
    batch_size = params.get("batch_size") or stats.meta.get("batch_size")
    if not batch_size:
        raise click.UsageError(f"--batch-stats needs --batch-size B ({stats_path} records no batch size)")
    return BatchStatsNormalizer(stats, batch_size=int(batch_size), gamma=gamma, beta=beta, dtype=dtype, **pool)
