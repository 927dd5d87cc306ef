"""``fc2conv demo``: the Linear <-> conv equivalence, walked through with numbers computed live.

The numbers come from :mod:`fc2conv.cli.experiments`; this module only prints them (rich tables,
colour on a TTY only) and writes the figure of part 1 (:mod:`fc2conv.cli.figures`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console

    from fc2conv.cli.experiments import ClassicResult, FlattenLimits, SamplesLimits, SeedExample

FIGURE_NAME = "fc2conv-demo.png"
# One colour per spatial position, shared with the figure (figures.POSITION_COLOURS).
POSITION_STYLES = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")

EPILOG = """\b
Examples:
  fc2conv demo                        all three parts, figure in ./fc2conv-demo.png
  fc2conv demo --out-dir /tmp/figs    write the figure elsewhere
  fc2conv demo --no-figure --seed 3   other random numbers, no PNG
"""


@click.command(epilog=EPILOG)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder for the figure of part 1 (must exist).")
@click.option("--no-figure", is_flag=True, help="Do not write the PNG figure.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random weight and input.")
def demo(out_dir: Path, no_figure: bool, seed: int) -> None:
    """Show, with numbers computed now, why a 1x1 conv IS a fully connected layer, why the
    classic "Linear vs conv give different outputs" experiment is only rounding, and where the
    equivalence stops."""
    from rich.console import Console

    from fc2conv.cli import experiments
    from fc2conv.errors import Fc2ConvError

    if not no_figure and not out_dir.is_dir():
        raise Fc2ConvError(f"the output folder {out_dir} does not exist; create it or pass "
                           f"--out-dir with an existing folder")
    console = Console(highlight=False)
    example = experiments.run_seed_example(seed)
    _print_seed_example(console, example)
    if not no_figure:
        from fc2conv.cli.figures import draw_seed_example

        path = out_dir / FIGURE_NAME
        draw_seed_example(example, path)
        console.print(f"Figure of part 1 written to [bold]{path.resolve()}[/]")
    results = [experiments.run_classic_experiment(w, seed) for w in ("ones", "random")]
    _print_classic(console, results)
    _print_limits(console, experiments.run_flatten_limits(seed),
                  experiments.run_samples_limits(seed))


# --------------------------------------------------------------------------------------------
# the verdict (to be replaced by fc2conv.compare(result.linear, result.conv, inputs=result.x))
# --------------------------------------------------------------------------------------------


def _verdict(result: ClassicResult) -> tuple[str, str]:
    """``("identical" | "equivalent" | "different", reason)`` for the two models of ``result``,
    decided by :func:`fc2conv.compare` on the experiment's own input: each model must stay
    within the running Higham bound of the float64 reference, output by output and layer by
    layer; the reason is compare's diagnosis when they differ."""
    from fc2conv.verify import compare

    report = compare(result.linear, result.conv, inputs=(result.x,))
    if report.verdict == "identical":
        return "identical", "bitwise equal outputs"
    if report.verdict == "equivalent":
        return "equivalent", "the difference is floating-point summation order, not a bug"
    where = f" (first divergence: {report.first_divergence})" if report.first_divergence else ""
    return "different", (report.diagnosis or "outside what rounding can explain") + where


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    return f"{v:+.4f}"


def _sci(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.2e}"


def _position_names(h: int, w: int) -> list[str]:
    return [f"({i},{j})" for i in range(h) for j in range(w)]


