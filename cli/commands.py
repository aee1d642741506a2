"""The commands: parse options, call the library once per step, report."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Optional

import click

import normstats as ns
from normstats.assign import METRICS
from normstats.errors import RowError
from normstats.export_files import describe_export
from normstats.inspection import describe
from normstats.keygroups import KeyGroups, group_stream, parse_groups, short_groups
from normstats.resume import resume_row
from normstats.tasks import make_state
from normstats.files import CommandFiles, check_unread, identities
from normstats.normalize import OUTPUT_DTYPES
from normstats.opened_inputs import opened_once
from normstats.readers.remote import with_options
from normstats.stats import CENTER_RULES, check_values
from normstats.apply_collections import apply_output, collection_for
from normstats.resume import Checkpointer
from normstats.writers.base import ARRAY_FORMATS, ASSIGN_FORMATS, STATS_FORMATS
from normstats.writers.h5_collection import COMPRESSIONS

from .app import cli
from .batches import (APPLY_BATCH_SIZE, BATCH_STATS, BOUNDARIES, POOL, batch_stats_normalizer, boundaries_file,
                      fit_grid_options)
from .files import KeepsSpec, given_file, guard, guarded_files
from .bn_options import channels_last_hint, check_initial_files, fit_axes
from .params import (ALPHA, DISTANCE, EPS, JOBS, SECONDS, SEED, AxesType, CenterInit, ChannelAxis, StorageOption,
                     ValueOrFile, check_mode_only, given, option, positive_int)
from .references import reference_option, referenced
from .report import progress_bar, show_summary, summarize_apply, summarize_assign, summarize_fit


def _options(*decorators: Callable) -> Callable:
    """Apply click option decorators in the order written."""
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return apply


COMMON = _options(
    option("--dataset", metavar="NAME",
                 help="HDF5 dataset to read (or write INPUT as file.h5:NAME)."),
    option("--force", is_flag=True, help="Overwrite an existing output file."),
    option("-q", "--quiet", is_flag=True, help="No progress bar."),
    option("--allow-external", is_flag=True,
                 help="Read HDF5 data that external links or virtual datasets take from "
                      "outside the input's folder (refused by default)."),
    option("--storage-option", "storage_options", type=StorageOption(), multiple=True, metavar="KEY=VALUE",
           help="An fsspec option for inputs given by URL (s3://, gs://, http(s)://), e.g. anon=true or "
                "endpoint_url=http://127.0.0.1:8333; VALUE is read as JSON when it parses. Repeatable."),
)


def _remote(storage_options: tuple, *specs: Any) -> Any:
    """The input specs with each URL carrying the --storage-option values (tuples of shards kept as tuples)."""
    options = dict(storage_options)
    found = [with_options(spec, options) if isinstance(spec, tuple) else with_options((spec,), options)[0]
             for spec in specs]
    return found[0] if len(found) == 1 else found


MODE = option("--mode", type=click.Choice(["ema", "exact"]), default="ema", show_default=True,
                    help="ema: moving averages over batches; exact: population statistics.")
BATCH_SIZE = option("--batch-size", type=int, default=256, show_default=True,
                          callback=positive_int,
                          help="Rows per logical batch (one EMA step); independent of disk reads.")
FIT = _options(
    option("--nan-policy", type=click.Choice(["error", "omit"]), default="error",
                 show_default=True,
                 help="NaN/Inf values: stop with the file, row and column of the first, or "
                      "leave them out of each statistic (counts are stored)."),
    option("--weights", metavar="FILE[:NAME]",
                 help="One non-negative weight per row (--mode exact), e.g. 0 for silence."),
    option("--checkpoint", "checkpoint_path", metavar="FILE",
                 help="Save the running state to FILE (.npz/.h5/.safetensors/.json) every --checkpoint-every "
                      "seconds; it is removed when the fit completes."),
    option("--checkpoint-every", type=SECONDS, default=60.0, show_default=True,
                 metavar="SECONDS", help="Seconds between checkpoints."),
    option("--resume", "resume_path", metavar="FILE",
                 help="Continue an interrupted fit from its --checkpoint FILE (same inputs and "
                      "options); the result equals an uninterrupted run."),
    option("--jobs", type=JOBS, default=1, show_default=True,
                 help="Processes sharing the rows; their states are merged (exact) or "
                      "chained in row order (ema), so the result equals one process's."),
)

ENGINE = _options(
    option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True,
                 help="local: on this machine; dask: tasks over row ranges on a Dask "
                      "cluster (pip install 'normstats[dask]')."),
    option("--scheduler", metavar="ADDRESS",
                 help="Dask scheduler to run on, e.g. tcp://10.0.0.5:8786; without it "
                      "--engine dask starts a local cluster with one worker per core."),
    option("--task-rows", type=int, callback=positive_int, metavar="N",
                 help="Rows per Dask task (default: about 256 MB of input), rounded down to "
                      "whole batches."),
)


def _check_engine(engine: str, scheduler: Optional[str], task_rows: Optional[int], jobs: int = 1) -> None:
    if engine == "local" and (scheduler or task_rows):
        raise click.UsageError(f"--{'scheduler' if scheduler else 'task-rows'} needs --engine dask")
    if engine == "dask" and jobs > 1:
        raise click.UsageError("--jobs is for the local engine; with --engine dask the cluster's workers "
                               "share the rows")


def _splits(jobs: int, engine: str) -> bool:
    """Whether the fit is cut into row ranges (--jobs processes or Dask tasks)."""
    return jobs > 1 or engine == "dask"


def _fit(command: str, recipe: ns.Recipe, inputs: tuple[str, ...], output: str, *, side_specs: dict,
         resume: Optional[ns.Stats], resume_path: Optional[str], checkpoint_path: Optional[str],
         checkpoint_every: float, jobs: int, engine: str, scheduler: Optional[str],
         task_rows: Optional[int], dataset: Optional[str], allow_external: bool, quiet: bool,
         meta: Optional[dict] = None) -> ns.Stats:
    """Run the fit `recipe` describes (its options hold the state's ``init``) and write it,
    with `meta` added: in this process with progress, checkpoints and resume, or cut into
    row ranges over --jobs processes or Dask tasks. Returns what it wrote."""
    split = _splits(jobs, engine)
    if split:
        init = recipe.options.get("init")
        _check_parallel(init if isinstance(init, ns.Stats) else None, checkpoint_path)
    with _fit_inputs(inputs, dataset, allow_external, **side_specs) as (stream, side):
        if split:
            stats, checkpoint = _fit_split(command, recipe, stream, side, jobs=jobs, engine=engine,
                                           scheduler=scheduler, task_rows=task_rows,
                                           allow_external=allow_external, quiet=quiet), None
        else:
            recipe.check_memory(stream.row_shape, row_bytes=stream.row_bytes)  # before anything is allocated
            stats, checkpoint = _run(command, make_state(recipe), stream, side, quiet=quiet,
                                     resume=resume, resume_path=resume_path,
                                     checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every)
    stats.meta.update(meta or {})
    _finish(command, stats, output, checkpoint)
    return stats


def _fit_split(command: str, recipe: ns.Recipe, stream: ns.Stream, side: dict, *, jobs: int, engine: str,
               scheduler: Optional[str], task_rows: Optional[int], allow_external: bool,
               quiet: bool) -> ns.Stats:
    """A fit cut into row ranges: over --jobs local processes or Dask tasks."""
    if engine == "local":
        return ns.run_fit_parallel(recipe, stream, side=side, allow_external=allow_external, jobs=jobs)
    with ns.dask_client(scheduler) as client, \
            progress_bar(stream.rows, quiet=quiet, label=command) as advance:
        return ns.run_fit_dask(recipe, stream, client, side=side, allow_external=allow_external,
                               task_rows=task_rows, progress=advance)


@contextlib.contextmanager
def _fit_inputs(inputs: tuple[str, ...], dataset: Optional[str], allow_external: bool,
                **side_specs: Any):
    """Open the feature shards and each given per-row side input (labels, weights, groups;
    groups by the features' sequence keys)."""
    keyed = {name: value for name, value in side_specs.items() if isinstance(value, KeyGroups)}
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(ns.open_stream(inputs, dataset, allow_external=allow_external))
        side = {name: stack.enter_context(ns.open_stream(specs, allow_external=allow_external))
                for name, specs in _side_specs(**{n: v for n, v in side_specs.items() if n not in keyed}).items()}
        side.update({name: stack.enter_context(group_stream(value, stream)) for name, value in keyed.items()})
        files = guarded_files()
        for opened in (stream, *side.values()) if files is not None else ():
            check_unread(files, opened)  # the files links and scp entries lead to are inputs too
        yield stream, side


def _key_groups(groups: Optional[str], inputs: tuple[str, ...], dataset: Optional[str], allow_external: bool,
                known: Optional[list], num_groups: Optional[int] = None, parallel: bool = False,
                ddof: int = 0) -> Optional[KeyGroups]:
    """``--groups utterance`` / ``utt2spk=FILE`` / ``spk2utt=FILE``, with the group names fixed
    (by `known`, a stats file's, or from the inputs' keys); None for a file of group indices."""
    keyed = parse_groups(groups)
    if keyed is None:
        return None
    if parallel:
        raise ns.UsageError(f"--groups {groups} runs on the local engine with --jobs 1 for now")
    with ns.open_stream(inputs, dataset, allow_external=allow_external) as stream:
        fixed = KeyGroups(keyed.kind, keyed.file, tuple(known) if known else None)
        source = group_stream(fixed, stream).sources[0]  # its labels and names made once
        names, short = source.names, short_groups(source, ddof)
    if num_groups is not None and num_groups != len(names):
        raise ns.UsageError(f"--groups {groups} makes {len(names)} groups, not --num-groups {num_groups}; "
                               "leave --num-groups out")
    return KeyGroups(keyed.kind, keyed.file, tuple(names), tuple(short))


def _stats_key_groups(keyed: KeyGroups, stats: ns.Stats, stats_path: str, engine: str) -> KeyGroups:
    """apply --groups utterance / utt2spk=FILE: each row's group found by name among the stats file's."""
    names = stats.meta.get("group_names")
    if not names:
        raise ns.UsageError(f"--groups {keyed.spec} picks statistics by key, and {stats_path} holds no group "
                            "names; fit it with fit-bn --groups utterance / utt2spk=FILE / spk2utt=FILE")
    if engine == "dask":
        raise ns.UsageError(f"--groups {keyed.spec} runs on the local engine for now")
    return KeyGroups(keyed.kind, keyed.file, tuple(names))


@contextlib.contextmanager
def _short_groups_named(keyed: Optional[KeyGroups], ddof: int):
    """A fit that stops for too few elements per statistic names the groups by key."""
    try:
        yield
    except ns.DataError as error:
        if keyed is None or not keyed.short or isinstance(error, RowError) or "ddof" not in str(error):
            raise
        shown = ", ".join(repr(name) for name in keyed.short[:10])
        more = f" and {len(keyed.short) - 10} more" if len(keyed.short) > 10 else ""
        raise ns.DataError(f"{error}: {len(keyed.short)} of the --groups {keyed.kind} groups have <= ddof={ddof} "
                           f"frames ({shown}{more}); leave them out of the input or fit with --ddof 0") from None


def _run(command: str, state: Any, stream: ns.Stream, side: dict, *, quiet: bool,
         resume: Optional[ns.Stats], resume_path: Optional[str], checkpoint_path: Optional[str],
         checkpoint_every: float) -> tuple[ns.Stats, Optional[Checkpointer]]:
    """Drive one fit with progress and checkpoints."""
    start_row = resume_row(resume, stream, resume_path, side) if resume is not None else 0
    checkpoint = None
    if checkpoint_path:
        checkpoint = Checkpointer(checkpoint_path, checkpoint_every, sources=stream.names,
                                  rows_total=stream.rows, inputs=identities({"features": stream, **side}))
    with progress_bar(stream.rows, quiet=quiet, label=command, initial=start_row) as advance:
        stats = ns.run_fit(state, stream, side=side, start_row=start_row, progress=advance,
                           checkpoint=checkpoint, spend=True)
    return stats, checkpoint


def _finish(command: str, stats: ns.Stats, output: str, checkpoint: Optional[Checkpointer]) -> None:
    ns.write_stats(stats, output)
    if checkpoint:
        checkpoint.remove()
    summarize_fit(command, stats, output)


def _start_from(init: Optional[str], resume_path: Optional[str],
                allow_external: bool = False) -> tuple[Optional[ns.Stats], Optional[ns.Stats]]:
    """The stats a fit starts from (--init or --resume) and the checkpoint, if resuming."""
    if init and resume_path:
        raise click.UsageError("--init and --resume exclude each other")
    resume = check_values(ns.read_stats(resume_path, allow_external=allow_external)) if resume_path else None
    return (resume or (check_values(ns.read_stats(init, allow_external=allow_external)) if init else None)), resume


def _continued_mode(ctx: click.Context, mode: str, start: Optional[ns.Stats],
                    resume: Optional[ns.Stats]) -> str:
    """A continued fit keeps its file's mode unless --mode says otherwise; a
    resumed one must keep it."""
    if start is None:
        return mode
    if not given(ctx, "mode"):
        return start.mode
    if resume is not None and mode != resume.mode:
        raise click.UsageError(f"the checkpoint was made with --mode {resume.mode}; resume with the same mode")
    return mode


def _given_only(ctx: click.Context, options: dict[str, Any], also: set = frozenset()) -> dict[str, Any]:
    """The options typed on the command line (or set by --reference: `also`); a continued
    fit takes the rest from its file."""
    cli_name = {"use_mean": "mean", "use_inv_std": "inv_std"}
    return {k: v for k, v in options.items() if k in also or given(ctx, cli_name.get(k, k))}


def _check_parallel(start: Optional[ns.Stats], checkpoint_path: Optional[str]) -> None:
    if start is not None or checkpoint_path:
        raise click.UsageError("--jobs and --engine dask do not combine with --init, --resume or "
                               "--checkpoint")


def _side_specs(**specs: Any) -> dict[str, tuple[str, ...]]:
    """The given per-row inputs, each as a tuple of shards."""
    return {name: (value,) if isinstance(value, str) else tuple(value) for name, value in specs.items() if value}


def _fit_files(ctx: click.Context, inputs: tuple[str, ...], output: str, *, init: Optional[str],
               labels: tuple[str, ...] = (), groups: Optional[str] = None) -> CommandFiles:
    """Every file a fit reads and writes."""
    resume = "--resume checkpoint"
    return (CommandFiles().reads("input", *inputs).reads("--labels file", *labels)
            .reads("--weights file", ctx.params.get("weights")).reads("--groups file", groups)
            .reads("--init file", init).reads(resume, ctx.params.get("resume_path"))
            .writes("output", output, STATS_FORMATS)
            .writes("--checkpoint file", ctx.params.get("checkpoint_path"), STATS_FORMATS, may_be=resume))


@cli.command("fit-bn")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@option("-o", "--output", required=True, metavar="STATS",
              help="Stats file to write (.npz, .h5, .safetensors or .json).")
@BATCH_SIZE
@option("--axes", type=AxesType(), default="auto", show_default=True,
              help="Axes to reduce: 'auto' (all but the second: channels-first input such as (N, C, H, W)) "
                   "or e.g. 0,2,3. Channels-last input (N, H, W, C) needs --channel-axis -1: auto alone "
                   "would keep H.")
@option("--channel-axis", "channel_axis", type=ChannelAxis(), metavar="A",
              help="With --axes auto: reduce every axis but A, counted on the input (-1: the last), so "
                   "the statistics have shape (C,) for channels-last (N, H, W, C); not with an --axes list.")
@option("--alpha", type=ALPHA, default=0.01, show_default=True,
              help="EMA weight of the newest batch, in (0, 1].")
@option("--eps", type=EPS, default=1e-5, show_default=True,
              help="Added to the variance before 1/sqrt; finite, at least 1.2e-38.")
@option("--ddof", type=click.IntRange(0), default=1, show_default=True,
              help="Delta degrees of freedom of the variance.")
@reference_option("batchnorm", "--eps, --alpha and --ddof")
@MODE
@option("--mean", "mean", type=KeepsSpec(ValueOrFile()), default=0.0, show_default=True,
              help="Initial running mean: a number, a file of the statistics' shape (.npy, file.npz:NAME, "
                   "file.h5:NAME, file.safetensors:NAME), or 'none' to not estimate the mean.")
@option("--inv-std", "inv_std", type=KeepsSpec(ValueOrFile(positive=True)), default=1.0, show_default=True,
              help="Initial running inv_std (> 0): a number, a file of the statistics' shape, or 'none' to "
                   "not estimate it.")
@option("--init", "init", metavar="STATS",
              help="Continue from a stats file (ema: its values start the averages; "
                   "exact: its population is added to).")
@option("--groups", metavar="FILE[:NAME]|utterance|utt2spk=FILE|spk2utt=FILE",
              help="One group index per row (--mode exact): per-group statistics, e.g. per "
                   "speaker CMVN, of shape (G, ...); or groups from the keys of a sequence "
                   "collection (scp:, ark:, file.h5:/group): each utterance, or its speaker "
                   "by a Kaldi utt2spk / spk2utt file (then no --num-groups).")
@option("--num-groups", type=int, callback=positive_int, metavar="G",
              help="Number of groups G; group indices lie in [0, G).")
@_options(*POOL, BOUNDARIES)
@FIT
@ENGINE
@COMMON
@click.pass_context
@opened_once()  # the checks before the fit and the fit share one opening of INPUT
def fit_bn(ctx: click.Context, inputs: tuple[str, ...], output: str, batch_size: int, axes: Any,
           channel_axis: Optional[int], alpha: float, eps: float, ddof: int, reference: Optional[str], mode: str,
           mean: Any, inv_std: Any, init: Optional[str], groups: Optional[str],
           num_groups: Optional[int], nan_policy: str, weights: Optional[str],
           checkpoint_path: Optional[str], checkpoint_every: float, resume_path: Optional[str],
           jobs: int, engine: str, scheduler: Optional[str], task_rows: Optional[int],
           dataset: Optional[str], force: bool, quiet: bool, allow_external: bool,
           storage_options: tuple, **batch_grid: Any) -> None:
    """Fit BatchNorm mean and inv_std over INPUT (.npy, file.h5[:NAME], a collection
    such as scp:feats.scp or file.h5:/group, store.zarr, file.npz:NAME,
    file.safetensors:NAME, file.parquet:COLUMN; several are shards read in order).

    \b
    ema (default), per batch of --batch-size rows:
      mean    <- (1-alpha)*mean    + alpha*batch_mean
      inv_std <- (1-alpha)*inv_std + alpha/sqrt(batch_var + eps)
    exact: population mean and 1/sqrt(var + eps) over every element.

    \b
    Example:
      normstats fit-bn sample_data/digits.h5:images -o stats.npz
    """
    _check_engine(engine, scheduler, task_rows, jobs)
    chosen, preset = referenced(ctx, reference, "batchnorm", eps=eps, alpha=alpha, ddof=ddof)
    eps, alpha, ddof = chosen["eps"], chosen["alpha"], chosen["ddof"]
    inputs, weights, groups = _remote(storage_options, inputs, weights, groups)
    keyed = parse_groups(groups)
    if num_groups is not None and groups is None:
        raise click.UsageError("--num-groups needs --groups FILE")
    if groups is not None and num_groups is None and not (init or resume_path or keyed):
        raise click.UsageError("--groups needs --num-groups G (or --groups utterance / utt2spk=FILE / "
                               "spk2utt=FILE with a sequence collection)")
    axes = fit_axes(axes, channel_axis)
    guard(ctx, _fit_files(ctx, inputs, output, groups=keyed.file if keyed else groups, init=init)
          .reads("--mean file", given_file(ctx, "mean")).reads("--inv-std file", given_file(ctx, "inv_std"))
          .reads("--batch-boundaries file", boundaries_file(ctx.params.get("batch_boundaries"))),
          force=force)
    start, resume = _start_from(init, resume_path, allow_external)
    mode = _continued_mode(ctx, mode, start, resume)
    check_mode_only(ctx, mode, "exact", "groups", "weights")
    if keyed is not None:
        known = (start.meta.get("group_names") if start else None)
        keyed = _key_groups(groups, inputs, dataset, allow_external, known, num_groups,
                            parallel=_splits(jobs, engine), ddof=ddof)
        num_groups = len(keyed.names)
    options: dict[str, Any] = {"eps": eps, "ddof": ddof, "batch_size": batch_size,
                               "nan_policy": nan_policy, "axes": axes}
    if mode == "ema":
        options.update(alpha=alpha, mean=mean, inv_std=inv_std)
    else:
        for name, value in (("mean", mean), ("inv_std", inv_std)):
            if value is not None and given(ctx, name):
                flag = "--" + name.replace("_", "-")
                raise click.UsageError(f"{flag} VALUE sets an ema starting value; with --mode exact "
                                       f"only {flag} none applies")
        options.update(use_mean=mean is not None, use_inv_std=inv_std is not None,
                       num_groups=num_groups)
    if start:
        if given(ctx, "axes") or channel_axis is not None:
            flag = "--axes" if given(ctx, "axes") else "--channel-axis"
            raise click.UsageError(f"{flag} cannot change when continuing a fit; the file fixes the axes")
        options = _given_only(ctx, options, preset)
    options.update(fit_grid_options(ctx, mode, inputs, dataset, allow_external))
    check_initial_files(ctx, inputs, dataset, allow_external, axes, start)
    meta = {"reference": reference} if reference else {}
    if keyed:
        meta["group_names"] = list(keyed.names)
    with _short_groups_named(keyed, ddof):
        stats = _fit("fit-bn", ns.Recipe("batchnorm", mode, dict(options, init=start)), inputs, output,
             side_specs=dict(groups=keyed or groups, weights=weights), resume=resume, resume_path=resume_path,
             checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, jobs=jobs, engine=engine,
             scheduler=scheduler, task_rows=task_rows, dataset=dataset, allow_external=allow_external,
             quiet=quiet, meta=meta)
    hint = None if start or given(ctx, "axes") or channel_axis is not None else channels_last_hint(stats)
    if hint:
        click.echo(hint, err=True)


@cli.command("fit-centers")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@option("-o", "--output", required=True, metavar="CENTERS",
              help="Centers file to write (.npz, .h5, .safetensors or .json).")
@option("--labels", "labels", required=True, multiple=True, metavar="LABELS",
              help="Integer labels: .npy or file.h5:NAME (repeat once per INPUT shard).")
@option("--num-classes", type=int, required=True, callback=positive_int,
              help="Number of classes K; labels lie in [0, K).")
@BATCH_SIZE
@option("--alpha", type=ALPHA, default=0.9, show_default=True,
              help="EMA weight of the batch class mean (of each row, with --rule per-sample), in (0, 1].")
@option("--rule", type=click.Choice(CENTER_RULES), default="batch-mean", show_default=True,
              help="batch-mean: one step per batch and class towards the class's batch mean; per-sample: "
                   "each row f adds alpha*(f - C) from the batch's starting C (the Center layers' code).")
@reference_option("centers", "--rule and --alpha", "(alpha weights the new data: Pytorch_Ext's Center "
                  "alpha 0.9 weights the old center, so each row enters with 0.1.)")
@MODE
@option("--init", "init", type=KeepsSpec(CenterInit()), default="random", show_default=True,
              help="Initial centers (ema): random in ±1/sqrt(dim), zeros, each class's first "
                   "batch mean, a file of shape (K, dim); or a centers file to continue from.")
@option("--seed", type=SEED, default=0, show_default=True, help="Seed of --init random.")
@option("--ignore-label", type=int, metavar="L",
              help="Skip rows with this label (e.g. -1 for unlabelled rows).")
@FIT
@ENGINE
@COMMON
@click.pass_context
def fit_centers(ctx: click.Context, inputs: tuple[str, ...], output: str, labels: tuple[str, ...],
                num_classes: int, batch_size: int, alpha: float, rule: str, reference: Optional[str], mode: str,
                init: Any, seed: int,
                ignore_label: Optional[int], nan_policy: str, weights: Optional[str],
                checkpoint_path: Optional[str], checkpoint_every: float,
                resume_path: Optional[str], jobs: int, engine: str, scheduler: Optional[str],
                task_rows: Optional[int], dataset: Optional[str], force: bool, quiet: bool,
                allow_external: bool, storage_options: tuple) -> None:
    """Fit per-class centers of INPUT features with integer LABELS.

    \b
    ema (default), per batch and class j present in it (n_j rows):
      batch-mean:  C[j] <- alpha*C_batch[j] + (1-alpha)*C[j]
      per-sample:  C[j] <- C[j] + alpha*n_j*(C_batch[j] - C[j])
    exact: C[j] = mean of all rows labelled j (and var[j]).

    \b
    Example:
      normstats fit-centers sample_data/digits.h5:features \\
          --labels sample_data/digits.h5:labels --num-classes 10 -o centers.npz
    """
    _check_engine(engine, scheduler, task_rows, jobs)
    chosen, preset = referenced(ctx, reference, "centers", alpha=alpha, rule=rule)
    alpha, rule = chosen["alpha"], chosen["rule"]
    inputs, labels, weights = _remote(storage_options, inputs, labels, weights)
    if len(labels) not in (1, len(inputs)):
        raise click.UsageError(f"--labels was given {len(labels)} times for {len(inputs)} INPUT shards; "
                               "give one LABELS per INPUT, or one for all of them")
    guard(ctx, _fit_files(ctx, inputs, output, labels=labels, init=given_file(ctx, "init")), force=force)
    continued = init if isinstance(init, ns.Stats) else None
    if continued is not None and resume_path:
        raise click.UsageError("--init and --resume exclude each other")
    resume = check_values(ns.read_stats(resume_path, allow_external=allow_external)) if resume_path else None
    mode = _continued_mode(ctx, mode, continued or resume, resume)
    check_mode_only(ctx, mode, "exact", "weights")
    options: dict[str, Any] = {"batch_size": batch_size, "ignore_label": ignore_label,
                               "nan_policy": nan_policy}
    if mode == "ema":
        options.update(alpha=alpha, rule=rule, seed=seed)
    else:
        for name in ("alpha", "rule", "seed", "reference"):
            if given(ctx, name):
                raise click.UsageError(f"--{name} applies to --mode ema only")
    if mode == "exact" and given(ctx, "init") and continued is None:
        raise click.UsageError("--init random|zeros|first|FILE of centers applies to --mode ema only")
    init = resume or continued or (init if mode == "ema" else None)
    if isinstance(init, ns.Stats):
        options = _given_only(ctx, options, preset)
    recipe = ns.Recipe("centers", mode, dict(options, num_classes=num_classes, init=init))
    _fit("fit-centers", recipe, inputs, output, side_specs=dict(labels=labels, weights=weights),
         resume=resume, resume_path=resume_path, checkpoint_path=checkpoint_path,
         checkpoint_every=checkpoint_every, jobs=jobs, engine=engine, scheduler=scheduler,
         task_rows=task_rows, dataset=dataset, allow_external=allow_external, quiet=quiet,
         meta={"reference": reference} if reference else None)


@cli.command("apply")
@click.argument("stats_path", metavar="STATS")
@click.argument("input_spec", metavar="INPUT")
@option("-o", "--output", required=True, metavar="OUTPUT",
              help="Normalized array to write: .npy, or .h5 / out.h5:NAME (a contiguous dataset); for a "
                   "collection input also ark,scp:OUT.ark,OUT.scp (Kaldi) or OUT.h5:/GROUP (a dataset per key).")
@option("--compression", type=click.Choice(COMPRESSIONS),
        help="Compress an HDF5 output in chunks (default: contiguous, uncompressed).")
@option("--gamma", type=KeepsSpec(ValueOrFile()), default=1.0, show_default=True,
              help="Scale: a number, a file of the statistics' shape, or 'none' (no scale term, as 1).")
@option("--beta", type=KeepsSpec(ValueOrFile()), default=0.0, show_default=True,
              help="Shift: a number, a file of the statistics' shape, or 'none' (no shift term, as 0).")
@option("--groups", metavar="FILE[:NAME]|utterance|utt2spk=FILE|spk2utt=FILE",
              help="Each row's group, for per-group statistics (fit-bn --groups); by key for "
                   "statistics fitted with --groups utterance / utt2spk= / spk2utt=.")
@option("--dtype", type=click.Choice(OUTPUT_DTYPES),
        help="Output dtype  [default: float input's own; float32 for integers up to 16 bits, else float64]")
@_options(BATCH_STATS, APPLY_BATCH_SIZE, *POOL)
@ENGINE
@COMMON
@click.pass_context
def apply(ctx: click.Context, stats_path: str, input_spec: str, output: str, compression: Optional[str],
          gamma: Any, beta: Any, groups: Optional[str], dtype: Optional[str], engine: str, scheduler: Optional[str], task_rows: Optional[int],
          dataset: Optional[str], force: bool, quiet: bool, allow_external: bool,
          storage_options: tuple, **batch_stats: Any) -> None:
    """Normalize INPUT with fitted STATS, in inference mode:

    \b
      y = (x - mean) * (gamma * inv_std) + beta

    A statistic fitted as 'none' drops its term. Float input keeps its dtype;
    integer input becomes float32 (<= 16 bits) or float64. With --batch-stats,
    training mode: each batch of --batch-size rows uses its own batch mean and
    inv_std (STATS gives the axes, eps and ddof; --pool-batches pools them).

    \b
    Example:
      normstats apply stats.npz sample_data/digits.h5:images -o normalized.h5
    """
    _check_engine(engine, scheduler, task_rows)
    input_spec, groups = _remote(storage_options, input_spec, groups)
    keyed = parse_groups(groups)
    collection = apply_output(output, compression, engine)
    files = CommandFiles().reads("stats file", stats_path).reads("input", input_spec) \
        .reads("--groups file", keyed.file if keyed else groups).reads("--gamma file", given_file(ctx, "gamma")) \
        .reads("--beta file", given_file(ctx, "beta"))
    for path, formats in collection.files if collection else [(output, ARRAY_FORMATS)]:
        files.writes("output", path, formats)
    guard(ctx, files, force=force)
    stats = ns.read_stats(stats_path, allow_external=allow_external)
    if keyed is not None:
        keyed = _stats_key_groups(keyed, stats, stats_path, engine)
    normalizer = (batch_stats_normalizer(ctx, stats, stats_path, gamma=gamma, beta=beta, dtype=dtype, engine=engine,
                                         groups=groups) or ns.Normalizer(stats, gamma=gamma, beta=beta, dtype=dtype))
    with _fit_inputs((input_spec,), dataset, allow_external, groups=keyed or groups) as (stream, side):
        collection = collection_for(collection, stream)
        if engine == "dask":
            with ns.dask_client(scheduler) as client, \
                    progress_bar(stream.rows, quiet=quiet, label="apply") as advance:
                result = ns.apply_dask(normalizer, stream, output, client, groups=side.get("groups"),
                                       allow_external=allow_external, task_rows=task_rows,
                                       progress=advance)
        else:
            with progress_bar(stream.rows, quiet=quiet, label="apply") as advance:
                if collection is not None:
                    result = ns.apply_collection(normalizer, stream, collection, groups=side.get("groups"),
                                                 compression=compression, progress=advance)
                else:
                    result = ns.apply_stats(normalizer, stream, output, groups=side.get("groups"),
                                            compression=compression, progress=advance)
    summarize_apply(result, output)


@cli.command("merge")
@click.argument("parts", metavar="IN...", nargs=-1, required=True)
@option("-o", "--output", required=True, metavar="OUT",
              help="Merged stats or centers file to write (.npz, .h5, .safetensors or .json).")
@option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.pass_context
def merge(ctx: click.Context, parts: tuple[str, ...], output: str, force: bool) -> None:
    """Merge exact statistics fitted on shards into those of all the shards.

    The IN files must come from fit-bn or fit-centers with --mode exact and
    the same axes, shapes and options; the result equals one fit over every
    shard (to float64 rounding). Moving averages (ema) cannot be merged.

    \b
    Example:
      normstats fit-bn part1.npy -o a.npz --mode exact
      normstats fit-bn part2.npy -o b.npz --mode exact
      normstats merge a.npz b.npz -o all.npz
    """
    guard(ctx, CommandFiles().reads("input", *parts, distinct=True, whole=True).writes("output", output, STATS_FORMATS),
          force=force)
    stats = ns.merge_stats([ns.read_stats(part) for part in parts], names=parts)
    ns.write_stats(stats, output)
    summarize_fit("merge", stats, output)


@cli.command("inspect")
@click.argument("path", metavar="FILE")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@option("--plot", "plot_path", metavar="OUT.png",
              help="Draw the file instead: mean ± std per channel, or class counts and the "
                   "distances between centers (needs matplotlib: pip install 'normstats[plot]').")
@option("--force", is_flag=True, help="Overwrite an existing --plot file.")
@click.pass_context
def inspect(ctx: click.Context, path: str, as_json: bool, plot_path: Optional[str], force: bool) -> None:
    """Summarize a stats or centers FILE: options and provenance, value ranges,
    NaN counts, near-constant channels, class counts (empty and rare classes),
    center norms and the closest pairs of centers; or draw it with --plot.

    \b
    Example:
      normstats inspect centers.npz
      normstats inspect centers.npz --plot centers.png
    """
    if plot_path is None:
        summary = _summary(path)
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            show_summary(summary)
        return
    if as_json:
        raise click.UsageError("--json and --plot exclude each other")
    from normstats.plots import PLOT_FORMATS, plot_stats

    guard(ctx, CommandFiles().reads("stats file", path).writes("--plot file", plot_path, PLOT_FORMATS),
          force=force)
    stats = ns.read_stats(path)
    what = plot_stats(stats, plot_path)
    click.echo(f"inspect {stats.kind}: {what} -> {plot_path}")


def _summary(path: str) -> dict:
    """A stats file's summary, or that of another toolkit's file that export writes."""
    try:
        return describe(ns.read_stats(path))
    except ns.StatsFileError:
        found = describe_export(path)
        if found is None:
            raise
        return {"source": path, "kind": found.pop("kind"), "options": {}, **found}


@cli.command("assign")
@click.argument("centers_path", metavar="CENTERS")
@click.argument("input_spec", metavar="INPUT")
@option("-o", "--output", required=True, metavar="OUT",
              help="HDF5 file to write (.h5): datasets 'labels' and 'distances'.")
@option("--metric", type=click.Choice(METRICS), default="euclidean", show_default=True,
              help="euclidean: |x - c|; cosine: 1 - cos(x, c) (1 for a zero vector).")
@option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="Nearest centers per row, nearest first (ties: lowest class).")
@option("--max-distance", type=DISTANCE, metavar="D",
              help="Label -1 where the distance exceeds D (open-set rejection).")
@COMMON
@click.pass_context
def assign(ctx: click.Context, centers_path: str, input_spec: str, output: str, metric: str, top_k: int,
           max_distance: Optional[float], dataset: Optional[str], force: bool, quiet: bool,
           allow_external: bool, storage_options: tuple) -> None:
    """Label each row of INPUT with its nearest CENTERS (from fit-centers), and the
    distance to it, streamed block by block.

    Classes never seen when the centers were fitted (count 0, or a NaN center)
    are never assigned. Distances are exact (float64); a float32 matrix
    product only narrows down the candidates.

    \b
    Example:
      normstats assign centers.npz sample_data/digits.h5:features -o assigned.h5
    """
    input_spec = _remote(storage_options, input_spec)
    guard(ctx, CommandFiles().reads("centers file", centers_path).reads("input", input_spec)
          .writes("output", output, ASSIGN_FORMATS), force=force)
    nearest = ns.NearestCenters.from_stats(ns.read_stats(centers_path, allow_external=allow_external),
                                           metric=metric, top_k=top_k,
                                           max_distance=max_distance, name=centers_path)
    with _fit_inputs((input_spec,), dataset, allow_external) as (stream, _):
        with progress_bar(stream.rows, quiet=quiet, label="assign") as advance:
            result = ns.assign_rows(nearest, stream, output, meta={"centers": centers_path},
                                    progress=advance)
    summarize_assign(result, nearest, output)
