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

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.base import (
    LAYOUT_KEY,
    Context,
    constant,
    int64_constant,
    is_constant,
    swap_last_two,
)
from fc2conv.onnx.rules.matmul_transpose import _is_swap, _keeps_last_two
from fc2conv.onnx.rules.run_sizes import (
    Sizes,
    expand_target,
    probed_sizes,
    reread_shapes,
    runtime_sizes,
    swapped_target,
)
from fc2conv.onnx.rules.swap_region import (
    SWAPPED_KEY,
    Region,
    cost_of,
    data_inputs,
    exit_readers,
    grow,
    int_list,
    is_entry,
    is_shape_read,
    other_axis,
    outside_operands,
    rank_of,
    runtime_target,
    swapped_shape,
    unit_tail,
)

log = logging.getLogger(__name__)

__all__ = ["SWAPPED_KEY", "lift_swaps", "sink_swaps"]


class _Swapper:
    """Rewrites a region in place to compute ``sigma`` of each value it computed."""

    def __init__(self, ctx: Context, tag: str | None, sizes: Sizes | None = None) -> None:
        self.ctx, self.tag, self.sizes = ctx, tag, sizes
        self.moved: dict[ir.Value, ir.Value] = {}
        self.dropped: list[ir.Value] = []
        self.targets: dict[ir.Node, ir.Value] = {}  # run-time targets, swapped

    def _transpose(self, x: ir.Value, before: ir.Node, base: str,
                   shape: ir.Shape | None) -> ir.Value:
        rank = rank_of(x)
        assert rank is not None
        node = ir.node("Transpose", [x], {"perm": swap_last_two(rank)}, name=self.ctx.unique(base))
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
        if unit_tail(x) or is_constant(x) and constant(x, "operand").size == 1:
            out = x
        elif is_constant(x):
            out = self._constant(x)
        elif _is_swap(producer) and producer is not None and producer.inputs[0] is not None:
            out = producer.inputs[0]
        else:
            out = self._transpose(x, reader, f"{x.name or 'operand'}_swap", swapped_shape(x.shape))
        self.moved[x] = out
        if out is not x:
            self.dropped.append(x)
        return out

    def _ints(self, values: list[int], name: str) -> ir.Value:
        return int64_constant(self.ctx, values, name)

    def _params(self, node: ir.Node) -> None:
        """Move ``node``'s axes and targets to the swapped layout (before its data moves)."""
        op, r = node.op_type, rank_of(node.outputs[0])
        assert r is not None
        if op in ("Concat", "Split"):
            axis = node.attributes.get("axis")
            node.attributes["axis"] = ir.AttrInt64("axis", other_axis(
                0 if axis is None else int(axis.value), r))
        elif op == "Slice":
            starts = int_list(node.inputs[1])
            axes = int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] \
                else list(range(len(starts or [])))
            assert axes is not None
            new = self._ints([other_axis(a, r) for a in axes], "fc2conv_axes")
            if len(node.inputs) == 3:
                node.resize_inputs(4)
            self._replace(node, 3, new)
        elif node in self.targets:
            self._replace(node, 1, self.targets.pop(node))
        elif op in ("Expand", "Reshape"):
            target = int_list(node.inputs[1])
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

    def _runtime_targets(self, region: Region) -> None:
        """The swapped run-time targets of the region's Expand / Reshape nodes, built while
        their inputs are still the model's own (their probed sizes describe them)."""
        for node in region.nodes:
            if node.op_type in ("Expand", "Reshape") and runtime_target(node, self.sizes):
                new: list[ir.Node] = []
                if node.op_type == "Expand":
                    value = expand_target(self.ctx, node, self.sizes, new)
                else:
                    target = _keeps_last_two(node, self.sizes)
                    assert target is not None
                    value = swapped_target(self.ctx, node, target, self.sizes, new)
                if new:
                    self.ctx.graph.insert_before(node, new)
                self.targets[node] = value

    def rewrite(self, region: Region) -> None:
        self._runtime_targets(region)
        exits = exit_readers(region)
        external = set(outside_operands(region))
        entry_of = {e.outputs[0]: e.inputs[0] for e in region.entries}
        # a Shape of a region value reads the swapped value's sizes back in the model's order
        shape_reads = [o for n in region.nodes for o in n.outputs
                       if any(is_shape_read(u) for u in o.uses())]
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
            for i in data_inputs(node):
                x = node.inputs[i]
                if x is not None and x in entry_of:
                    node.replace_input_with(i, entry_of[x])  # type: ignore[arg-type]
                elif x is not None and x in external:
                    node.replace_input_with(i, self.operand(x, node))
        for value in shape_reads:
            reread_shapes(self.ctx, value, value, swap_last_two(rank_of(value) or 2))
        for node in region.nodes:
            self._params(node)
            for o in node.outputs:
                o.shape = swapped_shape(o.shape)
                if self.sizes and o in self.sizes:  # its probed sizes, swapped as well
                    dims = self.sizes[o]
                    self.sizes[o] = [*dims[:-2], *dims[-1:], *dims[-2:-1]]
            if self.tag is None:
                node.metadata_props.pop(SWAPPED_KEY, None)
            else:
                node.metadata_props[SWAPPED_KEY] = self.tag
        for entry in region.entries:
            if not entry.outputs[0].uses() and entry.graph is self.ctx.graph:
                self.dropped.append(entry.inputs[0])  # type: ignore[arg-type]
                self.ctx.graph.remove(entry, safe=True)

    def drop_unread(self) -> None:
        """Remove what computed the operands the rewrite replaced, once nothing reads it."""
        todo = list(self.dropped)
        shared = set(self.ctx.shape_constants.values())  # convert_model drops those unread
        while todo:
            x = todo.pop()
            if x.uses() or x.is_graph_output() or x.is_graph_input() or x in shared:
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
    entries = [n for n in ctx.graph if is_entry(n)]
    if not entries:
        return 0
    ctx.graph.sort()  # new moves go before their first reader
    sizes = None
    if runtime_sizes(ctx.graph):  # sizes computed at run time: Shape reads the swaps'
        for node in list(ctx.graph):  # inputs, targets are read from probes
            if _is_swap(node) and node.inputs[0] is not None:
                reread_shapes(ctx, node.outputs[0], node.inputs[0],
                              list(node.attributes["perm"].as_ints()))
        sizes = probed_sizes(ctx.graph)
    regions = [grow(entries, sizes)]
    if not cost_of(regions[0]).gains():
        regions = [grow([e], sizes) for e in entries]
    gone = 0
    swapper = _Swapper(ctx, "rotary", sizes)
    for region in regions:
        if region.entries[0].graph is not ctx.graph:
            continue
        cost = cost_of(region)
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
    nodes = [n for n in ctx.graph if n.metadata_props.get(SWAPPED_KEY)]
    if not nodes:
        return 0
    ctx.graph.sort()
    swapper = _Swapper(ctx, None, probed_sizes(ctx.graph) if runtime_sizes(ctx.graph)
                       else None)
    swapper.rewrite(Region(nodes=nodes))
    swapper.drop_unread()
    return len(nodes)
