"""An attention product computed already transposed, where a Conv wants it so.

After ``to_conv`` the head merge before an attention's output projection reads
``Transpose(P @ V, (..., -1, -2))``: the product ``(B, H, S, D)`` moved to ``(B, H, D, S)`` so
that a Reshape gives the Conv its ``(B, C, S)``. The transpose of a product is the product of
the transposes, taken the other way round:

    (P @ V)^T = V^T @ P^T,        ((P @ V)^T)[j, i] = sum_k V[k, j] P[i, k]

(per batch of the leading axes, which broadcast as before). Each element is the same sum of
the same products over ``k``, so the result is the same up to the order a GEMM kernel adds
them in (onnxruntime's are bit-identical here). The two operand moves cost nothing at run time:
``V^T`` is usually the value fc2conv's head split already wrote (``V`` is ``Transpose(V^T)``,
so the two moves cancel), and onnxruntime folds any swap of a MatMul operand's last two axes
into its ``FusedMatMul`` (``transA`` / ``transB``). The move on the product goes away.

A Reshape between the product and the move is allowed when it keeps the last two axes (the
exporter's ``(B, -1, S, D)``): such a Reshape commutes with the swap, its target's last two
entries swapped. So may ops that keep the last two axes lie between ``V``'s move and the
product (Llama's grouped-query ``Unsqueeze -> Expand -> Reshape`` of ``V``): they are rebuilt
on ``V^T`` (the same Unsqueeze; an Expand with ``1, 1`` as its target's last two entries,
leaving those axes as they come; the Reshape's target's last two entries swapped).

``to_linear`` of such a graph (the products tagged ``fc2conv.product``) computes ``P @ V``
again, with one swap of ``V^T`` above any such chain, where the layout folds meet it with the
projection's move: the model's own Transposes come back.

Only a product of two computed values (never a weight: that is a layer, not attention) is
rewritten, only when the moved result goes to a layer fc2conv wrote (or the move is one fc2conv
added), and only when at least one operand's move cancels, so the graph never gains a
Transpose.
"""

from __future__ import annotations

import logging
from functools import partial

import onnx_ir as ir

from fc2conv.core.provenance import SOURCE_KEY
from fc2conv.onnx.rules.ane_twin import _const_array
from fc2conv.onnx.rules.base import (
    LAYOUT_KEY,
    Context,
    Refused,
    constant,
    int64_constant,
    is_constant,
    rewrite_each,
    swap_last_two,
    transpose_perm,
    zeros_copied,
)
from fc2conv.onnx.rules.run_sizes import (
    Dim,
    Sizes,
    data_uses,
    dims_of,
    drop_dead,
    expand_target,
    probed_sizes,
    reread_shapes,
    runtime_sizes,
    swapped_target,
)

log = logging.getLogger(__name__)

PRODUCT_KEY = "fc2conv.product"  # metadata on a product this module computed transposed


def _rank(value: ir.Value | None) -> int | None:
    """The rank of ``value``: inferred, or the length of the ``perm`` that computed it."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    perm = transpose_perm(value.producer())
    return None if perm is None else len(perm)


def _is_swap(node: ir.Node | None) -> bool:
    """Whether ``node`` is a standard Transpose exchanging its input's last two axes."""
    perm = transpose_perm(node)
    return perm is not None and len(perm) >= 2 and perm == swap_last_two(len(perm))


def _last_two(value: ir.Value, sizes: Sizes | None = None) -> tuple[Dim, Dim] | None:
    """The sizes of ``value``'s last two axes: static, or probed (``sizes``; a size computed
    at run time is a symbol naming its sizes in the probes)."""
    dims = dims_of(value, sizes)
    if dims is None or len(dims) < 2:
        return None
    a, b = dims[-2], dims[-1]
    if sizes and value in sizes:
        return a, b
    return (a, b) if isinstance(a, int) and isinstance(b, int) else None


