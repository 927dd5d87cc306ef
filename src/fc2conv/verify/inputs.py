"""Inputs for ``compare``: the user's, or fresh random draws from the models' input specs.

Shapes come from (first that applies): ``input_shape``; model ``a``'s or ``b``'s input specs
(ONNX value infos, ExportedProgram signatures). ``input_shape`` is the full shape of the (single)
input; when a model's spec has exactly one more dimension, a batch dimension is prepended (the
spec's own when static, else 2), so ``--input-shape 3,224,224`` fits an image model exported
with a batch axis. Dynamic
dimensions without a value become 2 for the first (batch) axis and 8 elsewhere.

Draws: ``samples`` fresh standard-normal draws (never zeros or ones: structured inputs hide
permutation and bias bugs), the last of them scaled to a large magnitude (1e3; 16 for float16,
whose range ends at 65504) to expose errors that scale with the input. Integer inputs: ids in
``[0, V)`` where ``V`` is the number of rows of the table they index (an ONNX ``Gather`` on an
initializer; a PyTorch model's first ``nn.Embedding`` when random floats cannot feed it), else
``[0, 8)``; the report says which. bool: random.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fc2conv.errors import Fc2ConvError
from fc2conv.verify.models import Model
from fc2conv.verify.values import InputSpec

LARGE_SCALE = {torch.float16: 16.0}
DEFAULT_LARGE = 1e3


def as_tensors(inputs: Any) -> tuple[torch.Tensor, ...]:
    """The user's inputs (a tensor, an array, or a tuple of them) as a tuple of tensors."""
    items = inputs if isinstance(inputs, tuple | list) else (inputs,)
    out = []
    for x in items:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise Fc2ConvError(f"inputs must be tensors or numpy arrays (or a dict of them, or "
                               f"a list of such draws), got {type(x).__name__}")
        out.append(x)
    return tuple(out)


def id_ranges(specs: Sequence[InputSpec]) -> str:
    """The report's sentence on integer draws: "drew integer ids in [0, 99) for input
    'input_ids'" (empty when no input is an integer)."""
    parts = [f"[0, {s.high or 8}) for input '{s.name}'" for s in specs
             if not s.dtype.is_floating_point and s.dtype != torch.bool]
    return ("drew integer ids in " + ", ".join(parts)) if parts else ""


def _table_rows(model: Model) -> dict[str, int]:
    """ONNX: rows of the table each integer graph input indexes (``Gather(table, ids)`` with
    ``table`` an initializer, through Cast/Unsqueeze/Reshape/Flatten/Identity/Squeeze)."""
    if model.kind != "onnx" or model.onnx_model is None:
        return {}
    g = model.onnx_model.graph
    tables = {i.name: tuple(i.dims) for i in g.initializer}
    origin = {i.name: i.name for i in g.input}
    rows: dict[str, int] = {}
    for node in g.node:
        if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Flatten", "Identity", "Squeeze") \
                and node.input and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in origin \
                and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = tables[node.input[0]]
            if dims:
                name = origin[node.input[1]]
                rows[name] = min(rows.get(name, 1 << 62), int(dims[axis % len(dims)]))
    return rows


def with_id_ranges(specs: list[InputSpec], a: Model, b: Model) -> list[InputSpec]:
    """New ``specs`` with the id range of each integer input that indexes a table of A or B
    (the models' own specs are left as they are)."""
    rows = {**_table_rows(b), **_table_rows(a)}
    return [replace(spec, high=rows[spec.name])
            if not spec.dtype.is_floating_point and spec.name in rows else spec
            for spec in specs]


def feedable(specs: list[InputSpec], a: Model, seed: int) -> list[InputSpec]:
    """``specs`` that model ``a`` accepts: a PyTorch model that raises on random floats and
    holds an ``nn.Embedding`` gets ids in ``[0, num_embeddings)`` of its first one; if it
    still raises, one sentence says to pass inputs."""
    if a.kind != "torch" or a.module is None or a.specs:
        return specs
    trial = draw(specs, 1, a.dtype, seed)[0]
    first = _failure(a, trial)
    if first is None:
        return specs
    emb = next((m for m in a.module.modules() if isinstance(m, torch.nn.Embedding)), None)
    if emb is not None and all(s.dtype.is_floating_point for s in specs):
        ids = [InputSpec(s.name, s.shape, torch.int64, int(emb.num_embeddings)) for s in specs]
        if _failure(a, draw(ids, 1, a.dtype, seed)[0]) is None:
            return ids
    shapes = ", ".join("x".join(map(str, x.shape)) for x in trial)
    raise Fc2ConvError(
        f"{a.label} cannot run on random inputs of shape {shapes} ({first}): pass inputs it "
        "accepts, inputs= (API) or --inputs FILE.npz (CLI)")


