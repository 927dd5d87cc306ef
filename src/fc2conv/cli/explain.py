"""``fc2conv explain``: parameter counts, multiply-adds and the equivalent forms of one layer.

Parses the spec, calls :func:`fc2conv.cli.layer_facts.conv_facts` or ``linear_facts``, prints
the result, and with ``--png`` draws it (:mod:`fc2conv.cli.figures`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from fc2conv.cli.layer_facts import LayerFacts

# Largest one-FC matrix drawn cell by cell; larger specs get the position-level structure.
SMALL_ROWS, SMALL_COLS = 64, 128
# A plain Linear is drawn applied at this many positions, to show the weight sharing.
LINEAR_POSITIONS = 3

EPILOG = """\b
Examples:
  fc2conv explain --in-channels 2 --out-channels 1 --spatial 2x2
  fc2conv explain --in-channels 3 --out-channels 4 --spatial 5x5 --kernel 3x3 --png conv.png
  fc2conv explain --linear 9216x4096 --in-shape 256x6x6      (AlexNet's first FC)
  fc2conv explain --linear 12x2 --in-shape 3x2x2 --order hwc --png fc.png
  fc2conv explain --linear 256x64                            (a plain Linear)
"""


@click.command(epilog=EPILOG)
@click.option("--in-channels", type=int, help="Conv: input channels C.")
@click.option("--out-channels", type=int, help="Conv: output channels O.")
@click.option("--spatial", metavar="HxW", help="Conv: input spatial size, 1-3 dims (e.g. 2x2).")
@click.option("--kernel", metavar="KHxKW", help="Conv: kernel size (default 1x1); stride 1, "
              "no padding.")
@click.option("--linear", "linear", metavar="INxOUT", help="A Linear IN->OUT (e.g. 9216x4096).")
@click.option("--in-shape", metavar="CxHxW",
              help="Linear: the map it reads, flattened (C*H*W must equal IN).")
@click.option("--order", type=click.Choice(["chw", "hwc"]), default=None,
              help="Linear: flatten order of --in-shape (chw: PyTorch, the default; hwc: "
                   "channels-last).")
@click.option("--no-bias", is_flag=True, help="The layer has no bias.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the layer's one-FC matrix (or its structure) to this PNG.")
def explain(in_channels: int | None, out_channels: int | None, spatial: str | None,
            kernel: str | None, linear: str | None, in_shape: str | None, order: str | None,
            no_bias: bool, png: Path | None) -> None:
    """Explain one layer: a conv (--in-channels, --out-channels, --spatial [--kernel]) or a
    Linear (--linear [--in-shape --order]). Prints parameters, multiply-adds and the layers it is
    exactly equal to."""
    from fc2conv.cli import layer_facts
    from fc2conv.errors import Fc2ConvError

    if png is not None and png.suffix.lower() != ".png":
        raise Fc2ConvError(f"--png writes a PNG image; name the file *.png, not {png.name!r}")
    if order is not None and in_shape is None:
        raise Fc2ConvError("--order is the flatten order of --in-shape; give --in-shape too")
    conv_opts = {"--in-channels": in_channels, "--out-channels": out_channels,
                 "--spatial": spatial, "--kernel": kernel}
    given = [name for name, v in conv_opts.items() if v is not None]
    if linear is not None:
        if given:
            raise Fc2ConvError(f"give either a conv ({', '.join(given)}) or --linear, not both")
        size = layer_facts.parse_dims(linear, "--linear", 2)
        shape = layer_facts.parse_dims(in_shape, "--in-shape") if in_shape else None
        facts = layer_facts.linear_facts(size[0], size[1], shape, order or "chw",
                                         bias=not no_bias)
    else:
        if in_shape is not None:
            raise Fc2ConvError("--in-shape describes the map a --linear reads; for a conv use "
                               "--in-channels and --spatial")
        missing = [n for n in ("--in-channels", "--out-channels", "--spatial")
                   if conv_opts[n] is None]
        if missing:
            raise Fc2ConvError(f"missing {', '.join(missing)}: explain needs a conv "
                               f"(--in-channels, --out-channels, --spatial) or --linear INxOUT")
        assert in_channels is not None and out_channels is not None and spatial is not None
        facts = layer_facts.conv_facts(
            in_channels, out_channels, layer_facts.parse_dims(spatial, "--spatial"),
            layer_facts.parse_dims(kernel, "--kernel") if kernel else None, bias=not no_bias)
    if png is not None and not png.resolve().parent.is_dir():
        raise Fc2ConvError(f"the output folder {png.parent} does not exist")
    _print_facts(facts)
    if png is not None:
        draw_facts(facts, png)
        click.echo(f"Figure written to {png.resolve()}")


def draw_facts(facts: LayerFacts, path: Path) -> None:
    """The figure of ``facts``: every cell of the one-FC matrix when small, else its structure."""
    import torch
    from torch import nn

    from fc2conv.cli import figures
    from fc2conv.core import linear_to_conv
    from fc2conv.core.describe import shape_str

    module = facts.module
    if isinstance(module, nn.Linear) and len(facts.in_shape) > 1:
        figures.draw_flatten_columns(facts.in_shape, module.out_features, facts.order, path,
                                     f"{facts.description}: which input each weight column reads")
        return
    small = facts.matrix_rows <= SMALL_ROWS and facts.matrix_cols <= SMALL_COLS
    if small:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            real = module.to_empty(device="cpu")
            for p in real.parameters():
                nn.init.uniform_(p, -1, 1)  # values for the picture only: a structure demo
        title = f"{facts.description} as one FC layer (random weights)"
        if isinstance(real, nn.Linear):  # show the sharing: the Linear at LINEAR_POSITIONS
            title = (f"{facts.description} applied at {LINEAR_POSITIONS} positions (a Conv1d "
                     f"kernel 1) as one FC layer (random weights)")
            real, in_shape = linear_to_conv(real, dims=1), (*facts.in_shape, LINEAR_POSITIONS)
        else:
            in_shape = facts.in_shape
        figures.draw_conv_matrix(real, in_shape, path, title)
        return
    kernel: tuple[int, ...]
    spatial: tuple[int, ...]
    description = f"{facts.description} as one FC layer, {facts.matrix_rows}x{facts.matrix_cols}"
    if isinstance(module, nn.Linear):
        kernel, spatial = (1,), (LINEAR_POSITIONS,)
        block = (module.out_features, module.in_features)
        description = (f"{facts.description} applied at {LINEAR_POSITIONS} positions (a Conv1d "
                       f"kernel 1) as one FC layer")
    else:
        assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        kernel = tuple(module.kernel_size)
        spatial = facts.in_shape[1:]
        block = (module.out_channels, module.in_channels)
    figures.draw_position_structure(kernel, spatial, block, path,
                                    f"{description} (kernel {shape_str(kernel)})")


def _count(n: int) -> str:
    """``37752832`` -> ``"37,752,832 (37.8M)"``."""
    if n < 10_000:
        return f"{n:,}"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n:,} ({n / div:.1f}{unit})"
    return f"{n:,}"  # pragma: no cover


def _print_facts(facts: LayerFacts) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from fc2conv.core.describe import shape_str

    console = Console(highlight=False)
    console.rule(f"[bold]{facts.description}")
    table = Table(box=box.SIMPLE_HEAD, show_header=False, padding=(0, 1))
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("")
    table.add_row("input -> output", f"{shape_str(facts.in_shape)} -> "
                                     f"{shape_str(facts.out_shape)} (per sample)")
    table.add_row("parameters", _count(facts.params))
    table.add_row("multiply-adds", f"{_count(facts.macs)} per sample (FLOPs = 2 x MACs = "
                                   f"{_count(facts.flops)}; bias adds not counted)")
    table.add_row("as one FC layer", f"weight {facts.matrix_rows:,} x {facts.matrix_cols:,} = "
                                     f"{_count(facts.matrix_entries)} entries, "
                                     f"{_count(facts.matrix_nonzeros)} non-zero "
                                     f"({facts.sparsity:.2%} structural zeros)")
    console.print(table)
    console.print("[bold]Exactly equal to:[/]")
    forms = Table.grid(padding=(0, 1))
    forms.add_column(no_wrap=True)
    forms.add_column()
    for form in facts.forms:
        forms.add_row("  =", form)
    for note in facts.notes:
        forms.add_row("  [yellow]≠[/]", note)
    console.print(forms)
