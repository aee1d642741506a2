"""The commands: parse options, call the library once per step, report."""

from __future__ import annotations

from typing import Any, Callable, Optional

import click

import normstats as ns
from normstats.stores import ARRAY_FORMATS, STATS_FORMATS, check_output

from . import cli
from .params import AxesType, CenterInit, FloatOrNone, ValueOrFile, positive_int
from .report import progress_bar, summarize_apply, summarize_fit


def _common(function: Callable) -> Callable:
    """Options every command shares."""
    for decorator in reversed([
        click.option("--dataset", metavar="NAME",
                     help="HDF5 dataset to read (or write INPUT as file.h5:NAME)."),
        click.option("--force", is_flag=True, help="Overwrite an existing output file."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]):
        function = decorator(function)
    return function


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


MODE = click.option("--mode", type=click.Choice(["ema", "exact"]), default="ema", show_default=True,
                    help="ema: moving averages over batches; exact: population statistics.")
BATCH_SIZE = click.option("--batch-size", type=int, default=256, show_default=True,
                          callback=positive_int,
                          help="Rows per logical batch (one EMA step); independent of disk reads.")


@cli.command("fit-bn")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", required=True, metavar="STATS",
              help="Stats file to write (.npz or .h5).")
@BATCH_SIZE
@click.option("--axes", type=AxesType(), default="auto", show_default=True,
              help="Axes to reduce: 'auto' (all but the second) or e.g. 0,2,3.")
@click.option("--alpha", type=float, default=0.01, show_default=True,
              help="EMA weight of the newest batch, in (0, 1].")
@click.option("--eps", type=float, default=1e-5, show_default=True,
              help="Added to the variance before 1/sqrt.")
@click.option("--ddof", type=click.IntRange(0), default=1, show_default=True,
              help="Delta degrees of freedom of the variance.")
@MODE
@click.option("--mean", "mean", type=FloatOrNone(), default=0.0, show_default=True,
              help="Initial running mean, or 'none' to not estimate the mean.")
@click.option("--inv-std", "inv_std", type=FloatOrNone(), default=1.0, show_default=True,
              help="Initial running inv_std, or 'none' to not estimate it.")
@click.option("--init", "init", metavar="STATS",
              help="Continue from a stats file (ema: its values start the averages; "
                   "exact: its population is added to).")
@_common
@click.pass_context
def fit_bn(ctx: click.Context, inputs: tuple[str, ...], output: str, batch_size: int, axes: Any,
           alpha: float, eps: float, ddof: int, mode: str, mean: Optional[float],
           inv_std: Optional[float], init: Optional[str], dataset: Optional[str], force: bool,
           quiet: bool) -> None:
    """Fit BatchNorm mean and inv_std over INPUT (.npy or HDF5; several files are
    shards read in order).

    \b
    ema (default), per batch of --batch-size rows:
      mean    <- (1-alpha)*mean    + alpha*batch_mean
      inv_std <- (1-alpha)*inv_std + alpha/sqrt(batch_var + eps)
    exact: population mean and 1/sqrt(var + eps) over every element.

    \b
    Example:
      normstats fit-bn sample_data/digits.h5:images -o stats.npz
    """
    check_output(output, force=force, inputs=inputs + ((init,) if init else ()), formats=STATS_FORMATS)
    options: dict[str, Any] = {"eps": eps, "ddof": ddof, "batch_size": batch_size}
    if not (init and mode == "ema"):
        options["axes"] = axes
    elif _given(ctx, "axes"):
        raise click.UsageError("--axes cannot change when continuing with --init; the file fixes them")
    if mode == "ema":
        options["alpha"] = alpha
        for name, value in (("mean", mean), ("inv_std", inv_std)):
            if _given(ctx, name) or not init:
                options[name] = value
    else:
        for name, value in (("mean", mean), ("inv_std", inv_std)):
            if value is not None and _given(ctx, name):
                flag = "--" + name.replace("_", "-")
                raise click.UsageError(f"{flag} VALUE sets an ema starting value; with --mode exact "
                                       f"only {flag} none applies")
        options.update(use_mean=mean is not None, use_inv_std=inv_std is not None)
    start = ns.read_stats(init) if init else None
    with ns.open_stream(inputs, dataset) as stream:
        state = ns.batchnorm_state(mode, init=start, **options)
        with progress_bar(stream.rows, quiet=quiet, label="fit-bn") as advance:
            stats = ns.fit_batchnorm(state, stream, progress=advance)
    ns.write_stats(stats, output)
    summarize_fit("fit-bn", stats, output)


