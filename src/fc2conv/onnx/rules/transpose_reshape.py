"""One Transpose where a conversion left two around a Reshape that regroups axes.

A 1x1 Conv reads and writes channels-first values; the attention around it splits and merges
heads on channels-last ones. ``to_conv`` then leaves ``Transpose(Reshape(Transpose(x, p), s),
q)``: the Conv's move back to ``(B, S, C)``, the head split to ``(B, S, H, D)`` and the model's
own ``Transpose`` to ``(B, H, S, D)`` (or the head merge followed by the next Conv's move to
``(B, C, S)``). When the Reshape only *regroups* axes -- every group of adjacent input axes
becomes a group of adjacent output axes, ``(B, S, C) -> (B, S, H, D)`` with ``C = H * D`` --
the two moves are one, on either side of the Reshape:

* when ``q`` keeps each output group together and in order (a merge): the groups' input axes,
  read back through ``p``, are moved once, then reshaped:
  ``Reshape(Transpose(x, P), s')`` with ``P = concat_g p[group_g]`` in the order ``q`` reads the
  groups and ``s'[k] = s[q[k]]``;
* when ``p`` keeps each input group together and in order in ``x`` (a split): reshaped first,
  in ``x``'s own order, then moved once: ``Transpose(Reshape(x, s''), Q)``.

Both are the same map of elements (a regrouping Reshape commutes with moving whole groups), so
the result is bit-identical. An identity move is dropped, so ``(B, C, S) -> (B, H, D, S)`` for
``K^T`` needs no Transpose at all, and the head merge before a Conv is one ``(0, 1, 3, 2)``
move instead of two. onnxruntime's transpose optimizer cannot push a Transpose through such a
Reshape on its own. Only pairs where fc2conv added at least one of the two Transposes are
touched; after ``to_linear`` of a converted graph the same fold gives the model's own form back.

Sizes computed at run time (an export with dynamic batch and length: the head split's target is
``Concat(Shape(x)[:2], [H, D])``) are read from two shape probes
(:mod:`~fc2conv.onnx.rules.run_sizes`); the new Reshape's target is then a constant valid at
every size, the arithmetic that computed the old one is dropped, and a ``Shape`` that read the
removed move's result reads its input instead, ``Gather(Shape(x), p)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import onnx_ir as ir

from fc2conv.onnx.rules.base import (
    LAYOUT_KEY,
    Context,
    Refused,
    constant,
    rewrite_each,
    transpose_perm,
    zeros_copied,
)
from fc2conv.onnx.rules.layout import BINARY, UNARY
from fc2conv.onnx.rules.run_sizes import (
    Dim,
    Sizes,
    data_uses,
    dims_of,
    drop_dead,
    probed_sizes,
    reread_shapes,
    runtime_sizes,
    shape_input,
    size_only_move,
)

log = logging.getLogger(__name__)

def _input_dims(first: ir.Node, p: list[int], sizes: Sizes | None) -> list[Dim] | None:
    """The shape of ``Transpose(x, p)``: inferred (or probed), or ``x``'s permuted."""
    known = dims_of(first.outputs[0], sizes)
    if known is not None and len(known) == len(p):
        return known
    x = dims_of(first.inputs[0], sizes)
    return None if x is None or len(x) != len(p) else [x[i] for i in p]


def _groups(a: Sequence[Dim], b: Sequence[Dim]) -> list[tuple[list[int], list[int]]] | None:
    """Runs of adjacent axes of ``a`` and of ``b`` with equal sizes, pairwise (a regrouping
    Reshape ``a -> b``); a symbolic dim only as its own group, the same symbol on both sides."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        da, db = a[i], b[j]
        if not isinstance(da, int) or not isinstance(db, int):
            if da is None or da != db:
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ins, outs = [i], [j]
        x, y = da, db
        i, j = i + 1, j + 1
        while x != y:
            na = a[i] if i < len(a) else None
            nb = b[j] if j < len(b) else None
            if x < y and isinstance(na, int):
                x, i = x * na, i + 1
                ins.append(i - 1)
            elif y < x and isinstance(nb, int):
                y, j = y * nb, j + 1
                outs.append(j - 1)
            else:
                return None
        groups.append((ins, outs))
    for k in range(i, len(a)):  # trailing unit axes join the last group
        if a[k] != 1 or not groups:
            return None
        groups[-1][0].append(k)
    for k in range(j, len(b)):
        if b[k] != 1 or not groups:
            return None
        groups[-1][1].append(k)
    return groups


def _runs_in_order(order: Sequence[int], runs: list[list[int]]) -> list[int] | None:
    """The index of each run in the order ``order`` visits them, when ``order`` visits every
    run's items back to back and ascending; else ``None``."""
    where = {v: (g, k) for g, run in enumerate(runs) for k, v in enumerate(run)}
    seen: list[int] = []
    pos = 0
    while pos < len(order):
        g, k = where[order[pos]]
        if k != 0 or list(order[pos:pos + len(runs[g])]) != runs[g]:
            return None
        seen.append(g)
        pos += len(runs[g])
    return seen


def _is_scalar(value: ir.Value | None) -> bool:
    """Whether ``value`` is a one-element constant (initializer or Constant node)."""
    try:
        return constant(value, "operand").size == 1
    except Refused:
        return False


def _operand(node: ir.Node) -> int:
    """The input of a unary op, or the one of a binary op that is not a scalar constant."""
    return 1 if len(node.inputs) == 2 and _is_scalar(node.inputs[0]) else 0


