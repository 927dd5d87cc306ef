"""Which ops can compute with their last two axes exchanged, and the region a swap reaches.

``sigma`` exchanges the last two axes. :func:`joins` says whether an op commutes with it (once
its axes or shape target are moved along; :mod:`fc2conv.onnx.rules.swap_sink` states the
math); :func:`grow` collects the region reachable from a set of swaps, and :func:`cost`
counts the Transposes rewriting it would remove and add.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir._core import Usage

from fc2conv.core.provenance import SOURCE_KEY
from fc2conv.onnx.rules.ane_twin import _const_array
from fc2conv.onnx.rules.base import is_constant
from fc2conv.onnx.rules.layout import BINARY, UNARY
from fc2conv.onnx.rules.matmul_transpose import _axes, _is_swap, _keeps_last_two
from fc2conv.onnx.rules.run_sizes import Sizes, shape_read

SWAPPED_KEY = "fc2conv.swapped"  # metadata on the nodes computing in the swapped layout

_ELEMENTWISE = UNARY | {"Cast", "Identity"}
_BINARY = BINARY | {"Pow"}
_SHAPED = ("Slice", "Split", "Unsqueeze", "Squeeze", "Expand", "Reshape")


def rank_of(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def static_dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def other_axis(axis: int, rank: int) -> int:
    """The axis of the swapped layout holding ``axis`` (the last two exchanged)."""
    a = axis % rank
    return rank - 1 if a == rank - 2 else rank - 2 if a == rank - 1 else a


def swapped_shape(shape: ir.Shape | None) -> ir.Shape | None:
    if shape is None or len(shape) < 2:
        return shape
    return ir.Shape([*shape[:-2], shape[-1], shape[-2]])


def unit_tail(value: ir.Value) -> bool:
    """Whether ``value``'s last two axes (after right-aligning to rank 2) are both 1, so the
    swapped layout holds the same tensor."""
    dims = static_dims(value)
    return dims is not None and all(d == 1 for d in dims[-2:])


def data_inputs(node: ir.Node) -> list[int]:
    """The inputs of ``node`` that hold data of the layout (not axes, starts or targets)."""
    if node.op_type in _ELEMENTWISE or node.op_type in _SHAPED:
        return [0]
    return list(range(len(node.inputs)))


def int_list(value: ir.Value | None) -> list[int] | None:
    arr = _const_array(value) if value is not None else None
    return None if arr is None else [int(v) for v in arr.reshape(-1)]


def is_shape_read(use: Usage) -> bool:
    """Whether ``use`` is a ``Shape`` node reading the value's sizes (no data moves: the
    rewrite gives it ``Gather(Shape(sigma(x)), sigma)``)."""
    return shape_read(use)


def runtime_target(node: ir.Node, sizes: Sizes | None) -> bool:
    """Whether ``node``'s shape target is computed at run time and the probes size its
    result (it then keeps the last two axes when the probes say so)."""
    return bool(sizes) and len(node.inputs) > 1 and node.inputs[1] is not None \
        and not is_constant(node.inputs[1]) and node.outputs[0] in sizes  # type: ignore[operator]


def joins(node: ir.Node, sizes: Sizes | None = None) -> bool:
    """Whether ``node`` can compute in the swapped layout (see the module docstring)."""
    if node.domain != "" or not node.outputs or any(o.is_graph_output() for o in node.outputs):
        return False
    ranks = {rank_of(o) for o in node.outputs}
    if len(ranks) != 1 or None in ranks:
        return False
    r = ranks.pop()
    assert r is not None
    x = node.inputs[0] if node.inputs else None
    op = node.op_type
    if r < 2 or x is None:
        return False
    if op in _ELEMENTWISE:
        return rank_of(x) == r
    if op in _BINARY or op == "Concat":
        if op == "Concat" and node.attributes.get("axis") is None:
            return False
        for v in node.inputs:
            k = rank_of(v)
            if v is None or k is None or (k < 2 and not (is_constant(v) or unit_tail(v))):
                return False
        return True
    if op == "Split":
        return rank_of(x) == r
    if op == "Slice":
        if len(node.inputs) < 3 or rank_of(x) != r:
            return False
        starts = int_list(node.inputs[1])
        axes = int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else \
            (list(range(len(starts))) if starts is not None else None)
        return axes is not None
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(node)
        k = rank_of(x)
        if axes is None or k is None or min(k, r) < 2:
            return False
        inner = r if op == "Unsqueeze" else k
        return all(a % inner < inner - 2 for a in axes)
    if op == "Expand":
        k = rank_of(x)
        return k is not None and k >= 2 and len(node.inputs) > 1 \
            and (int_list(node.inputs[1]) is not None or runtime_target(node, sizes))
    if op == "Reshape":
        return _keeps_last_two(node, sizes) is not None
    return False


def is_entry(node: ir.Node) -> bool:
    """A swap after a head split of a projection fc2conv wrote: ``sigma(Reshape(Conv(x)))``."""
    if not _is_swap(node) or node.outputs[0].is_graph_output() \
            or (rank_of(node.outputs[0]) or 0) < 3:
        return False
    split = node.inputs[0].producer() if node.inputs[0] is not None else None
    conv = split.inputs[0].producer() if split is not None and split.op_type == "Reshape" \
        and split.inputs[0] is not None else None
    return conv is not None and conv.op_type == "Conv" and bool(conv.metadata_props.get(SOURCE_KEY))


@dataclass
class Region:
    """Nodes to compute in the swapped layout, and the swaps they read (``entries``)."""

    nodes: list[ir.Node] = field(default_factory=list)
    entries: list[ir.Node] = field(default_factory=list)

    def values(self) -> set[ir.Value]:
        return {o for n in self.nodes for o in n.outputs}


def grow(entries: Iterable[ir.Node], sizes: Sizes | None = None) -> Region:
    """The region reached from ``entries``: readers that join, downward, then producers whose
    every output only region nodes read (as data), upward, until nothing more joins."""
    region = Region(entries=list(entries))
    graph = region.entries[0].graph
    inside: set[ir.Node] = set()
    todo = [e.outputs[0] for e in region.entries]
    grew = True
    while grew:
        while todo:
            value = todo.pop()
            for use in value.uses():
                node = use.node
                if node not in inside and use.idx in data_inputs(node) and node.graph is graph \
                        and joins(node, sizes):
                    inside.add(node)
                    region.nodes.append(node)
                    todo.extend(node.outputs)
        grew = False
        for node in list(region.nodes):
            for i in data_inputs(node):
                x = node.inputs[i]
                p = x.producer() if x is not None else None
                if p is None or p in inside or p in region.entries or p.graph is not graph \
                        or not joins(p, sizes):
                    continue
                if all(u.node in inside and u.idx in data_inputs(u.node)
                       for o in p.outputs for u in o.uses()):
                    inside.add(p)
                    region.nodes.append(p)
                    grew = True
    return region


@dataclass
class Cost:
    """Transposes the rewrite removes and adds: ``run`` counts the moves a runtime executes
    (a swap into a MatMul operand is free: onnxruntime's ``FusedMatMul`` takes it as
    ``transA`` / ``transB``), ``raw`` the Transpose nodes in the graph."""

    run_removed: int = 0
    run_added: int = 0
    raw_removed: int = 0
    raw_added: int = 0

    inner: bool = False  # a subgraph (If / Loop body) reads a value of the region

    def gains(self) -> bool:
        return not self.inner and self.run_removed > self.run_added \
            and self.raw_removed >= self.raw_added


def into_matmul(uses: Iterable[Usage]) -> bool:
    uses = list(uses)
    return bool(uses) and all(u.node.op_type == "MatMul" and u.node.domain == ""
                              and u.idx in (0, 1) for u in uses)


def exit_readers(region: Region) -> dict[ir.Value, list[Usage]]:
    inside = set(region.nodes)
    out: dict[ir.Value, list[Usage]] = {}
    for node in region.nodes:
        for o in node.outputs:
            uses = [u for u in o.uses() if (u.node not in inside
                                            or u.idx not in data_inputs(u.node))
                    and not is_shape_read(u)]
            if uses:
                out[o] = uses
    return out


def outside_operands(region: Region) -> list[ir.Value]:
    """The data operands the region reads from outside it (not the entries' outputs)."""
    made = region.values() | {e.outputs[0] for e in region.entries}
    seen: dict[ir.Value, None] = {}
    for node in region.nodes:
        for i in data_inputs(node):
            x = node.inputs[i]
            if x is not None and x not in made:
                seen[x] = None
    return list(seen)


def cost_of(region: Region) -> Cost:
    cost = Cost()
    inside = set(region.nodes)
    for entry in region.entries:
        if all(u.node in inside for u in entry.outputs[0].uses()):
            cost.run_removed += 1
            cost.raw_removed += 1
    for uses in exit_readers(region).values():
        cost.inner |= any(u.node.graph is not region.nodes[0].graph for u in uses)
        rest = [u for u in uses if not _is_swap(u.node)]
        for use in uses:
            if _is_swap(use.node):  # cancels: both moves go
                cost.raw_removed += 1
                cost.run_removed += not into_matmul(use.node.outputs[0].uses())
        if rest:
            cost.raw_added += 1
            cost.run_added += not into_matmul(rest)
    for x in outside_operands(region):
        if not (is_constant(x) or unit_tail(x) or _is_swap(x.producer())):
            cost.raw_added += 1
            cost.run_added += 1
    return cost
