"""What the commands show: a progress bar on stderr and a one-line summary."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

import click

from normstats.assign import NearestCenters
from normstats.stats import Stats


@contextlib.contextmanager
def progress_bar(
    total_rows: int, *, quiet: bool, label: str, initial: int = 0
) -> Iterator[Callable[[int], None]]:
    """Yield a callback taking rows done; draws a bar only on a terminal."""
    if quiet or not sys.stderr.isatty():
        # No bar to draw: tqdm is not even imported (its import reads every installed
        # package's metadata, ~60 ms of each command's start).
        yield _ignore_rows
        return
    from tqdm import tqdm

    with tqdm(total=total_rows, initial=initial, unit="rows", unit_scale=True, desc=label,
              file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield bar.update


def _ignore_rows(rows: int) -> None:
    pass


_STARTED = [time.perf_counter()]  # when the command began (reset by start_clock)


def start_clock() -> None:
    """Mark the start of a command: summary lines time the whole of it."""
    _STARTED[0] = time.perf_counter()


def command_seconds() -> float:
    return time.perf_counter() - _STARTED[0]


def counted(n: int, noun: str, plural: str = "") -> str:
    """``1 batch``, ``1,024 batches``."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def throughput(rows: int, nbytes: int, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    return f"{seconds:.2f} s, {rows / seconds:,.0f} rows/s, {nbytes / seconds / 1e9:.2f} GB/s"


def shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def summarize_fit(command: str, stats: Stats, output: str) -> None:
    """Print the one-line summary of a fit to stdout."""
    meta = stats.meta
    parts = [f"{command} {meta['mode']}: {meta['rows_seen']:,} rows"]
    if meta["mode"] == "ema":
        skipped = meta.get("batches_skipped")
        batches = meta["batches_seen"]
        parts.append(
            counted(batches, "batch", "batches") + (f" ({skipped:,} skipped)" if skipped else "")
        )
    if stats.kind == "centers":
        first = stats.arrays["centers"]
        parts.append(f"{meta['num_classes']:,} classes ({meta['classes_unseen']:,} unseen)")
    else:
        first = stats.arrays.get("mean", stats.arrays.get("inv_std"))
    names = [n for n in ("mean", "inv_std", "centers", "counts", "var") if n in stats.arrays]
    parts.append(f"{'/'.join(names)} {shape_text(first.shape)}")
    for key, text in (("groups_unseen", "groups unseen"), ("near_constant_count", "near-constant"),
                      ("values_omitted", "NaN/Inf omitted"), ("rows_ignored", "rows ignored")):
        if meta.get(key):
            parts.append(f"{meta[key]:,} {text}")
    small = too_small_groups(meta)
    if small:
        parts.append(small)
    if "tasks" in meta:
        parts.append(counted(meta["tasks"], "Dask task"))
    elif "jobs" in meta:
        parts.append(counted(meta["jobs"], "process", "processes"))
    if "merged_from" in meta:
        parts.append(f"merged from {len(meta['merged_from'])} files")
    else:
        # this run's rows (a resumed fit counts the checkpoint's rows in rows_seen) over the
        # whole command's time (opening thousands of shards counts too)
        parts.append(throughput(meta.get("rows_read", meta["rows_seen"]), meta["bytes_read"], command_seconds()))
    click.echo(", ".join(parts) + f" -> {output}")


def too_small_groups(meta: dict) -> str:
    """The groups whose statistics have too few elements (count <= ddof), by key when
    the groups are named (``--groups utterance`` / ``utt2spk=``), else by index."""
    count, listed = meta.get("groups_too_small"), meta.get("groups_too_small_list") or []
    if not count:
        return ""
    names = meta.get("group_names") or []
    shown = [repr(names[g]) if g < len(names) else str(g) for g in listed]
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return (f"{count:,} {'group' if count == 1 else 'groups'} with <= ddof={meta.get('ddof')} frames "
            f"(var NaN): {', '.join(shown)}{more}")


def summarize_apply(result: dict, output: str) -> None:
    """Print the one-line summary of an apply to stdout."""
    tasks = counted(result["tasks"], "Dask task") + ", " if "tasks" in result else ""
    click.echo(
        f"apply: {result['rows']:,} rows, {tasks}"
        f"{throughput(result['rows'], result['bytes_read'], command_seconds())} -> {output}"
    )


def summarize_assign(result: dict, nearest: NearestCenters, output: str) -> None:
    """Print the one-line summary of an assign to stdout: metric, rows, classes used
    (and excluded), k, rows rejected by --max-distance, throughput."""
    parts = [f"assign {nearest.metric}: {result['rows']:,} rows", f"{result['classes']:,} classes"
             + (f" ({result['excluded']:,} never seen, excluded)" if result["excluded"] else "")]
    if nearest.top_k > 1:
        parts.append(f"top {nearest.top_k}")
    if nearest.max_distance is not None:
        parts.append(f"{result['rejected']:,} rejected (distance > {nearest.max_distance:g})")
    parts.append(throughput(result["rows"], result["bytes_read"], command_seconds()))
    click.echo(", ".join(parts) + f" -> {output}")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict) and {"min", "median", "max"} <= set(value):
        count = f"{value['count']:,} batches, " if "count" in value else ""  # batch_elements
        return count + " / ".join("-" if value[k] is None else _fmt(value[k]) for k in ("min", "median", "max")) + \
            "  (min / median / max)"
    if isinstance(value, dict) and {"count", "first"} <= set(value):
        more = "" if value["count"] <= len(value["first"]) else ", ..."
        return f"{value['count']}" + (f": {', '.join(map(str, value['first']))}{more}" if value["count"] else "")
    return str(value)


def show_summary(summary: dict) -> None:
    """Print :func:`normstats.inspection.describe`'s summary as aligned lines."""
    kind = summary["kind"]
    click.echo(f"{summary['source']}: {kind}" + (" statistics" if kind in ("batchnorm", "centers") else ""))
    for key, value in summary["options"].items():
        click.echo(f"  {key:<18} {_fmt(value)}")
    for key, value in summary.items():
        if key in ("kind", "source", "options"):
            continue
        if key == "closest_pairs" and isinstance(value, list):
            value = ", ".join(f"{a}-{b} ({_fmt(d)})" for (a, b), d in
                              ((p["classes"], p["distance"]) for p in value)) or "-"
        if key == "nan_counts":
            value = ", ".join(f"{name} {n}" for name, n in value.items())
        elif key in ("layers", "arrays", "matrices"):  # another toolkit's file (inspect of an export)
            value = ", ".join(f"{name}: {text}" for name, text in value.items())
        click.echo(f"  {key:<18} {_fmt(value)}")
