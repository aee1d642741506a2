"""The commands that carry statistics into other toolkits and back: export, import."""

from __future__ import annotations

from typing import Any, Optional

import click

import normstats as ns
from normstats.interop import TARGET_FORMATS, TARGETS
from normstats.files import CommandFiles
from normstats.writers.base import STATS_FORMATS

from .app import cli
from .files import KeepsSpec, given_file, guard
from .params import EPS, ShapeType, ValueOrFile, option

TORCH_ONLY = ("prefix", "eps", "gamma", "beta")


@cli.command("export")
@click.argument("stats_path", metavar="STATS")
@option("--to", "target", type=click.Choice(TARGETS), required=True,
              help="torch: BatchNorm state dict (.safetensors); keras: Normalization mean/variance "
                   "(.npz); kaldi: CMVN stats matrix (.cmvn/.mat; .ark: per group, or keyed 'global'); espnet: "
                   "ESPnet2 GlobalMVN stats (.npz), ESPnet1 CMVN (.npy global; .ark/.h5 per group).")
@option("-o", "--output", required=True, metavar="FILE", help="File to write.")
@option("--prefix", metavar="NAME",
              help="torch: store the tensors as NAME.running_mean, ... (the layer's name in your model).")
@option("--eps", type=EPS,
              help="torch: eps of the BatchNorm layer that will load the file  [default: the statistics' eps]")
@option("--gamma", type=KeepsSpec(ValueOrFile()),
              help="torch: the layer's weight, a number or a file of shape (C,); 'none' is 1  [default: 1]")
@option("--beta", type=KeepsSpec(ValueOrFile()),
              help="torch: the layer's bias, a number or a file of shape (C,); 'none' is 0  [default: 0]")
@option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.pass_context
def export(ctx: click.Context, stats_path: str, target: str, output: str, force: bool, **options: Any) -> None:
    """Write fitted STATS in the layout of another toolkit.

    \b
    torch:  running_mean, running_var = 1/inv_std**2 - eps, weight, bias and
            num_batches_tracked: torch.nn.BatchNormNd(C, eps=eps).eval() then
            computes what 'normstats apply' computes (needs --axes auto, or
            --channel-axis A: the layer then takes the input with A moved to 1).
    keras:  mean, variance = 1/inv_std**2 and axis for
            keras.layers.Normalization(axis=..., mean=..., variance=...).
    kaldi:  [[sum..., count], [sum of squares..., 0]] as a binary double
            matrix for apply-cmvn (--mode exact; features x dims).
    espnet: count, sum, sum_square for GlobalMVN (--mode exact; .npz), or
            ESPnet1's CMVN matrices as compute_cmvn_stats.py writes them
            (.npy global; per group .ark or .h5, one matrix per key).

    \b
    Example:
      normstats export exact.npz --to torch -o bn.safetensors
    """
    guard(ctx, CommandFiles().reads("stats file", stats_path).reads("--gamma file", given_file(ctx, "gamma"))
          .reads("--beta file", given_file(ctx, "beta")).writes("output", output, TARGET_FORMATS[target]),
          force=force)
    given = {name: value for name, value in options.items() if value is not None}
    if target != "torch" and given:
        raise click.UsageError(
            f"{', '.join('--' + name for name in given)} appl{'ies' if len(given) == 1 else 'y'} to "
            "--to torch only"
        )
    result = ns.export_stats(ns.read_stats(stats_path), target, output, **given)
    click.echo(f"export {target}: {result.summary} -> {output}")


@cli.command("import")
@click.argument("state_path", metavar="STATE_DICT")
@option("-o", "--output", required=True, metavar="STATS",
              help="Stats file to write (.npz, .h5, .safetensors or .json).")
@option("--prefix", metavar="NAME",
              help="The BatchNorm layer to take, by its name in the state dict (e.g. layer1.0.bn1); "
                   "needed when the file holds several.")
@option("--eps", type=EPS,
              help="The layer's eps, which a state dict does not hold  [default: as recorded by "
                   "normstats export, else 1e-5 (PyTorch's default)]")
@option("--row-shape", type=ShapeType(),
              help="Shape of one input row, channels first, e.g. 64,32,32 for images  "
                   "[default: as recorded by normstats export, else C]")
@option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.pass_context
def import_state_dict(ctx: click.Context, state_path: str, output: str, prefix: Optional[str], eps: Optional[float],
                      row_shape: Optional[tuple[int, ...]], force: bool) -> None:
    """Turn a PyTorch BatchNorm layer's running statistics (a .safetensors
    state dict) into a stats file:

    \b
      mean = running_mean,  inv_std = 1 / sqrt(running_var + eps)

    'normstats apply' with it, and with --gamma/--beta set to the layer's
    weight and bias (STATE_DICT:NAME.weight), computes what the layer
    computes in eval mode.

    \b
    Example:
      normstats import model.safetensors --prefix layer1.0.bn1 -o bn1.npz
    """
    guard(ctx, CommandFiles().reads("state dict", state_path).writes("output", output, STATS_FORMATS), force=force)
    stats = ns.import_torch(state_path, prefix=prefix, eps=eps, row_shape=row_shape)
    ns.write_stats(stats, output)
    meta = stats.meta
    channels = meta["row_shape"][0]
    click.echo(
        f"import: {meta['imported_layer'] or 'BatchNorm layer'} ({channels} channel{'s' if channels != 1 else ''}, "
        f"eps {meta['eps']:g}, {meta['batches_seen']:,} batches) from {state_path} -> {output}"
    )
