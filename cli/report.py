"""What the commands show: a progress bar on stderr and a one-line summary."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import click
from tqdm import tqdm

from normstats.stats import Stats


@contextlib.contextmanager
def progress_bar(
    total_rows: int, *, quiet: bool, label: str, initial: int = 0
) -> Iterator[Callable[[int], None]]:
    """Yield a callback taking rows done; draws a bar only on a terminal."""
    disable = quiet or not sys.stderr.isatty()
    with tqdm(total=total_rows, initial=initial, unit="rows", unit_scale=True, desc=label, disable=disable,
              file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield bar.update


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
            f"{batches:,} batch{'es' if batches != 1 else ''}" + (f" ({skipped} skipped)" if skipped else "")
        )
    if stats.kind == "centers":
        first = stats.arrays["centers"]
        parts.append(f"{meta['num_classes']} classes ({meta['classes_unseen']} unseen)")
    else:
        first = stats.arrays.get("mean", stats.arrays.get("inv_std"))
    names = [n for n in ("mean", "inv_std", "centers", "counts", "var") if n in stats.arrays]
    parts.append(f"{'/'.join(names)} {shape_text(first.shape)}")
    for key, text in (("groups_unseen", "groups unseen"), ("near_constant_count", "near-constant"),
                      ("values_omitted", "NaN/Inf omitted"), ("rows_ignored", "rows ignored")):
        if meta.get(key):
            parts.append(f"{meta[key]:,} {text}")
    if "merged_from" in meta:
        parts.append(f"merged from {len(meta['merged_from'])} files")
    else:
        parts.append(throughput(meta["rows_seen"], meta["bytes_read"], meta["seconds"]))
    click.echo(", ".join(parts) + f" -> {output}")


def summarize_apply(result: dict, output: str) -> None:
    """Print the one-line summary of an apply to stdout."""
    click.echo(
        f"apply: {result['rows']:,} rows, "
        f"{throughput(result['rows'], result['bytes_read'], result['seconds'])} -> {output}"
    )