def _failure(model: Model, x: tuple[torch.Tensor, ...]) -> str | None:
    try:
        with torch.no_grad():
            model.run(x)
    except Exception as err:  # the model's own complaint, shortened to one line
        text = " ".join(str(err).split())
        return (text[:160] + "...") if len(text) > 160 else (text or type(err).__name__)
    return None


def _fill(shape: Sequence[int | None]) -> tuple[int, ...]:
    return tuple((2 if i == 0 else 8) if d is None or d <= 0 else int(d)
                 for i, d in enumerate(shape))


def resolve_specs(a: Model, b: Model, input_shape: Sequence[int] | None) -> list[InputSpec]:
    """The input specs to draw from (see the module docstring)."""
    specs = a.specs or b.specs
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if any(d <= 0 for d in shape):
            raise Fc2ConvError(f"input_shape {shape} has a dimension <= 0")
        if len(specs) > 1 and all(len(sp.shape) == len(shape) for sp in specs):
            # token ids, attention mask, token types: one shape for all (batch, length)
            return [InputSpec(sp.name, shape, sp.dtype) for sp in specs]
        if len(specs) > 1:
            raise Fc2ConvError(
                f"the models take {len(specs)} inputs; input_shape describes one — pass inputs="
            )
        dtype = specs[0].dtype if specs else a.dtype
        name = specs[0].name if specs else "input"
        if specs and len(specs[0].shape) == len(shape) + 1:
            batch = specs[0].shape[0]
            shape = (batch if batch else 2, *shape)
        return [InputSpec(name, shape, dtype)]
    if not specs:
        raise Fc2ConvError(
            f"cannot tell what input {a.label} takes: pass inputs=(tensor, ...) or input_shape="
            "(e.g. input_shape=(16, 5, 256); CLI: --input-shape 16,5,256)"
        )
    return specs


def draw(specs: Sequence[InputSpec], samples: int, dtype: torch.dtype,
         seed: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """``samples`` fresh draws (reproducible with ``seed``); the last one large-magnitude. Float
    draws are float32 (each model casts them to its own dtype, model ``a``'s rounding first)."""
    if samples < 1:
        raise Fc2ConvError(f"samples must be at least 1, got {samples}")
    large = LARGE_SCALE.get(dtype, DEFAULT_LARGE)
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    draws = []
    for k in range(samples):
        tensors = []
        for spec in specs:
            shape = _fill(spec.shape)
            if spec.dtype.is_floating_point:
                x = torch.randn(shape, dtype=torch.float64, generator=gen)
                if k == samples - 1 and samples > 1:
                    x = x * large
                tensors.append(x.to(torch.float32))
            elif spec.dtype == torch.bool:
                tensors.append(torch.rand(shape, generator=gen) < 0.5)
            else:
                # small non-negative integers: valid token ids / class indices for any model
                # with a vocabulary of at least 8
                tensors.append(torch.randint(0, spec.high or 8, shape, dtype=spec.dtype,
                                             generator=gen))
        draws.append(tuple(tensors))
    return draws


def input_names(model: Model) -> list[str]:
    """The names of a model's positional inputs, in order: its input specs (ONNX, exported
    programs), else the parameters of ``module.forward``."""
    if model.specs:
        return [s.name for s in model.specs]
    if model.module is None:
        return []
    import inspect

    try:
        params = inspect.signature(model.module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _from_mapping(inputs: Mapping[str, Any], names: list[str]) -> tuple[torch.Tensor, ...]:
    """A dict of named inputs (a tokenizer's output) as positional inputs in the model's order."""
    given = {k: v for k, v in inputs.items() if v is not None}
    unknown = [k for k in given if k not in names]
    if unknown:
        raise Fc2ConvError(f"the model takes no input named {', '.join(map(repr, unknown))}; "
                           f"its inputs are {', '.join(names) or 'unnamed'}")
    last = max(names.index(k) for k in given) if given else -1
    missing = [n for n in names[:last + 1] if n not in given]
    if missing:
        raise Fc2ConvError(f"inputs= names {', '.join(given)} but not {', '.join(missing)}, "
                           "which comes before them; pass it too (inputs are positional)")
    return as_tensors(tuple(given[n] for n in names[:last + 1]))


def as_draws(inputs: Any, model: Model) -> list[tuple[torch.Tensor, ...]]:
    """The user's inputs as a list of draws: a tensor/array, a tuple of them or a dict of named
    inputs (one draw each), or a list of such tuples/dicts (several draws)."""
    if isinstance(inputs, list) and inputs and all(
            isinstance(d, Mapping | tuple | list) for d in inputs):
        items = list(inputs)
    else:
        items = [inputs]
    draws = []
    for item in items:
        if isinstance(item, Mapping):
            draws.append(_from_mapping(item, input_names(model)))
        else:
            draws.append(as_tensors(item))
    if len({len(d) for d in draws}) > 1:
        raise Fc2ConvError("every draw in inputs= must hold the same inputs; "
                           f"got draws of {sorted({len(d) for d in draws})} tensors")
    return draws