def _keeps_last_two(reshape: ir.Node, sizes: Sizes | None = None) -> list[int] | None:
    """The target of ``reshape`` when it keeps its input's last two axes (static sizes, the
    same at the end of the target), else ``None``; with ``sizes``, a target computed at run
    time is ``[]`` when the probes show the last two axes kept."""
    if reshape.op_type != "Reshape" or reshape.domain != "" or len(reshape.inputs) != 2:
        return None
    x = reshape.inputs[0]
    if x is None:
        return None
    probed = bool(sizes) and x in sizes and reshape.outputs[0] in sizes  # type: ignore[operator]
    kept = probed and _last_two(x, sizes) == _last_two(reshape.outputs[0], sizes)
    if probed and not is_constant(reshape.inputs[1]):
        return [] if kept else None
    if not zeros_copied(reshape):
        return None
    dims = _last_two(x)
    try:
        target = [int(v) for v in constant(reshape.inputs[1], "shape").numpy().reshape(-1)]
    except Refused:
        return None
    if len(target) < 2 or not kept and (dims is None or tuple(target[-2:]) != dims):
        return None
    return target


def _to_layer(value: ir.Value) -> bool:
    """Whether every reader of ``value`` (through one Reshape) is a layer fc2conv wrote (a Conv,
    or a MatMul / Gemm on the way back)."""
    readers = [u.node for u in value.uses()]
    if len(readers) == 1 and readers[0].op_type == "Reshape" and not value.is_graph_output():
        value = readers[0].outputs[0]
        readers = [u.node for u in value.uses()]
    return bool(readers) and not value.is_graph_output() and all(
        r.op_type in ("Conv", "MatMul", "Gemm") and r.metadata_props.get(SOURCE_KEY)
        for r in readers)


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = _const_array(node.inputs[1])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.value]


def _keeps_axes(node: ir.Node, sizes: Sizes | None = None) -> bool:
    """Whether ``node`` (Unsqueeze, Expand or Reshape) leaves its input's last two axes as
    they are, so that it commutes with exchanging them."""
    out, x = node.outputs[0], node.inputs[0] if node.inputs else None
    if node.domain != "" or x is None or len(node.outputs) != 1:
        return False
    if node.op_type == "Reshape":
        return _keeps_last_two(node, sizes) is not None
    dims, rank = _last_two(x, sizes), _rank(out)
    if dims is None or rank is None or _last_two(out, sizes) != dims:
        return False
    if node.op_type == "Unsqueeze":
        axes = _axes(node)
        return axes is not None and all(a % rank < rank - 2 for a in axes)
    if node.op_type == "Expand":
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return False
        target = _const_array(node.inputs[1])
        if target is None:  # computed at run time: its length is the rank of the result
            return bool(sizes) and out in sizes  # type: ignore[operator]
        return target.size >= 2
    return False


def _swapped_chain(x: ir.Value, anywhere: bool = False, sizes: Sizes | None = None
                   ) -> tuple[ir.Value, list[ir.Node]] | None:
    """``x = f(Transpose(u))`` with the Transpose a swap and ``f`` a chain of single-reader
    ops that keep the last two axes (a grouped-query ``Unsqueeze -> Expand -> Reshape`` of
    ``V``): ``u`` and the chain, the op next to the Transpose last. ``anywhere``: ``x =
    f(u)`` for the longest such chain, whatever computes ``u``."""
    chain: list[ir.Node] = []
    while len(chain) <= 4:
        producer = x.producer()
        if producer is not None and _is_swap(producer) and not anywhere:
            u = producer.inputs[0]
            return (u, chain) if u is not None and chain else None
        if producer is None or producer.op_type not in ("Unsqueeze", "Expand", "Reshape") \
                or len(data_uses(x)) != 1 or x.is_graph_output() \
                or not _keeps_axes(producer, sizes):
            return (x, chain) if anywhere and chain else None
        chain.append(producer)
        x = producer.inputs[0]  # type: ignore[assignment]
    return None


