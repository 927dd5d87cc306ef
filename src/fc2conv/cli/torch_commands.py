"""PyTorch commands: ``fc2conv convolutionalize`` and the ``.pt2`` half of ``fc2conv convert``.

Thin: parse, call one public function, verify, print. Models travel as ``torch.export``
programs (``.pt2``), never pickles. torch is imported inside the functions so
``fc2conv --help`` stays fast.
"""

from __future__ import annotations

import os
from typing import Any

import click

from fc2conv.errors import Fc2ConvError

VERIFY_SAMPLES = 4


def _verify(original: Any, converted: Any, inputs: tuple[Any, ...]) -> tuple[bool, str]:
    """``fc2conv.compare`` of ``converted`` against ``original`` on ``inputs`` (plus its own
    random draws): ``(not different, the report's text)``. Outputs that differ only by
    singleton axes (``(N, K)`` vs ``(N, K, 1, 1)``) are aligned by compare."""
    from fc2conv.pytorch.selfcheck import positional
    from fc2conv.verify import compare

    if getattr(inputs, "kwargs", None):  # a program called with keywords
        (original, tensors), (converted, _) = positional(original, inputs), \
            positional(converted, inputs)
        inputs = tensors
    report = compare(original, converted, inputs=inputs, layers=False)
    return report.verdict != "different", str(report)


