"""Rotary embeddings applied in the layout the converted Q and K already have.

After ``to_conv`` a query or key projection writes ``(B, C, S)``; the head split's Reshape
gives ``X^T = (B, H, D, S)`` and a swap of the last two axes, ``X = sigma(X^T)``, gives the
``(B, H, S, D)`` the rotary embedding and ``Q @ K^T`` read. Let ``sigma`` exchange the last two
axes. Every op of a rotary embedding commutes with it once its parameters are moved along:

* elementwise ops, ``f(sigma(x), sigma(c)) = sigma(f(x, c))`` (a broadcast operand ``c`` is
  aligned to the result's rank and swapped too: the tables ``cos, sin`` of shape ``(1, 1, S, D)``
  become ``(1, 1, D, S)``, a scalar stays as it is);
* ``rotate_half`` -- ``Concat(-x[..., D/2:], x[..., :D/2], axis=-1)`` -- is a Slice / Split
  and a Concat along the head dim, which is axis ``-2`` of ``X^T``:
  ``Slice(sigma(x), axis=a) = sigma(Slice(x, axis=sigma(a)))``, the same for Split and Concat;
* ops that keep the last two axes (Llama's grouped-query ``Unsqueeze -> Expand -> Reshape``,
  a Squeeze) are the same op with a shape target's last two entries exchanged.

So ``sigma(X^T) * cos + rotate_half(sigma(X^T)) * sin = sigma(X^T * cos^T +
rotate_half^T(X^T) * sin^T)``: the embedding is computed on ``X^T`` with the tables transposed
(constants, transposed once when written) and its result is moved where it leaves -- where
the move cancels a swap already there (the key's ``K^T`` for ``Q @ K^T``: both moves go) or
where a MatMul reads it (the query: onnxruntime folds a swap of a MatMul operand into its
``FusedMatMul``, ``transA``). Each element is computed by the same op from the same values,
so the result is bit-identical.

The region of ops moved this way is grown from each head split's swap down through ops that
commute with ``sigma``, and up through the ops computing an operand when everything they feed
is in the region (the tables' ``Unsqueeze`` per layer, the cast that made them). It is
rewritten only when the moves that run drop (a move into a MatMul operand counted as free) and
the graph has no more Transposes. The nodes are tagged (``fc2conv.swapped``);
:func:`lift_swaps` (``to_linear``) moves the same region back, the identical rewrite again
(``sigma`` is its own inverse), and the layout folds then meet the projections' moves: the
model's own Transposes come back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir._core import Usage

from fc2conv.core.provenance import SOURCE_KEY
from fc2conv.onnx.rules.ane_twin import _const_array
from fc2conv.onnx.rules.base import LAYOUT_KEY, Context, Refused, constant, int64_constant
from fc2conv.onnx.rules.layout import BINARY, UNARY
from fc2conv.onnx.rules.matmul_transpose import _axes, _is_swap, _keeps_last_two, _swap

log = logging.getLogger(__name__)

SWAPPED_KEY = "fc2conv.swapped"  # metadata on the nodes computing in the swapped layout

_ELEMENTWISE = UNARY | {"Cast", "Identity"}
_BINARY = BINARY | {"Pow"}
_SHAPED = ("Slice", "Split", "Unsqueeze", "Squeeze", "Expand", "Reshape")


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _other(axis: int, rank: int) -> int:
    """The axis of the swapped layout holding ``axis`` (the last two exchanged)."""
    a = axis % rank
    return rank - 1 if a == rank - 2 else rank - 2 if a == rank - 1 else a


def _swapped(shape: ir.Shape | None) -> ir.Shape | None:
    if shape is None or len(shape) < 2:
        return shape
    return ir.Shape([*shape[:-2], shape[-1], shape[-2]])


def _is_const(value: ir.Value | None) -> bool:
    try:
        constant(value, "operand")
    except Refused:
        return False
    return True


def _unit_tail(value: ir.Value) -> bool:
    """Whether ``value``'s last two axes (after right-aligning to rank 2) are both 1, so the
    swapped layout holds the same tensor."""
    dims = _dims(value)
    return dims is not None and all(d == 1 for d in dims[-2:])


def _data(node: ir.Node) -> list[int]:
    """The inputs of ``node`` that hold data of the layout (not axes, starts or targets)."""
    if node.op_type in _ELEMENTWISE or node.op_type in _SHAPED:
        return [0]
    return list(range(len(node.inputs)))


def _int_list(value: ir.Value | None) -> list[int] | None:
    arr = _const_array(value) if value is not None else None
    return None if arr is None else [int(v) for v in arr.reshape(-1)]


def _joins(node: ir.Node) -> bool:
    """Whether ``node`` can compute in the swapped layout (see the module docstring)."""
    if node.domain != "" or not node.outputs or any(o.is_graph_output() for o in node.outputs):
        return False
    ranks = {_rank(o) for o in node.outputs}
    if len(ranks) != 1 or None in ranks:
        return False
    r = ranks.pop()
    assert r is not None
    x = node.inputs[0] if node.inputs else None
    op = node.op_type
    if r < 2 or x is None:
        return False
    if op in _ELEMENTWISE:
        return _rank(x) == r
    if op in _BINARY or op == "Concat":
        if op == "Concat" and node.attributes.get("axis") is None:
            return False
        for v in node.inputs:
            k = _rank(v)
            if v is None or k is None or (k < 2 and not (_is_const(v) or _unit_tail(v))):
                return False
        return True
    if op == "Split":
        return _rank(x) == r
    if op == "Slice":
        if len(node.inputs) < 3 or _rank(x) != r:
            return False
        starts = _int_list(node.inputs[1])
        axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else \
            (list(range(len(starts))) if starts is not None else None)
        return axes is not None
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(node)
        k = _rank(x)
        if axes is None or k is None or min(k, r) < 2:
            return False
        inner = r if op == "Unsqueeze" else k
        return all(a % inner < inner - 2 for a in axes)
    if op == "Expand":
        k = _rank(x)
        return k is not None and k >= 2 and len(node.inputs) > 1 \
            and _int_list(node.inputs[1]) is not None
    if op == "Reshape":
        return _keeps_last_two(node) is not None
    return False


def _is_entry(node: ir.Node) -> bool:
    """A swap after a head split of a projection fc2conv wrote: ``sigma(Reshape(Conv(x)))``."""
    if not _is_swap(node) or node.outputs[0].is_graph_output() or (_rank(node.outputs[0]) or 0) < 3:
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


def _grow(entries: Iterable[ir.Node]) -> Region:
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
                if node not in inside and use.idx in _data(node) and node.graph is graph \
                        and _joins(node):
                    inside.add(node)
                    region.nodes.append(node)
                    todo.extend(node.outputs)
        grew = False
        for node in list(region.nodes):
            for i in _data(node):
                x = node.inputs[i]
                p = x.producer() if x is not None else None
                if p is None or p in inside or p in region.entries or p.graph is not graph \
                        or not _joins(p):
                    continue
                if all(u.node in inside and u.idx in _data(u.node)
                       for o in p.outputs for u in o.uses()):
                    inside.add(p)
                    region.nodes.append(p)
                    grew = True
    return region


@dataclass
class _Cost:
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


def _into_matmul(uses: Iterable[Usage]) -> bool:
    uses = list(uses)
    return bool(uses) and all(u.node.op_type == "MatMul" and u.node.domain == ""
                              and u.idx in (0, 1) for u in uses)


def _exit_readers(region: Region) -> dict[ir.Value, list[Usage]]:
    inside = set(region.nodes)
    out: dict[ir.Value, list[Usage]] = {}
    for node in region.nodes:
        for o in node.outputs:
            uses = [u for u in o.uses() if u.node not in inside or u.idx not in _data(u.node)]
            if uses:
                out[o] = uses
    return out


def _external(region: Region) -> list[ir.Value]:
    """The data operands the region reads from outside it (not the entries' outputs)."""
    made = region.values() | {e.outputs[0] for e in region.entries}
    seen: dict[ir.Value, None] = {}
    for node in region.nodes:
        for i in _data(node):
            x = node.inputs[i]
            if x is not None and x not in made:
                seen[x] = None
    return list(seen)


def _cost(region: Region) -> _Cost:
    cost = _Cost()
    inside = set(region.nodes)
    for entry in region.entries:
        if all(u.node in inside for u in entry.outputs[0].uses()):
            cost.run_removed += 1
            cost.raw_removed += 1
    for uses in _exit_readers(region).values():
        cost.inner |= any(u.node.graph is not region.nodes[0].graph for u in uses)
        rest = [u for u in uses if not _is_swap(u.node)]
        for use in uses:
            if _is_swap(use.node):  # cancels: both moves go
                cost.raw_removed += 1
                cost.run_removed += not _into_matmul(use.node.outputs[0].uses())
        if rest:
            cost.raw_added += 1
            cost.run_added += not _into_matmul(rest)
    for x in _external(region):
        if not (_is_const(x) or _unit_tail(x) or _is_swap(x.producer())):
            cost.raw_added += 1
            cost.run_added += 1
    return cost


class _Swapper:
    """Rewrites a region in place to compute ``sigma`` of each value it computed."""

    def __init__(self, ctx: Context, tag: str | None) -> None:
        self.ctx, self.tag = ctx, tag
        self.moved: dict[ir.Value, ir.Value] = {}
        self.dropped: list[ir.Value] = []

    def _transpose(self, x: ir.Value, before: ir.Node, base: str,
                   shape: ir.Shape | None) -> ir.Value:
        rank = _rank(x)
        assert rank is not None
        node = ir.node("Transpose", [x], {"perm": _swap(rank)}, name=self.ctx.unique(base))
        node.metadata_props[LAYOUT_KEY] = "swap"
        node.outputs[0].name = self.ctx.unique(f"{base}_out")
        node.outputs[0].shape, node.outputs[0].type = shape, x.type
        self.ctx.graph.insert_before(before, node)
        return node.outputs[0]

    def _constant(self, x: ir.Value) -> ir.Value:
        arr = constant(x, "operand").numpy()
        if arr.ndim < 2:
            arr = arr.reshape((1,) * (2 - arr.ndim) + arr.shape)
        arr = np.ascontiguousarray(np.swapaxes(arr, -1, -2))
        value = ir.Value(name=self.ctx.unique(f"{x.name or 'operand'}_swapped"),
                         shape=ir.Shape(list(arr.shape)), type=x.type,
                         const_value=ir.tensor(arr))
        self.ctx.graph.register_initializer(value)
        return value

    def operand(self, x: ir.Value, reader: ir.Node) -> ir.Value:
        """``sigma(x)`` for an operand read from outside the region."""
        if x in self.moved:
            return self.moved[x]
        producer = x.producer()
        if _unit_tail(x) or _is_const(x) and constant(x, "operand").size == 1:
            out = x
        elif _is_const(x):
            out = self._constant(x)
        elif _is_swap(producer) and producer is not None and producer.inputs[0] is not None:
            out = producer.inputs[0]
        else:
            out = self._transpose(x, reader, f"{x.name or 'operand'}_swap", _swapped(x.shape))
        self.moved[x] = out
        if out is not x:
            self.dropped.append(x)
        return out

    def _ints(self, values: list[int], name: str) -> ir.Value:
        return int64_constant(self.ctx, values, name)

    def _params(self, node: ir.Node) -> None:
        """Move ``node``'s axes and targets to the swapped layout (before its data moves)."""
        op, r = node.op_type, _rank(node.outputs[0])
        assert r is not None
        if op in ("Concat", "Split"):
            axis = node.attributes.get("axis")
            node.attributes["axis"] = ir.AttrInt64("axis", _other(
                0 if axis is None else int(axis.value), r))
        elif op == "Slice":
            starts = _int_list(node.inputs[1])
            axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] \
                else list(range(len(starts or [])))
            assert axes is not None
            new = self._ints([_other(a, r) for a in axes], "fc2conv_axes")
            if len(node.inputs) == 3:
                node.resize_inputs(4)
            self._replace(node, 3, new)
        elif op in ("Expand", "Reshape"):
            target = _int_list(node.inputs[1])
            assert target is not None
            if len(target) >= 2:
                target = [*target[:-2], target[-1], target[-2]]
            elif len(target) == 1:
                target = [target[0], 1]
            self._replace(node, 1, self._ints(target, "fc2conv_shape"))

    def _replace(self, node: ir.Node, i: int, value: ir.Value) -> None:
        old = node.inputs[i]
        node.replace_input_with(i, value)
        if old is not None:
            self.dropped.append(old)

    def rewrite(self, region: Region) -> None:
        inside = set(region.nodes)
        exits = _exit_readers(region)
        external = set(_external(region))
        entry_of = {e.outputs[0]: e.inputs[0] for e in region.entries}
        for value, uses in exits.items():  # the region's results where they leave it
            rest = []
            for use in uses:
                if _is_swap(use.node) and use.node.graph is self.ctx.graph:
                    ir.convenience.replace_all_uses_with(use.node.outputs[0], value)
                    self.ctx.graph.remove(use.node, safe=True)
                else:
                    rest.append(use)
            if rest:
                moved = self._transpose(value, rest[0].node, f"{value.name or 'value'}_swap",
                                        value.shape)  # the region's value is swapped below
                for use in rest:
                    use.node.replace_input_with(use.idx, moved)
        for node in region.nodes:  # entries' outputs and outside operands, swapped
            for i in _data(node):
                x = node.inputs[i]
                if x is not None and x in entry_of:
                    node.replace_input_with(i, entry_of[x])  # type: ignore[arg-type]
                elif x is not None and x in external:
                    node.replace_input_with(i, self.operand(x, node))
        for node in region.nodes:
            self._params(node)
            for o in node.outputs:
                o.shape = _swapped(o.shape)
            if self.tag is None:
                node.metadata_props.pop(SWAPPED_KEY, None)
            else:
                node.metadata_props[SWAPPED_KEY] = self.tag
        for entry in region.entries:
            if not entry.outputs[0].uses() and entry.graph is self.ctx.graph:
                self.dropped.append(entry.inputs[0])  # type: ignore[arg-type]
                self.ctx.graph.remove(entry, safe=True)
        assert all(n in inside for n in region.nodes)

    def drop_unread(self) -> None:
        """Remove what computed the operands the rewrite replaced, once nothing reads it."""
        todo = list(self.dropped)
        while todo:
            x = todo.pop()
            if x.uses() or x.is_graph_output() or x.is_graph_input():
                continue
            if x.is_initializer() and x.name and x.name in self.ctx.graph.initializers:
                del self.ctx.graph.initializers[x.name]
                continue
            p = x.producer()
            if p is None or p.graph is not self.ctx.graph or p.domain != "" \
                    or any(o.uses() or o.is_graph_output() for o in p.outputs):
                continue
            self.ctx.graph.remove(p, safe=True)
            todo.extend(v for v in p.inputs if v is not None)