def _through_pointwise(value: ir.Value | None) -> tuple[ir.Node, list[ir.Node]] | None:
    """The Transpose ``value`` is computed from through single-reader elementwise ops with
    scalar constant operands (they commute with any move: a query's scaling ``q * s``), and
    those ops, the last-applied first."""
    chain: list[ir.Node] = []
    while value is not None and len(chain) < 8:
        node = value.producer()
        if node is None or value.is_graph_output():
            return None
        if node.op_type == "Transpose":  # its Shape readers read its input instead
            return (node, chain) if len(data_uses(value)) == 1 else None
        if len(value.uses()) != 1:
            return None
        if node.domain != "" or len(node.outputs) != 1:
            return None
        if node.op_type in BINARY and len(node.inputs) == 2:
            if not _is_scalar(node.inputs[1 - _operand(node)]):
                return None
        elif node.op_type not in UNARY:
            return None
        chain.append(node)
        value = node.inputs[_operand(node)]
    return None


def _fold(ctx: Context, second: ir.Node, sizes: Sizes | None = None) -> bool:
    q = transpose_perm(second)
    reshape = second.inputs[0].producer() if q is not None and second.inputs[0] else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain != "" \
            or reshape.graph is not ctx.graph:
        return False
    # a probed Reshape's sizes are all positive in both probes: its target held no 0
    if not zeros_copied(reshape) and not (sizes and reshape.outputs[0] in sizes):
        return False
    found = _through_pointwise(reshape.inputs[0])
    if found is None:
        return False
    first, chain = found
    p = transpose_perm(first)
    if p is None or first.graph is not ctx.graph or not (
            first.metadata_props.get(LAYOUT_KEY) or second.metadata_props.get(LAYOUT_KEY)):
        return False
    mid, x = reshape.outputs[0], first.inputs[0]
    if x is None or len(data_uses(first.outputs[0])) != 1 or len(data_uses(mid)) != 1 \
            or mid.is_graph_output() or first.outputs[0].is_graph_output():
        return False
    a, b = _input_dims(first, p, sizes), dims_of(mid, sizes)
    assert q is not None
    if a is None or b is None or len(b) != len(q):
        return False
    groups = _groups(a, b)
    if groups is None:
        return False
    base = second.name or "reshape"
    x_dims: list[Dim] = [None] * len(p)
    for k, s in enumerate(p):
        x_dims[s] = a[k]
    new: list[ir.Node] = []
    order = _runs_in_order(q, [outs for _, outs in groups])
    if order is not None:  # a merge: move the groups' input axes once, then reshape
        move = [p[i] for g in order for i in groups[g][0]]
        target = [b[o] for o in q]
        src = x if move == sorted(move) else None
        if src is None:
            new.append(ir.node("Transpose", [x], {"perm": move}, name=ctx.unique(base)))
            src = new[-1].outputs[0]
        shape = shape_input(ctx, target, [x_dims[i] for i in move])
        if shape is None:
            return False
        new.append(ir.node("Reshape", [src, shape], name=ctx.unique(reshape.name or base)))
    else:
        order = _runs_in_order([p.index(s) for s in range(len(p))],
                               [ins for ins, _ in groups])
        if order is None:
            return False
        # a split: reshape in x's own order, then move once
        outs = [o for g in order for o in groups[g][1]]
        shape = shape_input(ctx, [b[o] for o in outs], x_dims)
        if shape is None:
            return False
        new.append(ir.node("Reshape", [x, shape], name=ctx.unique(reshape.name or base)))
        move = [outs.index(o) for o in q]
        if move != sorted(move):
            new.append(ir.node("Transpose", [new[-1].outputs[0]], {"perm": move},
                               name=ctx.unique(base)))
    if chain:  # the pointwise ops read the Transpose's input instead, the moves their result
        chain[-1].replace_input_with(_operand(chain[-1]), x)
        for node in chain:
            node.outputs[0].shape = None
            if sizes:
                sizes.pop(node.outputs[0], None)  # its probed dims were of the moved value
        new[0].replace_input_with(0, chain[0].outputs[0])
    for node in new:
        node.outputs[0].name = ctx.unique(f"{node.name}_out")
    ctx.graph.insert_before(second, new)
    result, name = second.outputs[0], second.outputs[0].name
    ir.convenience.replace_all_uses_with(result, new[-1].outputs[0], replace_graph_outputs=True)
    new[-1].outputs[0].type, new[-1].outputs[0].shape = result.type, result.shape
    if new[-1].outputs[0].is_graph_output():
        result.name = ctx.unique(f"{name}_unused")
        new[-1].outputs[0].name = name
    old_target = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    if len(mid.uses()) > 1:  # Shape(mid): mid = Transpose(result, q^-1)
        reread_shapes(ctx, mid, new[-1].outputs[0], [q.index(k) for k in range(len(q))])
        ctx.graph.sort()
    reread_shapes(ctx, first.outputs[0], x, p)
    ctx.graph.remove([second, reshape], safe=True)
    drop_dead(ctx, old_target)  # may take the move too, when only the target read its sizes
    if first.graph is ctx.graph and not first.outputs[0].uses():
        ctx.graph.remove(first, safe=True)
    return True


def fold_transposes_through_reshapes(ctx: Context) -> int:
    """Replace every ``Transpose -> regrouping Reshape -> Transpose`` chain where fc2conv added
    one of the Transposes by one move and one Reshape (see the module docstring); returns how
    many."""
    folded = rewrite_each(ctx, _fold)
    if runtime_sizes(ctx.graph):  # sizes computed at run time: read them from probes
        folded += rewrite_each(ctx, size_only_move)
        folded += rewrite_each(ctx, partial(_fold, sizes=probed_sizes(ctx.graph)))
    log.debug("folded %d transpose pairs through reshapes", folded)
    return folded