Reread = list[tuple[ir.Value, ir.Value]]  # (a rebuilt chain's value, its swapped twin)


def _rebuilt(ctx: Context, u: ir.Value, chain: list[ir.Node], new: list[ir.Node],
             sizes: Sizes | None, rereads: Reread) -> ir.Value:
    """:func:`_rebuilt_ops`; each chain value and its twin go to ``rereads`` (its Shape
    readers read the twin's sizes once the new ops are placed, :func:`_reread`)."""
    rebuilt = _rebuilt_ops(ctx, u, chain, new, sizes)
    rereads.extend((node.outputs[0], value)
                   for node, value in zip(reversed(chain), rebuilt, strict=True))
    return rebuilt[-1] if rebuilt else u


def _reread(ctx: Context, rereads: Reread) -> None:
    """The Shape readers of each rebuilt chain's values read their swapped twins' sizes."""
    for old, value in rereads:
        if any(u.node.op_type == "Shape" for u in old.uses()):
            reread_shapes(ctx, old, value, swap_last_two(_rank(old) or 2))
            ctx.graph.sort()


def _rebuilt_ops(ctx: Context, u: ir.Value, chain: list[ir.Node], new: list[ir.Node],
                 sizes: Sizes | None = None) -> list[ir.Value]:
    """The chain's ops on ``u`` (whose last two axes are the other way round): the same
    Unsqueeze, an Expand that leaves the last two axes as they come (target ``1, 1`` there),
    a Reshape with the target's last two entries exchanged; their results in order."""
    out: list[ir.Value] = []
    for node in reversed(chain):
        base = node.name or node.op_type
        if node.op_type == "Unsqueeze":
            axes = _axes(node)
            assert axes is not None
            if ctx.opset >= 13:
                op = ir.node("Unsqueeze", [u, int64_constant(ctx, axes, "fc2conv_axes")],
                             name=ctx.unique(base))
            else:
                op = ir.node("Unsqueeze", [u], {"axes": axes}, name=ctx.unique(base))
        elif node.op_type == "Expand":
            op = ir.node("Expand", [u, expand_target(ctx, node, sizes, new)],
                         name=ctx.unique(base))
        else:
            target = _keeps_last_two(node, sizes)
            assert target is not None
            op = ir.node("Reshape", [u, swapped_target(ctx, node, target, sizes, new)],
                         name=ctx.unique(base))
        op.outputs[0].name = ctx.unique(f"{op.name}_out")
        new.append(op)
        u = op.outputs[0]
        out.append(u)
    return out


def _moved(ctx: Context, x: ir.Value, new: list[ir.Node], base: str, up: bool = False,
           sizes: Sizes | None = None, rereads: Reread | None = None) -> ir.Value:
    """``x`` with its last two axes exchanged: the value a swap Transpose read to give ``x``
    (through a chain that keeps those axes, rebuilt on it), or a new Transpose (appended to
    ``new``); ``up``: the new Transpose before such a chain, where it may meet a layer's."""
    producer = x.producer()
    if _is_swap(producer) and producer is not None and producer.inputs[0] is not None:
        return producer.inputs[0]
    found = _swapped_chain(x, sizes=sizes)
    if found is not None:
        return _rebuilt(ctx, found[0], found[1], new, sizes, rereads if rereads is not None
                        else [])
    found = _swapped_chain(x, anywhere=True, sizes=sizes) if up else None
    if found is not None:
        inner = _moved(ctx, found[0], new, base, sizes=sizes, rereads=rereads)
        return _rebuilt(ctx, inner, found[1], new, sizes, rereads if rereads is not None
                        else [])
    rank = _rank(x)
    assert rank is not None
    node = ir.node("Transpose", [x], {"perm": swap_last_two(rank)}, name=ctx.unique(base))
    node.outputs[0].name = ctx.unique(f"{base}_out")
    new.append(node)
    return node.outputs[0]