def sink_swaps(ctx: Context) -> int:
    """Compute every rotary embedding (any region of ops that commute with exchanging the
    last two axes) between a converted projection's head split and the attention's MatMul in
    the layout the projection wrote (see the module docstring); returns how many moves that
    run went. All head splits are grown together first (their regions share the tables);
    when that is not a gain, each one alone."""
    ctx.graph.sort()
    entries = [n for n in ctx.graph if _is_entry(n)]
    if not entries:
        return 0
    regions = [_grow(entries)]
    if not _cost(regions[0]).gains():
        regions = [_grow([e]) for e in entries]
    gone = 0
    swapper = _Swapper(ctx, "rotary")
    for region in regions:
        if region.entries[0].graph is not ctx.graph:
            continue
        cost = _cost(region)
        if not region.nodes or not cost.gains():
            log.debug("left %d head split(s): %s", len(region.entries), cost)
            continue
        swapper.rewrite(region)
        gone += cost.run_removed - cost.run_added
    swapper.drop_unread()
    log.debug("computed rotary embeddings swapped: %d moves went", gone)
    return gone


def lift_swaps(ctx: Context) -> int:
    """The way back (``to_linear``): every node :func:`sink_swaps` tagged computes in the
    model's own layout again -- the same rewrite on the same region -- with a swap where the
    region reads the head split and where its results leave; returns how many nodes."""
    ctx.graph.sort()
    nodes = [n for n in ctx.graph if n.metadata_props.get(SWAPPED_KEY)]
    if not nodes:
        return 0
    swapper = _Swapper(ctx, None)
    swapper.rewrite(Region(nodes=nodes))
    swapper.drop_unread()
    return len(nodes)
