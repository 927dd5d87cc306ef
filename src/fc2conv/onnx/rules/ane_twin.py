"""What the ``layout="ane"`` modules share: the twin of a value, the op sets read from
:data:`fc2conv.core.positionwise.OPS`, permutation arithmetic, and the constants a walk can
read without running the graph (:func:`_const_array`).

A value ``x`` of the Linear layout has a *twin* in the conv layout: ``x'[b, c, 0, s] =
x[b, s, c]`` for a ``(B, S, C)`` activation (``perm`` None), else a rank-4 ``x'`` with
``x = Transpose(x', perm)`` (a value split into heads, ``perm = (0, 3, 1, 2)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from fc2conv.core.positionwise import Channel, onnx_types
from fc2conv.onnx.rules.base import Refused, constant

ELEMENTWISE = onnx_types(Channel.ELEMENTWISE)
BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
UNARY = ELEMENTWISE - BINARY
MIX = onnx_types(Channel.CHANNEL_MIX)
REDUCE = onnx_types(Channel.CHANNEL_REDUCE)
NORM = onnx_types(Channel.CHANNEL_NORM)
STREAM = ELEMENTWISE | MIX | REDUCE | NORM | {"Concat", "Pow"}
HEADS = (0, 3, 1, 2)  # v[b, s, h, d] = v'[b, h, d, s]
IDENTITY = (0, 1, 2, 3)


@dataclass
class Twin:
    """``value`` in the conv layout: ``act`` for ``(B, C, 1, S)`` of a ``(B, S, C)`` value,
    else a rank-4 ``value`` with ``original = Transpose(value, perm)``."""

    value: ir.Value
    perm: tuple[int, ...] | None = None  # None: the act layout
    entered: bool = False  # made by a layout change; the original stays for other readers


@dataclass
class AneResult:
    converted: list[tuple[ir.Node, str]] = field(default_factory=list)
    refused: list[tuple[ir.Node, str]] = field(default_factory=list)
    convs: set[ir.Node] = field(default_factory=set)  # the 1x1 Convs made for MatMuls


def _shape(v: ir.Value | None) -> tuple[int | str | None, ...] | None:
    if v is None or v.shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value if d.value is not None else None)
                 for d in v.shape)


def _same_dim(a: int | str | None, b: int | str | None) -> bool:
    return a is not None and a == b


def _compose(p: Sequence[int], q: Sequence[int]) -> tuple[int, ...]:
    return tuple(p[i] for i in q)


def _inverse(p: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, j in enumerate(p):
        inv[j] = i
    return tuple(inv)


_FOLD: dict[str, Any] = {
    "Cos": np.cos, "Sin": np.sin, "Neg": np.negative, "Add": np.add, "Sub": np.subtract,
    "Mul": np.multiply, "Div": np.divide, "Equal": np.equal, "Where": np.where}


def _const_array(v: ir.Value | None, depth: int = 8) -> np.ndarray | None:
    """The value of ``v`` when it is a constant, or computed from constants by a few cheap ops
    (an exporter's rotary cos/sin tables of a traced length: ``Unsqueeze(Cast(Cos(c) * k))``)."""
    if v is None or v.is_graph_input():
        return None
    try:
        return constant(v, "operand").numpy()
    except Refused:
        pass
    p = v.producer()
    if depth == 0 or p is None or p.domain != "" or len(p.outputs) != 1 \
            or p.op_type not in {*_FOLD, "Cast", "Unsqueeze", "ConstantOfShape", "Where"}:
        return None
    if p.op_type == "ConstantOfShape":
        shape = _const_array(p.inputs[0], depth - 1)
        fill = p.attributes["value"].as_tensor().numpy().reshape(-1) \
            if "value" in p.attributes else np.zeros(1, np.float32)
        if shape is None or int(np.prod(shape)) > 1 << 20:
            return None
        return np.full([int(d) for d in shape.reshape(-1)], fill[0], dtype=fill.dtype)
    args = [_const_array(u, depth - 1) for u in p.inputs]
    if any(a is None for a in args) or not args or max(a.size for a in args) > 1 << 20:  # type: ignore[union-attr]
        return None
    if p.op_type == "Cast":
        return args[0].astype(ir.DataType(int(p.attributes["to"].value)).numpy())  # type: ignore[union-attr]
    if p.op_type == "Unsqueeze":
        axes = [int(a) for a in (args[1].reshape(-1) if len(args) > 1  # type: ignore[union-attr]
                                 else p.attributes["axes"].value)]
        out = args[0]
        rank = out.ndim + len(axes)  # type: ignore[union-attr]
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)  # type: ignore[arg-type]
        return out
    with np.errstate(all="ignore"):
        result = _FOLD[p.op_type](*args)
    if p.op_type == "Equal":
        return np.asarray(result)
    return np.asarray(result, dtype=np.result_type(*args[-2:]))  # Where: its two branches


def _axes(node: ir.Node, position: int = 1) -> list[int] | None:
    """The ``axes`` of a Squeeze / Unsqueeze / Reduce* / Slice, attribute or input."""
    if "axes" in node.attributes:
        return [int(a) for a in node.attributes["axes"].value]
    if len(node.inputs) > position and node.inputs[position] is not None:
        arr = _const_array(node.inputs[position])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None