def _print_seed_example(console: Console, ex: SeedExample) -> None:
    from rich import box
    from rich.panel import Panel
    from rich.table import Table

    from fc2conv.core.rounding import ulp

    c, h, w = ex.x.shape
    names = _position_names(h, w)
    console.rule("[bold]1. A 1x1 conv IS a fully connected layer, in two ways")
    wv = ", ".join(f"{float(v):+.2f}" for v in ex.weight[0])
    console.print(
        f"Conv2d 2->1, kernel 1x1, on an input x of 2 channels of 2x2 (random, 2 decimals). "
        f"Its whole weight is one vector w = [{wv}], plus a bias b = "
        f"{float(ex.bias[0]):+.2f}."
    )

    per = Table(title="(a) four FC layers Linear 2->1, one per position, all with the same w",
                title_justify="left", box=None, padding=(0, 2))
    per.add_column("position")
    per.add_column("x[:, pos]", justify="right")
    per.add_column("w . x[:, pos] + b", justify="right")
    for p, name in enumerate(names):
        i, j = divmod(p, w)
        xs = ", ".join(f"{float(v):+.2f}" for v in ex.x[:, i, j])
        style = POSITION_STYLES[p % len(POSITION_STYLES)]
        per.add_row(f"[{style}]{name}[/]", f"[{xs}]", _num(float(ex.y_per_position[p])))
    console.print(per)

    cols_chw = [f"ch{k}\n{names[p]}" for k in range(c) for p in range(h * w)]
    cols_hwc = [f"ch{k}\n{names[p]}" for p in range(h * w) for k in range(c)]
    for title, matrix, cols in (
        ("(b) one FC layer on the 8 inputs flattened channel-major (chw, PyTorch): "
         "M = as_matrix(conv, (2, 2, 2))", ex.matrix_chw, cols_chw),
        ("(c) the same FC with inputs flattened channels-last (hwc): block diagonal, one copy "
         "of w per position", ex.matrix_hwc, cols_hwc),
    ):
        table = Table(title=title, title_justify="left", padding=(0, 1), box=box.SIMPLE_HEAD)
        table.add_column("out", style="bold")
        for header in cols:
            table.add_column(header, justify="right")
        for r in range(matrix.shape[0]):
            cells = []
            for col in range(matrix.shape[1]):
                v = float(matrix[r, col])
                if v == 0:
                    cells.append("[dim]0[/]")
                else:
                    cells.append(f"[{POSITION_STYLES[r % len(POSITION_STYLES)]}]{v:+.2f}[/]")
            table.add_row(f"[{POSITION_STYLES[r % len(POSITION_STYLES)]}]{names[r]}[/]", *cells)
        console.print(table)
    nnz = int((ex.matrix_chw != 0).sum())
    console.print(f"   {nnz} of {ex.matrix_chw.numel()} entries are non-zero: 4 positions x "
                  f"2 weights; every other entry is a structural zero (position p never reads "
                  f"position q).")

    out = Table(title="The three computations agree", title_justify="left", padding=(0, 1))
    for header in ("position", "conv(x)", "4 FC layers", "M(chw) @ x + b", "M(hwc) @ x + b"):
        out.add_column(header, justify="right")
    for p, name in enumerate(names):
        out.add_row(name, *(_num(float(y[p])) for y in
                            (ex.y_conv, ex.y_per_position, ex.y_matrix, ex.y_matrix_hwc)))
    console.print(out)
    spacing = float(ulp(ex.y_conv.abs().max(), ex.y_conv.dtype))
    console.print(Panel(f"max difference between any two: {_sci(ex.max_difference)}  "
                        f"(one float32 ULP at this scale is {_sci(spacing)})", expand=False))