@cli.command("fit-centers")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", required=True, metavar="CENTERS",
              help="Centers file to write (.npz or .h5).")
@click.option("--labels", "labels", required=True, multiple=True, metavar="LABELS",
              help="Integer labels: .npy or file.h5:NAME (repeat once per INPUT shard).")
@click.option("--num-classes", type=int, required=True, callback=positive_int,
              help="Number of classes K; labels lie in [0, K).")
@BATCH_SIZE
@click.option("--alpha", type=float, default=0.9, show_default=True,
              help="EMA weight of the batch class mean, in (0, 1].")
@MODE
@click.option("--init", "init", type=CenterInit(), default="random", show_default=True,
              help="Initial centers (ema): random in ±1/sqrt(dim), zeros, each class's first "
                   "batch mean, or a file of shape (K, dim).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --init random.")
@_common
@click.pass_context
def fit_centers(ctx: click.Context, inputs: tuple[str, ...], output: str, labels: tuple[str, ...],
                num_classes: int, batch_size: int, alpha: float, mode: str, init: Any, seed: int,
                dataset: Optional[str], force: bool, quiet: bool) -> None:
    """Fit per-class centers of INPUT features with integer LABELS.

    \b
    ema (default), per batch and class j present in it:
      C[j] <- alpha*C_batch[j] + (1-alpha)*C[j]
    exact: C[j] = mean of all rows labelled j (and var[j]).

    \b
    Example:
      normstats fit-centers sample_data/digits.h5:features \\
          --labels sample_data/digits.h5:labels --num-classes 10 -o centers.npz
    """
    check_output(output, force=force, inputs=inputs + labels, formats=STATS_FORMATS)
    if mode == "ema":
        options: dict[str, Any] = {"alpha": alpha, "init": init, "seed": seed}
    else:
        for name in ("alpha", "init", "seed"):
            if _given(ctx, name):
                raise click.UsageError(f"--{name} applies to --mode ema only")
        options = {}
    with ns.open_stream(inputs, dataset) as features, ns.open_stream(labels) as label_stream:
        state = ns.centers_state(num_classes, mode, batch_size=batch_size, **options)
        with progress_bar(features.rows, quiet=quiet, label="fit-centers") as advance:
            stats = ns.fit_centers(state, features, label_stream, progress=advance)
    ns.write_stats(stats, output)
    summarize_fit("fit-centers", stats, output)


@cli.command("apply")
@click.argument("stats_path", metavar="STATS")
@click.argument("input_spec", metavar="INPUT")
@click.option("-o", "--output", required=True, metavar="OUTPUT",
              help="Normalized array to write: .npy, or .h5 / out.h5:NAME (chunked).")
@click.option("--gamma", type=ValueOrFile(), default=1.0, show_default=True,
              help="Scale: a number, a file of the statistics' shape, or 'none'.")
@click.option("--beta", type=ValueOrFile(), default=0.0, show_default=True,
              help="Shift: a number, a file of the statistics' shape, or 'none'.")
@_common
def apply(stats_path: str, input_spec: str, output: str, gamma: Any, beta: Any,
          dataset: Optional[str], force: bool, quiet: bool) -> None:
    """Normalize INPUT with fitted STATS, in inference mode:

    \b
      y = (x - mean) * (gamma * inv_std) + beta

    A statistic fitted as 'none' drops its term. Float input keeps its dtype;
    integer input becomes float32 (<= 16 bits) or float64.

    \b
    Example:
      normstats apply stats.npz sample_data/digits.h5:images -o normalized.h5
    """
    check_output(output, force=force, inputs=(stats_path, input_spec), formats=ARRAY_FORMATS)
    normalizer = ns.Normalizer(ns.read_stats(stats_path), gamma=gamma, beta=beta)
    with ns.open_stream([input_spec], dataset) as stream:
        with progress_bar(stream.rows, quiet=quiet, label="apply") as advance:
            result = ns.apply_stats(normalizer, stream, output, progress=advance)
    summarize_apply(result, output)
