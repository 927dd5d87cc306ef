"""Layout changes around rewritten layers, and sharing them between consecutive layers.

A fully connected layer reads channels-last ``(N, *S, C)``; a Conv reads channels-first
``(N, C, *S)``. Every rewrite wraps its new node in an *enter* and an *exit* node:

* rank ``r`` in 3..5: ``enter = Transpose(perm=[0, r-1, 1, ..., r-2])`` and
  ``exit = Transpose(perm=[0, 2, ..., r-1, 1])`` (its inverse);
* rank 2 (``Gemm``): ``enter = Reshape(x, [0, -1, 1, 1])`` and ``exit = Flatten(axis=1)``.

:func:`share_layout_changes` then removes every ``exit -> (pointwise ops) -> enter`` pair of the
same kind, so a stack of converted layers changes layout once at each end. Pointwise ops commute
with a layout change: unary ones as they are, ``Add/Sub/Mul/Div`` by a constant ``c`` once ``c``
is broadcast to rank ``r`` and moved by the enter permutation: ``exit(f(enter(x), c)) ...`` becomes
``f(x, enter(c))``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from fc2conv.core.positionwise import Channel, onnx_types
from fc2conv.onnx.rules.base import LAYOUT_KEY, Context, Refused, int64_constant

log = logging.getLogger(__name__)

BINARY = {"Add", "Sub", "Mul", "Div"}
# the unary elementwise ops of the table both front ends read (Pow takes two operands)
UNARY = onnx_types(Channel.ELEMENTWISE) - BINARY - {"Pow"}


def _perm_in(rank: int) -> list[int]:
    return [0, rank - 1, *range(1, rank - 1)]


def _perm_out(rank: int) -> list[int]:
    return [0, *range(2, rank), 1]


def kind_of(rank: int) -> str:
    if rank == 2:
        return "flat"
    if 3 <= rank <= 5:
        return f"t{rank}"
    raise Refused(f"its input has rank {rank}; Conv takes 1 to 3 spatial dimensions (rank 2 to 5)")


def enter(ctx: Context, x: ir.Value, rank: int, name: str) -> ir.Node:
    """Channels-last ``x`` of rank ``rank`` -> a channels-first value a Conv can read.

    Returns the node, not yet in the graph; its output is the channels-first value.
    """
    kind = kind_of(rank)
    if kind == "flat":
        shape = int64_constant(ctx, [0, -1, 1, 1], "fc2conv_shape_nc11")
        node = ir.node("Reshape", [x, shape], name=ctx.unique(name))
    else:
        node = ir.node("Transpose", [x], {"perm": _perm_in(rank)}, name=ctx.unique(name))
    node.metadata_props[LAYOUT_KEY] = f"enter:{kind}"
    node.outputs[0].name = ctx.unique(f"{name}_out")
    return node


def exit_(ctx: Context, y: ir.Value, rank: int, name: str) -> ir.Node:
    """The inverse of :func:`enter` (not yet in the graph)."""
    kind = kind_of(rank)
    if kind == "flat":
        node = ir.node("Flatten", [y], {"axis": 1}, name=ctx.unique(name))
    else:
        node = ir.node("Transpose", [y], {"perm": _perm_out(rank)}, name=ctx.unique(name))
    node.metadata_props[LAYOUT_KEY] = f"exit:{kind}"
    return node


def enter_linear(ctx: Context, x: ir.Value, rank: int, name: str) -> ir.Node:
    """Channels-first ``(N, C, *S)`` -> channels-last ``(N, *S, C)`` for a MatMul (to linear)."""
    kind_of(rank)
    node = ir.node("Transpose", [x], {"perm": _perm_out(rank)}, name=ctx.unique(name))
    node.metadata_props[LAYOUT_KEY] = f"enter:l{rank}"
    node.outputs[0].name = ctx.unique(f"{name}_out")
    return node


def exit_linear(ctx: Context, y: ir.Value, rank: int, name: str) -> ir.Node:
    """The inverse of :func:`enter_linear`."""
    node = ir.node("Transpose", [y], {"perm": _perm_in(rank)}, name=ctx.unique(name))
    node.metadata_props[LAYOUT_KEY] = f"exit:l{rank}"
    return node


def spatial_dims(rank: int) -> int:
    return 2 if rank == 2 else rank - 2


def _perm(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("perm")
    return None if node.op_type != "Transpose" or attr is None else [int(p) for p in attr.value]


def _inverse_pair(exit_node: ir.Node, enter_node: ir.Node) -> bool:
    """Whether ``enter_node`` undoes ``exit_node`` (both added by fc2conv)."""
    tag = enter_node.metadata_props.get(LAYOUT_KEY, "")
    if not tag:
        return False
    p_exit, p_enter = _perm(exit_node), _perm(enter_node)
    if p_exit is not None and p_enter is not None:
        return len(p_exit) == len(p_enter) and all(p_exit[p] == i for i, p in enumerate(p_enter))
    return exit_node.metadata_props[LAYOUT_KEY] == "exit:flat" and tag == "enter:flat"


def _moved_constant(c: np.ndarray, enter_node: ir.Node) -> np.ndarray | None:
    """The constant ``c`` (broadcast against the exit's output) as seen before the exit."""
    perm = _perm(enter_node)
    rank = 2 if perm is None else len(perm)
    if c.ndim > rank:
        return None
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if perm is None:
        return c.reshape(*c.shape, 1, 1)
    return np.ascontiguousarray(c.transpose(perm))


def _chain(exit_node: ir.Node) -> tuple[list[ir.Node], ir.Node] | None:
    """The pointwise nodes between ``exit_node`` and an enter node that undoes it."""
    chain: list[ir.Node] = []
    current = exit_node.outputs[0]
    while True:
        uses = list(current.uses())
        if current.is_graph_output() or len(uses) != 1:
            return None
        user = uses[0].node
        if _inverse_pair(exit_node, user):
            return chain, user
        if user.op_type in UNARY and user.domain == "" and uses[0].idx == 0:
            pass
        elif user.op_type in BINARY and user.domain == "":
            other = user.inputs[1 - uses[0].idx]
            if other is None or other.const_value is None or other.is_graph_input():
                return None
        else:
            return None
        if len(user.outputs) != 1:
            return None
        chain.append(user)
        current = user.outputs[0]


def share_layout_changes(ctx: Context) -> int:
    """Remove every pair of layout changes fc2conv added that undo each other with only
    pointwise ops between them (``exit -> ... -> enter``, also a ``to_conv`` enter followed by a
    ``to_linear`` enter after a round trip); return how many pairs."""
    removed = 0
    for exit_node in list(ctx.graph):
        tag = exit_node.metadata_props.get(LAYOUT_KEY, "")
        if not tag or exit_node.graph is not ctx.graph:
            continue
        found = _chain(exit_node)
        if found is None:
            continue
        chain, enter_node = found
        result = enter_node.outputs[0]
        if result.is_graph_output() and not chain:
            start = exit_node.inputs[0]
            if start is None or start.producer() is None or start.is_graph_output():
                continue
        moved: list[tuple[ir.Node, int, np.ndarray]] = []
        for node in chain:
            if node.op_type in BINARY:
                idx = (
                    1
                    if node.inputs[0] in {exit_node.outputs[0], *(n.outputs[0] for n in chain)}
                    else 0
                )
                const = node.inputs[idx]
                assert const is not None and const.const_value is not None
                new = _moved_constant(const.const_value.numpy(), enter_node)
                if new is None:
                    break
                moved.append((node, idx, new))
        else:
            suffix = "_linear" if ":l" in enter_node.metadata_props[LAYOUT_KEY] else "_conv"
            for node, idx, array in moved:
                old = node.inputs[idx]
                assert old is not None
                value = ir.Value(
                    name=ctx.unique(f"{old.name}{suffix}"),
                    shape=ir.Shape(array.shape),
                    type=old.type,
                    const_value=ir.tensor(array),
                )
                ctx.graph.register_initializer(value)
                node.replace_input_with(idx, value)
                if not old.uses() and old.name and old.name in ctx.graph.initializers:
                    del ctx.graph.initializers[old.name]
            channels_first = exit_node.inputs[0]
            assert channels_first is not None
            last = channels_first
            if chain:
                chain[0].replace_input_with(
                    0 if chain[0].inputs[0] is exit_node.outputs[0] else 1, channels_first
                )
                for node in chain:
                    node.outputs[0].shape = None
                last = chain[-1].outputs[0]
            name = result.name
            ir.convenience.replace_all_uses_with(result, last, replace_graph_outputs=True)
            ctx.graph.remove([enter_node], safe=True)
            if last.is_graph_output():
                last.name = name
            if not exit_node.outputs[0].uses():
                ctx.graph.remove([exit_node], safe=True)
            removed += 1
    log.debug("shared %d layout changes", removed)
    return removed


def collapse_flat_round_trips(ctx: Context) -> int:
    """After ``to_linear`` of a ``to_conv`` result: a Gemm's ``Reshape(x, [0, -1, 1, 1])`` enter
    followed by ``to_linear``'s ``Transpose`` to ``(N, 1, 1, C)``, MatMuls by constant
    matrices with pointwise ops and per-channel constants between them, and the mirror
    ``Transpose`` + ``Flatten`` exit compute the same on ``(N, C)`` directly (a matrix and a
    vector broadcast alike over ``(N, 1, 1)`` and ``(N,)``): all four layout nodes go;
    returns how many such pairs."""
    removed = 0
    for enter_l in list(ctx.graph):
        if enter_l.metadata_props.get(LAYOUT_KEY) != "enter:l4":
            continue
        flat_in = enter_l.inputs[0].producer() if enter_l.inputs[0] is not None else None
        if flat_in is None or flat_in.metadata_props.get(LAYOUT_KEY) != "enter:flat" \
                or len(flat_in.outputs[0].uses()) != 1:
            continue
        chain: list[ir.Node] = []
        current = enter_l.outputs[0]
        exit_l = None
        while True:
            uses = list(current.uses())
            if current.is_graph_output() or len(uses) != 1 or len(uses[0].node.outputs) != 1:
                break
            user = uses[0].node
            if user.metadata_props.get(LAYOUT_KEY) == "exit:l4":
                exit_l = user
                break
            other = user.inputs[1 - uses[0].idx] if len(user.inputs) == 2 else None
            const = None if other is None else other.const_value
            ok = (user.op_type == "MatMul" and uses[0].idx == 0 and const is not None
                  and len(const.shape) == 2) or (user.op_type in UNARY and chain) or (
                user.op_type in BINARY and chain and const is not None and len(const.shape) <= 1)
            if not ok or user.domain != "":
                break
            chain.append(user)
            current = user.outputs[0]
        uses = list(exit_l.outputs[0].uses()) if exit_l is not None else []
        if exit_l is None or not chain or exit_l.outputs[0].is_graph_output() or len(uses) != 1 \
                or uses[0].node.metadata_props.get(LAYOUT_KEY) != "exit:flat":
            continue
        flat_out = uses[0].node
        x = flat_in.inputs[0]
        assert x is not None
        chain[0].replace_input_with(0, x)
        for node in chain:
            node.outputs[0].shape = None
        name = flat_out.outputs[0].name
        ir.convenience.replace_all_uses_with(flat_out.outputs[0], chain[-1].outputs[0],
                                             replace_graph_outputs=True)
        ctx.graph.remove([flat_out, exit_l, enter_l, flat_in], safe=True)
        if chain[-1].outputs[0].is_graph_output():
            chain[-1].outputs[0].name = name
        removed += 1
    return removed


def fold_transpose_pairs(ctx: Context) -> int:
    """``Transpose(Transpose(x, p), q)`` with ``p[q[i]] == i`` is ``x``: remove such pairs where
    fc2conv added at least one of the two (the model's own NHWC Transpose meeting a Conv's move
    back to NCHW); returns how many."""
    removed = 0
    for second in list(ctx.graph):
        first = second.inputs[0].producer() if second.inputs and second.inputs[0] else None
        if second.graph is not ctx.graph or first is None or first.graph is not ctx.graph:
            continue
        p, q = _perm(first), _perm(second)
        if p is None or q is None or len(p) != len(q) or any(p[j] != i for i, j in enumerate(q)):
            continue
        if not (first.metadata_props.get(LAYOUT_KEY) or second.metadata_props.get(LAYOUT_KEY)):
            continue
        x, y = first.inputs[0], second.outputs[0]
        assert x is not None
        if y.is_graph_output() and (x.is_graph_input() or x.is_graph_output()
                                    or x.producer() is None):
            continue
        name = y.name
        ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        if x.is_graph_output() and y.name == name:
            y.name, x.name = ctx.unique(f"{name}_unused"), name
        ctx.graph.remove(second, safe=True)
        if not first.outputs[0].uses() and not first.outputs[0].is_graph_output():
            ctx.graph.remove(first, safe=True)
        removed += 1
    return removed


def merge_duplicate_moves(ctx: Context) -> int:
    """Transposes fc2conv added that read the same value with the same ``perm`` (the moves of
    Q, K and V, three Convs reading one normalized value) are one: the first stays, the others'
    readers read it; returns how many went."""
    seen: dict[tuple[ir.Value, tuple[int, ...]], ir.Node] = {}
    merged = 0
    for node in list(ctx.graph):
        perm, x = _perm(node), node.inputs[0] if node.inputs else None
        if perm is None or x is None or not node.metadata_props.get(LAYOUT_KEY) \
                or node.outputs[0].is_graph_output():
            continue
        kept = seen.setdefault((x, tuple(perm)), node)
        if kept is node:
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], kept.outputs[0])
        ctx.graph.remove(node, safe=True)
        merged += 1
    return merged