def _summary(model: Any, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from fc2conv.core.describe import describe

    table = Table(title=title)
    for col in ("layer", "was", "now"):
        table.add_column(col)
    rows = 0
    for name, mod in model.named_modules():
        source = getattr(mod, "fc2conv_source", None)
        if source is not None:
            table.add_row(name, str(getattr(mod, "fc2conv_origin", "")), describe(mod))
            rows += 1
    console = Console()
    if rows:
        console.print(table)
    else:
        console.print(f"{title}: no layer converted")


def _print_field(model: Any, input_shape: tuple[int, ...]) -> Any:
    from rich.console import Console

    from fc2conv.pytorch import receptive_field

    try:
        rf = receptive_field(model, input_shape)
    except Fc2ConvError as err:
        Console().print(f"receptive field: n/a ({err})")
        return None
    Console().print(str(rf))
    return rf


def _has_spatial_layers(gm: Any) -> bool:
    """Whether ``gm`` slides a window over spatial axes (a conv or pool wider than one position,
    or strided), so that a receptive field means something; 1x1 convs from ``to_conv`` do not."""
    from fc2conv.pytorch.ops import adaptive_of, window_of

    for node in gm.graph.nodes:
        w = window_of(gm, node)
        if w is not None and (w.kind != "conv" or any(k != 1 for k in w.kernel)
                              or any(s != 1 for s in w.stride)):
            return True
        if adaptive_of(gm, node) is not None:
            return True
    return False


def convert_pt2(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    to: str,
    check: bool,
    only: tuple[str, ...],
    in_place: bool,
) -> int:
    """``fc2conv convert IN.pt2 OUT.pt2 --to conv|linear``: returns the exit code (0 done,
    1 the check found a difference and nothing was written)."""
    from rich.console import Console

    from fc2conv.files import check_output_path
    from fc2conv.pytorch import export_io, to_conv, to_linear
    from fc2conv.pytorch.trace import strip_guards

    if to not in ("conv", "linear"):
        raise Fc2ConvError(f"--to must be 'conv' or 'linear', got {to!r}")
    check_output_path(in_path, out_path, in_place=in_place)
    program = export_io.load(in_path)
    inputs = export_io.example_input_of(program)
    names = set(only) if only else None
    convert = to_conv if to == "conv" else to_linear
    converted = convert(program, inputs, only=names)
    if check:
        original = strip_guards(program.module())  # type: ignore[arg-type]
        ok, text = _verify(original, converted, inputs)
        Console().print(f"check: {text}")
        if not ok:
            return 1
    _summary(converted, f"{os.path.basename(in_path)} -> {to}")
    if to == "conv":
        from fc2conv.cli.convert import print_layout_changes
        from fc2conv.pytorch.layout import layout_changes

        print_layout_changes(Console(), [str(c) for c in layout_changes(converted)])
    first = inputs[0] if inputs else None
    if first is not None and first.dim() >= 3 and _has_spatial_layers(converted):
        _print_field(converted, tuple(first.shape[1:]))
    export_io.save(export_io.export(converted, inputs), out_path)
    Console().print(f"wrote {out_path}")
    return 0


def _parse_shape(ctx: Any, param: Any, value: str) -> tuple[int, ...]:
    """Click callback: ``"3,224,224"`` (or ``3x224x224``) -> ``(3, 224, 224)``, exactly three
    positive integers (click reports ``Invalid value for '--input-shape': ...``)."""
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise click.BadParameter(
            f"expected three positive integers C,H,W like 3,224,224, got {value!r}"
        )
    return shape


def _check_pt2_paths(in_path: str, out_path: str) -> None:
    """``convolutionalize`` reads and writes ``.pt2`` programs only; say what to do instead."""
    from pathlib import Path

    suffix = Path(in_path).suffix.lower()
    if suffix == ".onnx":
        raise Fc2ConvError(
            f"{in_path} is ONNX; convolutionalize reads torch.export programs (.pt2). For ONNX "
            f"use: fc2conv convert {in_path} OUT.onnx --to conv --dynamic-spatial"
        )
    if suffix in (".pt", ".pth", ".bin", ".pkl"):
        raise Fc2ConvError(
            f"{in_path} is a pickle, and fc2conv does not load pickles (loading one runs any "
            f"code it contains); export the model with torch.export.save(torch.export.export("
            f"model, (example,)), 'model.pt2')"
        )
    if suffix != ".pt2":
        raise Fc2ConvError(
            f"{in_path}: unsupported file type {suffix or '(no suffix)'!r}; convolutionalize "
            f"reads torch.export programs (.pt2)"
        )
    if Path(out_path).suffix.lower() != ".pt2":
        raise Fc2ConvError(
            f"{out_path}: the output must be a .pt2 file (convolutionalize writes a "
            f"torch.export program)"
        )


@click.command(epilog="""\b
Example:
  fc2conv convolutionalize vgg.pt2 vgg_fcn.pt2 --input-shape 3,224,224
""")
@click.argument("in_path", metavar="IN.pt2")
@click.argument("out_path", metavar="OUT.pt2")
@click.option("--input-shape", required=True, callback=_parse_shape,
              help="Training input size C,H,W (e.g. 3,224,224).")
@click.option("--global-pool", type=click.Choice(["dense", "keep", "drop"]), default="dense",
              show_default=True,
              help="Global-average-pool heads: dense = a stride-1 pool of the training-size "
                   "map (each cell is the classifier on its window); keep = pool globally "
                   "(the logits at any size); drop = the pre-pool map of per-position scores.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare the logits at the training size with the original.")
@click.option("--in-place", is_flag=True, help="Allow OUT to be IN (replaced atomically).")
def convolutionalize(in_path: str, out_path: str, input_shape: tuple[int, ...], global_pool: str,
                     check: bool, in_place: bool) -> None:
    """Make a classifier fully convolutional: (N, classes, 1, 1) at the training size, a dense
    score map on larger images. Prints the receptive field of each cell."""
    import sys

    import torch
    from rich.console import Console

    from fc2conv.files import check_output_path
    from fc2conv.pytorch import convolutionalize as convolutionalize_model
    from fc2conv.pytorch import export_io
    from fc2conv.pytorch.convolutionalize import PooledMap
    from fc2conv.pytorch.trace import strip_guards

    shape = input_shape
    _check_pt2_paths(in_path, out_path)
    check_output_path(in_path, out_path, in_place=in_place)
    program = export_io.load(in_path)
    dense = convolutionalize_model(program, shape, global_pool=global_pool)
    console = Console()
    if check:
        original = strip_guards(program.module())  # type: ignore[arg-type]
        x = torch.randn(VERIFY_SAMPLES, *shape)
        # with "drop", the map of scores per position averages to the logits
        check_model: Any = PooledMap(dense) if global_pool == "drop" else dense
        ok, text = _verify(original, check_model, (x,))
        console.print(f"check at {'x'.join(map(str, shape))}: {text}")
        if not ok:
            sys.exit(1)
    _summary(dense, f"{os.path.basename(in_path)} -> fully convolutional")
    rf = _print_field(dense, shape)
    if rf is not None and not rf.exact:
        from fc2conv.pytorch import is_window_exact

        console.print(f"measured: {is_window_exact(dense, shape)}")
    grow = rf.stride if rf is not None else (0,) * (len(shape) - 1)
    example = torch.randn(2, shape[0], *(s + g for s, g in zip(shape[1:], grow, strict=True)))
    export_io.save(export_io.export(dense, (example,), min_spatial=shape[1:]), out_path)
    console.print(f"wrote {out_path}")
