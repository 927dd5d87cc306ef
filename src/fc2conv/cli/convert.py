"""``fc2conv convert IN OUT --to conv|linear``: rewrite a model file and prove it still matches.

Dispatches on the input suffix: ``.onnx`` -> :mod:`fc2conv.onnx`; ``.pt2`` ->
``fc2conv.cli.torch_commands.convert_pt2``. Prints a summary table (converted / left / why),
then with ``--check`` runs both models on fresh random inputs and prints the verdict.
Exit codes: 0 ok, 1 verification failed, 2 bad input (one ``fc2conv: error:`` line).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fc2conv.errors import Fc2ConvError

SUPPORTED = ".onnx (ONNX) and .pt2 (torch.export)"
PROGRESS_NODES = 200  # show progress bars on graphs with more candidate nodes than this


@click.command(
    "convert",
    epilog="""\b
Examples:
  fc2conv convert model.onnx model_conv.onnx --to conv
  fc2conv convert bert.onnx bert_ane.onnx --to conv --layout ane
  fc2conv convert model.onnx model_fc1.onnx --to conv --only /blocks.0/fc1/MatMul
  fc2conv convert model_conv.onnx model_lin.onnx --to linear
  fc2conv convert big.onnx big.onnx --to conv --in-place --no-check
""",
)
@click.argument("in_path", metavar="IN", type=click.Path(path_type=Path))
@click.argument("out_path", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to",
    type=click.Choice(["conv", "linear"]),
    required=True,
    help="conv: Gemm/MatMul -> Conv; linear: 1x1 Conv -> MatMul.",
)
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Run both models on random inputs and compare (and run the ONNX checker).",
)
@click.option(
    "--only",
    multiple=True,
    metavar="NAME",
    help="Convert only the node(s) with this name (repeatable).",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Allow OUT == IN (written to a temporary file, then atomically replaced).",
)
@click.option(
    "--dynamic-spatial",
    is_flag=True,
    help="ONNX --to conv: make Flatten+Gemm convs slide over larger images.",
)
@click.option(
    "--layout",
    type=click.Choice(["channels_first", "ane"]),
    default="channels_first",
    show_default=True,
    help="ONNX --to conv: ane = Conv2d on (B, C, 1, S), activations kept there across norms, "
    "residuals and attention (one layout change per input and output where the model allows).",
)
def convert(
    in_path: Path,
    out_path: Path,
    to: str,
    check: bool,
    only: tuple[str, ...],
    in_place: bool,
    dynamic_spatial: bool,
    layout: str,
) -> None:
    """Rewrite fully connected layers of IN as convolutions (or back) and write OUT."""
    suffix = in_path.suffix.lower()
    if suffix not in (".pt2", ".onnx"):
        raise Fc2ConvError(
            f"{in_path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"fc2conv convert reads {SUPPORTED}"
        )
    check_same_format(in_path, out_path)
    if suffix == ".pt2":
        from fc2conv.cli.torch_commands import convert_pt2

        sys.exit(convert_pt2(in_path, out_path, to=to, check=check, only=only, in_place=in_place))
    sys.exit(
        _convert_onnx(in_path, out_path, to, check, only, in_place, dynamic_spatial, layout)
    )


def print_layout_changes(console, changes) -> None:  # type: ignore[no-untyped-def]
    """``N layout changes in the converted graph:`` and one line per change, where it sits."""
    console.print(f"{len(changes)} layout change{'s' if len(changes) != 1 else ''} "
                  f"in the converted graph" + (":" if changes else ""))
    for change in changes:
        console.print(f"  {change}", markup=False, highlight=False)


def check_same_format(in_path: Path, out_path: Path) -> None:
    """Refuse an OUT whose suffix is not IN's: convert writes the format it read."""
    want, got = in_path.suffix.lower(), out_path.suffix.lower()
    if got != want:
        raise Fc2ConvError(
            f"{out_path}: the output must be a {want} file like the input {in_path.name} "
            f"(convert writes the format it reads; got {got or 'no suffix'!r})"
        )


def _convert_onnx(
    in_path: Path,
    out_path: Path,
    to: str,
    check: bool,
    only: tuple[str, ...],
    in_place: bool,
    dynamic_spatial: bool,
    layout: str = "channels_first",
) -> int:
    from rich.console import Console

    from fc2conv.files import check_output_path
    from fc2conv.onnx import io
    from fc2conv.onnx.convert import convert_model

    console = Console()
    dst = check_output_path(in_path, out_path, in_place=in_place)
    with console.status(f"Loading {in_path}"):
        model = io.load(in_path, check=check)
    big = io.weight_bytes(model) > (256 << 20) or len(model.graph) > PROGRESS_NODES
    external = io.wants_external_data(model)  # decided before the rules replace tensors
    with _progress(console, big) as progress:
        task = progress.add_task("Rewriting", total=None)
        report = convert_model(
            model,
            to,
            only=only or None,
            dynamic_spatial=dynamic_spatial,
            on_node=lambda done, total: progress.update(task, completed=done, total=total),
            layout=layout,
        )
        save_task = progress.add_task(f"Writing {dst.name}", total=None)
        assert report.context is not None
        io.save(
            model,
            dst,
            external=external,
            sources=report.context.sources,
            on_tensor=lambda done, total: progress.update(
                save_task, completed=done + 1, total=total
            ),
        )
        progress.update(save_task, completed=1, total=1)
    console.print(
        f"[bold]{in_path.name} -> {dst.name}[/] (--to {report.direction}): "
        f"{len(report.converted)} converted, {len(report.left)} left"
    )
    console.print(_summary_table(report))
    console.print(
        f"Transpose nodes: {report.transposes_before} before, "
        f"{report.transposes_after} after ({report.layout_changes_shared} layout "
        f"change pairs shared between neighbouring layers)"
    )
    print_layout_changes(console, report.layout_changes)
    if not check:
        return 0
    with console.status("Checking the output with onnx.checker"):
        io.check_file(dst)
    from fc2conv.verify import compare

    with console.status("Comparing both models in onnxruntime against a float64 reference"):
        try:
            verdict = compare(in_path, dst, layers=False)
        except Exception as err:  # the conversion stands; only its check could not run
            reason = " ".join(str(err).split()) or type(err).__name__
            console.print(f"check (onnxruntime): not run, so {dst.name} is written unchecked "
                          f"({reason})", markup=False, highlight=False)
            return 0
    console.print("check (onnxruntime): ", end="")
    console.print(str(verdict), markup=False, highlight=False)
    return 0 if verdict.verdict != "different" else 1


def _progress(console, enabled: bool):  # type: ignore[no-untyped-def]
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:

        class _Quiet:
            def add_task(self, *a, **k) -> int:  # type: ignore[no-untyped-def]
                return 0

            def update(self, *a, **k) -> None:  # type: ignore[no-untyped-def]
                return None

        return contextlib.nullcontext(_Quiet())
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _summary_table(report):  # type: ignore[no-untyped-def]
    from rich.table import Table

    table = Table()
    table.add_column("node")
    table.add_column("op")
    table.add_column("result")
    table.add_column("into / why not")
    for e in report.entries:
        style = "green" if e.status == "converted" else "yellow"
        table.add_row(e.node, e.op, f"[{style}]{e.status}[/]", e.detail)
    return table