def _cancels(x: ir.Value, sizes: Sizes | None = None) -> bool:
    """Whether :func:`_moved` of ``x`` needs no new Transpose."""
    return _is_swap(x.producer()) or _swapped_chain(x, sizes=sizes) is not None


def _drop_unread(ctx: Context, x: ir.Value) -> None:
    """Remove what computed ``x`` while nothing reads it (a head split's move, the chain),
    and the run-time targets of the chain's ops that nothing else reads."""
    while not x.uses() and not x.is_graph_output():
        producer = x.producer()
        if producer is None or producer.graph is not ctx.graph or len(producer.outputs) != 1 \
                or producer.op_type not in ("Transpose", "Unsqueeze", "Expand", "Reshape"):
            return
        nxt = producer.inputs[0]
        rest = list(producer.inputs[1:])
        ctx.graph.remove(producer, safe=True)
        for target in rest:
            if target is not None and not is_constant(target):
                drop_dead(ctx, target)
        if nxt is None:
            return
        x = nxt


def _fold(ctx: Context, move: ir.Node, sizes: Sizes | None = None) -> bool:
    if not _is_swap(move) or move.graph is not ctx.graph or move.outputs[0].is_graph_output():
        return False
    value = move.inputs[0]
    assert value is not None
    reshape, target = None, None
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape":
        target = _keeps_last_two(producer, sizes)
        if target is None or len(data_uses(value)) != 1 or value.is_graph_output():
            return False
        reshape, value = producer, producer.inputs[0]
        assert value is not None
        producer = value.producer()
    if producer is None or producer.op_type != "MatMul" or producer.domain != "" \
            or producer.graph is not ctx.graph or len(data_uses(value)) != 1 \
            or value.is_graph_output():
        return False
    a, b = producer.inputs
    if a is None or b is None or is_constant(a) or is_constant(b):
        return False
    if (_rank(a) or 0) < 2 or (_rank(b) or 0) < 2:
        return False
    if not (move.metadata_props.get(LAYOUT_KEY) or _to_layer(move.outputs[0])):
        return False
    if not (_cancels(a, sizes) or _cancels(b, sizes)):
        return False  # two new moves for the one that goes: more Transposes to read
    base = producer.name or "matmul"
    new: list[ir.Node] = []
    rereads: Reread = []
    bt = _moved(ctx, b, new, f"{base}_bT", sizes=sizes, rereads=rereads)
    at = _moved(ctx, a, new, f"{base}_aT", sizes=sizes, rereads=rereads)
    product = ir.node("MatMul", [bt, at], name=ctx.unique(f"{base}_T"))
    product.metadata_props.update(producer.metadata_props)
    product.metadata_props[PRODUCT_KEY] = "transposed"
    product.outputs[0].name = ctx.unique(f"{base}_T_out")
    new.append(product)
    if reshape is not None and target is not None:
        shape = swapped_target(ctx, reshape, target, sizes, new)
        new.append(ir.node("Reshape", [product.outputs[0], shape],
                           name=ctx.unique(reshape.name or f"{base}_reshape")))
        new[-1].outputs[0].name = ctx.unique(f"{new[-1].name}_out")
    result = move.outputs[0]
    ctx.graph.insert_before(move, new)
    ir.convenience.replace_all_uses_with(result, new[-1].outputs[0])
    new[-1].outputs[0].type, new[-1].outputs[0].shape = result.type, result.shape
    old_target = reshape.inputs[1] if reshape is not None else None
    swap = swap_last_two(len(new[-1].outputs[0].shape or []) or _rank(value) or 2)
    reread_shapes(ctx, value, product.outputs[0], swap)  # a Shape of P @ V: of its transpose
    if reshape is not None:
        reread_shapes(ctx, reshape.outputs[0], new[-1].outputs[0], swap)
    ctx.graph.remove([n for n in (move, reshape, producer) if n is not None], safe=True)
    drop_dead(ctx, old_target)
    _reread(ctx, rereads)
    for x in (a, b):
        _drop_unread(ctx, x)
    return True


