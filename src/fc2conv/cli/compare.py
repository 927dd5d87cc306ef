"""``fc2conv compare A B``: are two model files the same function, up to rounding?

Exit status: 0 identical or equivalent, 1 different, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import sys

import click

from fc2conv.errors import Fc2ConvError

EPILOG = """\b
Examples:
  fc2conv compare mlp.pt2 mlp_conv.pt2
  fc2conv compare model.onnx model_conv.onnx --input-shape 3,224,224
  fc2conv compare a.pt2 b.onnx --json > report.json
  fc2conv compare bert.onnx bert_conv.onnx --inputs tokens.npz   (named arrays; "0:input_ids",
                                                                 "1:input_ids", ... for draws)
  fc2conv compare old.pt new.pt --trust-pickle   (pickles run code: only files you trust)
"""


def _shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        dims = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape like 3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise click.BadParameter(f"{value!r} is not a shape like 3,224,224")
    return dims


def read_npz(path: str) -> dict[str, object] | list[dict[str, object]]:
    """Named arrays of a ``.npz`` (pickled object arrays refused): one draw, or several when
    every name reads ``K:NAME``."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise Fc2ConvError(f"--inputs {path}: not a readable .npz of arrays ({err})") from None
    if not arrays:
        raise Fc2ConvError(f"--inputs {path} holds no arrays")
    keyed = [k.partition(":") for k in arrays]
    if all(sep and k.isdigit() for k, sep, _ in keyed):
        draws: dict[int, dict[str, object]] = {}
        for (k, _, name), value in zip(keyed, arrays.values(), strict=True):
            draws.setdefault(int(k), {})[name] = value
        return [draws[k] for k in sorted(draws)]
    return dict(arrays)


@click.command("compare", epilog=EPILOG)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--input-shape", callback=_shape, metavar="D1,D2,...",
              help="Shape of the input; a batch axis is added if the model expects one more "
                   "(its own batch size, else 2). Default: from the models' input specs.")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Random input draws (the last one large-magnitude).")
@click.option("--layers/--no-layers", default=True, show_default=True,
              help="Compare layer by layer to find the first divergence.")
@click.option("--seed", type=int, default=None,
              help="Seed of the random inputs (the report prints the one it used).")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False, exists=True),
              help="A .npz of named input arrays (one draw), or of arrays named K:NAME for "
                   "draws K = 0, 1, ... (never unpickled).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow .pt/.pth pickles (loading one runs arbitrary code).")
def compare_command(a: str, b: str, input_shape: tuple[int, ...] | None, samples: int,
                    layers: bool, seed: int | None, inputs_file: str | None, as_json: bool,
                    trust_pickle: bool) -> None:
    """Compare models A and B (.pt2 or .onnx) and say whether they compute the same function.

    The verdict is "identical" (bitwise), "equivalent" (differences within what floating-point
    rounding can produce, by a forward-error bound) or "different", with the first diverging
    layer and the likely cause.
    """
    import warnings

    from fc2conv.verify import compare

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecation notes
    try:
        inputs = None if inputs_file is None else read_npz(inputs_file)
        report = compare(a, b, inputs, input_shape=input_shape, samples=samples, layers=layers,
                         trust_pickle=trust_pickle, seed=seed)
    except Fc2ConvError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (RuntimeError, TypeError, IndexError) as err:  # a model that cannot run on the input
        raise Fc2ConvError(f"could not run the models: {str(err).splitlines()[0]}") from None
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(str(report))
    sys.exit(0 if report.verdict != "different" else 1)
