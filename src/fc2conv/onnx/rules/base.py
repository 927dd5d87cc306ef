"""What every ONNX rewrite rule shares: the rule protocol, constants, new values and nodes.

A rule is three things (onnxscript's rewriter habit, written out by hand on onnx-ir):

* ``op_types`` — the pattern's anchor ops;
* ``check(node, ctx)`` — returns a match, or raises :class:`Refused` with a sentence saying why
  this node is left as it is ("Gemm weight 'B' is not a constant initializer");
* ``rewrite(match, ctx)`` — edits the graph and returns a one-line description of the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from fc2conv.core.provenance import ORIGIN_KEY, SOURCE_KEY

LAYOUT_KEY = "fc2conv.layout"  # metadata on the Transpose/Reshape nodes fc2conv adds

# Dtypes ONNX Conv and MatMul/Gemm both accept in onnxruntime's CPU provider.
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16}


class Refused(Exception):  # noqa: N818 - reads as "raise Refused(reason)"
    """A pattern matched but the node is left alone; ``str(exc)`` says why."""


@dataclass
class Context:
    """Per-run state: the graph, its opset, options and the names already taken."""

    graph: ir.Graph
    opset: int
    dynamic_spatial: bool = False
    names: set[str] = field(default_factory=set)
    shape_constants: dict[tuple[int, ...], ir.Value] = field(default_factory=dict)
    # new tensor -> external tensors it reads, released once it is written (streaming save)
    sources: dict[int, list[ir.TensorProtocol]] = field(default_factory=dict)
    # (recipe, source tensor ids) -> the initializer already derived from them
    derived: dict[tuple[object, ...], ir.Value] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.graph.all_nodes():
            self.names.update(v.name for v in (*node.inputs, *node.outputs) if v and v.name)
            if node.name:
                self.names.add(node.name)
        self.names.update(v.name for v in self.graph.inputs if v.name)
        self.names.update(self.graph.initializers)

    def unique(self, wanted: str) -> str:
        name, i = wanted, 1
        while name in self.names:
            name, i = f"{wanted}_{i}", i + 1
        self.names.add(name)
        return name


class Rule(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def op_types(self) -> tuple[str, ...]: ...

    def check(self, node: ir.Node, ctx: Context) -> Any: ...

    def rewrite(self, match: Any, ctx: Context) -> str: ...


def constant(value: ir.Value | None, what: str) -> ir.TensorProtocol:
    """The constant tensor behind ``value`` (an initializer or a Constant node), or refuse."""
    if value is None:
        raise Refused(f"{what} is missing")
    if value.is_graph_input():
        raise Refused(f"{what} '{value.name}' is a graph input, so callers may replace it")
    tensor = value.const_value
    producer = value.producer()
    while tensor is None and producer is not None and producer.op_type == "Identity" \
            and producer.inputs[0] is not None and not producer.inputs[0].is_graph_input():
        value = producer.inputs[0]  # an exporter's Identity of a shared (deduplicated) weight
        tensor, producer = value.const_value, value.producer()
    if tensor is None and (
        producer is not None
        and producer.op_type == "Constant"
        and "value" in producer.attributes
    ):
        tensor = producer.attributes["value"].as_tensor()
    if tensor is None and producer is not None and producer.op_type == "Transpose" \
            and producer.domain == "" and producer.inputs[0] is not None \
            and not producer.inputs[0].is_graph_input():
        # W stored transposed and read through a Transpose (MatMul(x, Transpose(W))): the
        # weight is Wᵀ, a constant too; the Transpose is left without readers and dropped by
        # drop_dead_constant_moves
        inner = constant(producer.inputs[0], what)
        perm_attr = producer.attributes.get("perm")
        arr = inner.numpy()
        perm = list(perm_attr.as_ints()) if perm_attr is not None else None
        return ir.Tensor(np.ascontiguousarray(np.transpose(arr, perm)), name=value.name)
    if tensor is None:
        raise Refused(f"{what} '{value.name}' is not a constant initializer")
    return tensor


def is_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is a constant tensor (an initializer or a Constant node)."""
    try:
        constant(value, "operand")
    except Refused:
        return False
    return True


def drop_dead_constant_moves(graph: ir.Graph) -> int:
    """Remove Transpose / Identity nodes of constants that no node or graph output reads any
    more (left behind when a rule folded them into a weight), and initializers they alone read.
    Returns how many nodes went."""
    outputs = set(graph.outputs)
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type not in ("Transpose", "Identity") or node.domain != "":
                continue
            out = node.outputs[0]
            if out.uses() or out in outputs:
                continue
            src = node.inputs[0]
            if src is None or src.is_graph_input() or (
                    src.const_value is None and src.producer() is None):
                continue
            maker = src.producer()
            if src.const_value is None and maker is not None \
                    and maker.op_type not in ("Transpose", "Identity", "Constant"):
                continue  # an activation's move: not ours to drop
            graph.remove(node, safe=True)
            removed += 1
            changed = True
            if src.name and src.name in graph.initializers and not src.uses() \
                    and src not in outputs:
                del graph.initializers[src.name]
    return removed