def fold_transposed_products(ctx: Context) -> int:
    """Compute every ``Transpose(MatMul(P, V))`` that feeds a converted Conv as
    ``MatMul(V^T, P^T)`` (see the module docstring); returns how many moves went."""
    folded = rewrite_each(ctx, _fold)
    if runtime_sizes(ctx.graph):  # sizes computed at run time: read them from probes
        folded += rewrite_each(ctx, partial(_fold, sizes=probed_sizes(ctx.graph)))
    log.debug("computed %d attention products transposed", folded)
    return folded


def _unfold(ctx: Context, node: ir.Node, sizes: Sizes | None = None) -> bool:
    if node.op_type != "MatMul" or node.metadata_props.get(PRODUCT_KEY) != "transposed" \
            or node.graph is not ctx.graph:
        return False
    vt, pt = node.inputs
    y_t = node.outputs[0]
    if vt is None or pt is None or (_rank(vt) or 0) < 2 or (_rank(pt) or 0) < 2 \
            or y_t.is_graph_output():
        return False
    uses = list(y_t.uses())
    reshape = uses[0].node if len(uses) == 1 and uses[0].idx == 0 else None
    target = _keeps_last_two(reshape, sizes) if reshape is not None else None
    if target is None:
        reshape = None
    base = (node.name or "matmul").removesuffix("_T")
    new: list[ir.Node] = []
    rereads: Reread = []
    p = _moved(ctx, pt, new, f"{base}_aT", sizes=sizes, rereads=rereads)
    v = _moved(ctx, vt, new, f"{base}_bT", up=True, sizes=sizes, rereads=rereads)
    product = ir.node("MatMul", [p, v], name=ctx.unique(base))
    product.metadata_props.update({k: x for k, x in node.metadata_props.items()
                                   if k != PRODUCT_KEY})
    product.outputs[0].name = ctx.unique(f"{base}_out")
    new.append(product)
    out = y_t
    if reshape is not None and target is not None:
        shape = swapped_target(ctx, reshape, target, sizes, new)
        new.append(ir.node("Reshape", [product.outputs[0], shape],
                           name=ctx.unique(reshape.name or f"{base}_reshape")))
        new[-1].outputs[0].name = ctx.unique(f"{new[-1].name}_out")
        out = reshape.outputs[0]
    rank = _rank(out)
    assert rank is not None
    new.append(ir.node("Transpose", [new[-1].outputs[0]], {"perm": swap_last_two(rank)},
                       name=ctx.unique(f"{base}_move")))
    new[-1].outputs[0].name = ctx.unique(f"{base}_move_out")
    ctx.graph.insert_before(node, new)
    ir.convenience.replace_all_uses_with(out, new[-1].outputs[0])
    new[-1].outputs[0].type, new[-1].outputs[0].shape = out.type, out.shape
    ctx.graph.remove([n for n in (reshape, node) if n is not None], safe=True)
    _reread(ctx, rereads)
    for x in (vt, pt):
        _drop_unread(ctx, x)
    return True


def unfold_transposed_products(ctx: Context) -> int:
    """The way back (``to_linear``): every product :func:`fold_transposed_products` computed
    transposed, ``V^T @ P^T``, is ``Transpose(P @ V)`` again, the model's own product followed
    by the move the layout folds then merge with the projection's; returns how many."""
    sizes = probed_sizes(ctx.graph) if runtime_sizes(ctx.graph) or any(
        isinstance(d, str) for node in ctx.graph for v in node.outputs
        for d in (dims_of(v) or [])) else None
    return rewrite_each(ctx, partial(_unfold, sizes=sizes))