def _print_classic(console: Console, results: list[ClassicResult]) -> None:
    from rich.table import Table

    console.rule("[bold]2. The classic experiment: Linear MLP vs the same MLP as 1x1 convs")
    console.print(
        "MLP 256->64->128->256->4 (ReLU between) on x = torch.rand(16, 5, 256); the conv twin "
        "uses fc2conv.linear_to_conv per layer on x.permute to (16, 256, 1, 5). Float32 on CPU, "
        "reference: the same MLP in float64. Bound: Higham's forward error, layer by layer, "
        "|W| e + γ_(n+1) (|W||x| + |b|), ReLU passes e on."
    )
    table = Table(padding=(0, 1))
    table.add_column("")
    for r in results:
        table.add_column("weights = 1" if r.weights == "ones" else "random weights",
                         justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("output scale max |ref|", [_sci(r.output_scale) for r in results]),
        ("max |linear - ref|", [_sci(r.err_linear) for r in results]),
        ("max |conv - ref|", [_sci(r.err_conv) for r in results]),
        ("max |linear - conv|", [_sci(r.diff) for r in results]),
        ("ULPs linear vs ref", [f"{r.ulps_linear:.0f}" for r in results]),
        ("ULPs conv vs ref", [f"{r.ulps_conv:.0f}" for r in results]),
        ("ULPs linear vs conv", [f"{r.ulps_diff:.0f}" for r in results]),
        ("bitwise equal outputs", [f"{r.identical_fraction:.1%}" for r in results]),
        *((f"Higham bound after Linear {k + 1}", [_sci(r.layer_bounds[k]) for r in results])
          for k in range(len(results[0].layer_bounds))),
        ("both within bound", ["yes" if all(r.within_bound) else "[bold red]NO[/]"
                               for r in results]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    verdicts = [_verdict(r) for r in results]
    colour = {"identical": "green", "equivalent": "green", "different": "bold red"}
    table.add_row("verdict", *(f"[{colour[v]}]{v}[/]" for v, _ in verdicts))
    console.print(table)
    for r, (v, reason) in zip(results, verdicts, strict=True):
        label = "weights = 1" if r.weights == "ones" else "random weights"
        console.print(f"  {label}: [bold]{v}[/]: {reason}.")
    console.print("  ULPs are measured at max(|a|, |b|, u * output scale). Verdicts come from "
                  "fc2conv.compare, which also measures the rounding noise of the Linear model "
                  "(its float64 twin under ~sqrt(n)·u perturbations): with random weights the "
                  "worst-case bound is loose (weights cancel), the measured noise is not. "
                  "Try it on your own models: fc2conv compare A.pt2 B.onnx")


def _print_limits(console: Console, flat: FlattenLimits, samples: SamplesLimits) -> None:
    from rich import box
    from rich.table import Table

    from fc2conv.core.describe import describe, shape_str

    console.rule("[bold]3. Where the equivalence stops")
    c, h, w = flat.in_shape
    console.print(
        f"(a) {describe(flat.linear)} over a flattened {shape_str(flat.in_shape)} map is a conv "
        f"whose kernel is the whole map: flatten_linear_to_conv -> {describe(flat.conv)}."
    )
    t = Table(padding=(0, 1), box=box.SIMPLE_HEAD)
    t.add_column("", no_wrap=True)
    t.add_column(describe(flat.linear).replace(" ", "\n"), justify="right")
    t.add_column(f"conv {h}x{w}\norder chw", justify="right")
    t.add_column(f"conv {h}x{w}\nhwc (wrong)", justify="right")
    t.add_column(f"1x1 conv\n{c}->{flat.out_features}", justify="right")
    t.add_row("parameters", *(str(v) for v in (flat.params_linear, flat.params_conv,
                                                flat.params_conv, flat.params_1x1)))
    t.add_row("outputs per map", str(flat.out_features), str(flat.out_features),
              str(flat.out_features), str(flat.outputs_1x1))
    t.add_row("max |y - Linear|", "", f"{_sci(flat.err_conv)}",
              f"[bold red]{_sci(flat.err_wrong_order)}[/]", "(other shape)")
    t.add_row("outputs moved by x[:, 0, 0]", f"{flat.fc_changed}",
              f"{flat.conv_changed}", "", f"{flat.conv1x1_changed} of {flat.outputs_1x1}")
    console.print(t)
    console.print(f"    Right order: within rounding (bound {_sci(flat.rounding_bound)}); wrong "
                  f"order: errors as large as the outputs (~{_sci(flat.output_scale)}).")
    console.print("    A 1x1 conv never mixes positions, so it cannot be an FC over the whole map.")

    s = samples
    console.print(
        f"(b) A kernel shared across a samples axis ({s.samples} samples of {s.features} "
        f"features -> {s.out_features}, a 1x1 conv) vs one FC over all "
        f"{s.samples * s.features} features."
    )
    t = Table(padding=(0, 1), box=box.SIMPLE_HEAD)
    t.add_column("", no_wrap=True)
    t.add_column("1x1 conv (shared)", justify="right")
    t.add_column(f"FC {s.samples * s.features}->{s.samples * s.out_features}", justify="right")
    t.add_row("parameters", str(s.params_conv), str(s.params_fc))
    t.add_row("max change of sample 1's outputs\nwhen only sample 0 changes",
              f"{_sci(s.conv_leak)}", f"[bold]{_sci(s.fc_leak)}[/]")
    console.print(t)
    console.print(
        f"    The conv IS the FC whose {s.samples * s.out_features}x{s.samples * s.features} "
        f"weight is block diagonal ({'yes' if s.block_diagonal else 'NO'}: {s.block_zeros} "
        f"entries forced to 0, max |conv - that FC| = {_sci(s.err_conv_as_fc)}); a general FC "
        f"over all samples mixes samples and is not a conv."
    )