def zeros_copied(reshape: ir.Node) -> bool:
    """Whether a Reshape reads a ``0`` in its target as "copy the input's size" (the default,
    ``allowzero=0``) -- or means the same either way: ``allowzero=1`` only changes a Reshape
    whose target holds a 0 (torch.export's Reshapes set it on targets without one)."""
    attr = reshape.attributes.get("allowzero")
    if attr is None or int(attr.value) == 0:
        return True
    try:
        target = constant(reshape.inputs[1] if len(reshape.inputs) > 1 else None, "shape")
    except Refused:
        return False
    return bool(np.all(target.numpy() != 0))


def transpose_perm(node: ir.Node | None) -> list[int] | None:
    """The ``perm`` of a default-domain Transpose, or None (any other node, or no ``perm``)."""
    if node is None or node.op_type != "Transpose" or node.domain != "":
        return None
    attr = node.attributes.get("perm")
    return None if attr is None else [int(p) for p in attr.value]


def swap_last_two(rank: int) -> list[int]:
    """The perm that exchanges the last two of ``rank`` axes."""
    return [*range(rank - 2), rank - 1, rank - 2]


def dims(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    """The (always concrete) dims of a constant tensor as ints."""
    return tuple(int(d) for d in tensor.shape.numpy())


def static_shape(value: ir.Value) -> tuple[int | None, ...] | None:
    """Dims of ``value`` (``None`` for a symbolic dim), or ``None`` when the rank is unknown."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def check_dtype(value: ir.Value, what: str) -> None:
    dtype = value.dtype
    if dtype is not None and dtype not in FLOAT_TYPES:
        raise Refused(f"{what} has dtype {dtype.name}; Conv/MatMul rewrites support float16/32/64")


def new_initializer(
    ctx: Context,
    name: str,
    make: Callable[[], np.ndarray],
    dtype: ir.DataType,
    shape: Sequence[int],
    sources: Sequence[ir.TensorProtocol] = (),
    recipe: tuple[object, ...] = (),
) -> ir.Value:
    """Register an initializer computed lazily by ``make`` when the model is saved.

    Lazy evaluation keeps the rewrite streaming: the source tensors stay memory-mapped until the
    writer reaches this tensor, and are released right after (see :mod:`fc2conv.onnx.io`).
    ``recipe`` names the transformation; the same recipe on the same source tensors (a weight
    shared by several layers) returns the initializer made the first time, so every weight is
    transformed and stored once.
    """
    key = (*recipe, *(id(s) for s in sources)) if recipe else None
    if key is not None and key in ctx.derived:
        return ctx.derived[key]
    tensor = ir.LazyTensor(
        lambda: ir.tensor(np.ascontiguousarray(make())),
        dtype=dtype,
        shape=ir.Shape(list(shape)),
        name=ctx.unique(name),
    )
    ctx.sources[id(tensor)] = [s for s in sources if isinstance(s, ir.ExternalTensor)]
    value = ir.Value(
        name=tensor.name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype), const_value=tensor
    )
    ctx.graph.register_initializer(value)
    if key is not None:
        ctx.derived[key] = value
    return value


def int64_constant(ctx: Context, values: Sequence[int], name: str) -> ir.Value:
    """A shared int64 initializer (Reshape shapes, Unsqueeze axes), created once per graph."""
    key = tuple(values)
    if key not in ctx.shape_constants:
        array = np.asarray(values, dtype=np.int64)
        value = ir.Value(
            name=ctx.unique(name),
            shape=ir.Shape([len(values)]),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(array),
        )
        ctx.graph.register_initializer(value)
        ctx.shape_constants[key] = value
    return ctx.shape_constants[key]


def provenance(node: ir.Node, source: str, origin: str) -> ir.Node:
    node.metadata_props[SOURCE_KEY] = source
    node.metadata_props[ORIGIN_KEY] = origin
    return node


def drop_if_unused(ctx: Context, *values: ir.Value | None) -> None:
    """Remove initializers (and Constant nodes) nobody reads any more: weights exist once."""
    for value in values:
        if value is None or value.uses() or value.is_graph_output():
            continue
        if value.is_initializer() and value.name and value.name in ctx.graph.initializers:
            del ctx.graph.initializers[value.name]
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is ctx.graph:
            ctx.graph.remove(producer, safe=True)


def rewrite_each(ctx: Context, rewrite: Callable[[Context, ir.Node], bool]) -> int:
    """Offer every node of the main graph (a snapshot: rewrites add and remove nodes) to
    ``rewrite``, which returns whether it changed the graph there; returns how many did."""
    return sum(1 for node in list(ctx.graph) if node.graph is ctx.graph and rewrite(ctx, node))


def fmt(shape: Sequence[int | None] | None) -> str:
    if shape is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in shape)
