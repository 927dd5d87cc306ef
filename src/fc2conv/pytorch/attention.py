"""The attention pass: scaled dot-product attention computed in the conv layout ``(B, C, 1, S)``.

After :func:`fc2conv.pytorch.layout.relayout`, Q, K and V are 1x1-conv outputs in
``(B, C, 1, S)``; the model then moves each back to ``(B, S, C)``, splits heads
(``view(B, S, H, D).transpose(1, 2)``), calls ``scaled_dot_product_attention`` and merges the
heads back (``transpose(1, 2).reshape(B, S, C)``), which the next conv moves in again. This
pass replaces that whole sandwich by :func:`channel_attention`, which splits heads along ``C``
(``(B, C, 1, S) -> (B, H, D, S)`` is a view: head ``h`` owns channels ``hD .. hD + D - 1``) and
computes per head, with einsums over that channel slice::

    scores[b, h, q, k] = scale * sum_d Q[b, h, d, q] K[b, h, d, k]      (+ mask, causal)
    P = softmax over k of scores
    out[b, h, d, q]   = sum_k P[b, h, q, k] V[b, h, d, k]

and returns ``out`` viewed as ``(B, C, 1, S)``: no activation transpose, no layout move.
A mask broadcasts against ``scores`` exactly as it does against SDPA's ``(B, H, Sq, Sk)``.
Grouped K/V heads (``kv_heads`` < ``heads``, ``r = heads / kv_heads``): query head
``h = g r + j`` reads K/V head ``g``, a grouped einsum over the ``(B, G, r, D, S)`` view of Q
and the ``(B, G, D, S)`` view of K and V, so ``repeat_kv`` copies nothing. Rotary embeddings
between the head split and SDPA (Llama, Mistral, Qwen2) are applied along ``C`` by
:func:`fc2conv.pytorch.rotary.channel_rotary`. Attention whose Q/K/V are anything else is
left as it is (the values move back to ``(B, S, C)`` around it), and the log says which.

Execution. A captured graph (``torch.export``, dynamo, the ONNX tracer) records the einsum
form above: no transpose, which is what a Neural-Engine converter needs. In eager PyTorch the
values are stored positions-major. The move in is a strided view of the ``(B, S, C)``
activation, and 1x1 convs and elementwise ops keep those strides. The ``(B, H, S, D)`` head
views of that memory are then free, so :func:`channel_attention` runs the fused
``scaled_dot_product_attention`` kernel on them and views the merged heads back as
``(B, C, 1, S)``. The shapes and the math are the same; only the kernel and its summation
order differ. On CPU the einsum form computes ``(B, H, S, S)`` scores, a mask pass and a
softmax pass, and its NCHW-contiguous output sends every later 1x1 conv down oneDNN's
reorder path. At BERT-base size this made the converted model 1.49x the original; it is 1.12x
with the SDPA kernel (``bench/converted_overhead.py``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from fc2conv.pytorch.layout import (
    capturing,
    channels_to_last,
    is_move,
    last_to_channels,
    positions_major,
)
from fc2conv.pytorch.ops import tensor_shape
from fc2conv.pytorch.rotary import (
    channel_rotary,
    head_rotary,
    head_source,
    name_of,
    position_table,
    rotary_table,
    table_root,
)

log = logging.getLogger(__name__)

_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_RESHAPES = {"view", "reshape", "_unsafe_view"}
_NOOPS = {"contiguous", "clone", "alias"}


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      mask: torch.Tensor | None = None, scale: float | None = None,
                      is_causal: bool = False, kv_heads: int | None = None) -> torch.Tensor:
    """Multi-head attention on ``(B, C, 1, S)`` tensors, heads split along ``C`` (see the
    module docstring); equals ``scaled_dot_product_attention`` of the ``(B, H, S, D)`` views
    (with K and V heads repeated ``heads / kv_heads`` times when ``kv_heads`` is given)."""
    b, c, _, sq = q.shape
    sk = k.shape[-1]
    d = c // heads
    g = kv_heads or heads
    r = heads // g
    if not capturing() and all(positions_major(t) for t in (q, k, v)):
        return _sdpa_on_views(q, k, v, heads, g, mask, scale, is_causal)
    qh = q.reshape(b, g, r, d, sq)
    kh = k.reshape(b, g, d, sk)
    vh = v.reshape(b, g, v.shape[1] // g, sk)
    scores = torch.einsum("bgrdq,bgdk->bgrqk", qh, kh).reshape(b, heads, sq, sk) \
        * (1 / math.sqrt(d) if scale is None else scale)
    if is_causal:
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    probs = scores.softmax(-1).reshape(b, g, r, sq, sk)
    out = torch.einsum("bgrqk,bgdk->bgrdq", probs, vh)
    return out.reshape(b, -1, 1, sq)


def _sdpa_on_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
                   mask: torch.Tensor | None, scale: float | None, is_causal: bool
                   ) -> torch.Tensor:
    """Eager execution of :func:`channel_attention` when Q, K, V are stored positions-major
    (:func:`~fc2conv.pytorch.layout.positions_major`): the ``(B, H, S, D)`` head views of
    that memory are free (as in the original model), so the fused
    ``scaled_dot_product_attention`` kernel runs on them and its merged heads are viewed back
    as ``(B, C, 1, S)`` (channels-last strides). Same shapes, same math; no activation is
    copied that the original model does not copy."""
    b, c, _, sq = q.shape

    def split(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.squeeze(2).transpose(1, 2).unflatten(-1, (n, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        split(q, heads), split(k, groups), split(v, groups), attn_mask=mask, scale=scale,
        is_causal=is_causal, enable_gqa=groups != heads)
    merged = out.transpose(1, 2).reshape(b, sq, -1)  # the copy the model's own merge makes
    return merged.transpose(1, 2).unsqueeze(2)


def _swaps_1_2(node: fx.Node) -> bool:
    """``transpose(1, 2)`` or ``permute(0, 2, 1, 3)`` of a rank-4 value."""
    name, args = name_of(node), list[Any](node.args[1:])
    if name == "transpose" and len(args) == 2:
        return sorted(int(a) % 4 for a in args) == [1, 2]
    if name == "permute":
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else list(args)
        return [int(d) % 4 for d in dims] == [0, 2, 1, 3]
    return False


def _skip_noops(node: Any) -> Any:
    """Walk up through ``contiguous``/``clone`` and reshapes that keep the shape."""
    while isinstance(node, fx.Node) and (name_of(node) in _NOOPS or (
            name_of(node) in _RESHAPES and tensor_shape(node) == tensor_shape(node.args[0]))):
        node = node.args[0]
    return node


def _head_input(node: Any) -> tuple[fx.Node, int] | None:
    """For SDPA's ``q``: ``transpose(1, 2)(view(channels_to_last(x), (B, S, H, D)))``, return
    ``(x, H)`` with ``x`` in ``(B, C, 1, S)``."""
    node = _skip_noops(node)
    if not isinstance(node, fx.Node) or not _swaps_1_2(node):
        return None
    split = _skip_noops(node.args[0])
    shape = tensor_shape(split)
    if name_of(split) not in _RESHAPES or shape is None or len(shape) != 4:
        return None
    back = split.args[0]
    if not (isinstance(back, fx.Node) and is_move(back) and back.target is channels_to_last
            and tuple(back.args[1:]) == (1, True)):
        return None
    src = tensor_shape(back.args[0])
    if src is None or src[-1] != shape[2] * shape[3]:
        return None
    return back.args[0], shape[2]  # type: ignore[return-value]


def _merged_output(node: fx.Node) -> fx.Node | None:
    """The node where SDPA's ``(B, H, S, D)`` output is back in ``(B, S, H*D)``."""
    cur = node
    swapped = False
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        shape = tensor_shape(user)
        if name_of(user) in _NOOPS or (name_of(user) in _RESHAPES and shape == tensor_shape(cur)):
            cur = user
        elif not swapped and _swaps_1_2(user):
            cur, swapped = user, True
        elif swapped and name_of(user) in _RESHAPES and shape is not None and len(shape) == 3:
            return user
        else:
            return None
    return None


def _sdpa_args(node: fx.Node) -> dict[str, Any] | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if args.get("dropout_p", 0.0) not in (0, 0.0) or args.get("enable_gqa", False):
        return None
    return args


def _operand(node: Any, tables: dict[fx.Node, fx.Node], graph: fx.Graph
             ) -> tuple[fx.Node, int, int] | None:
    """An SDPA operand in the conv layout: ``(value (B, C, 1, S), heads, repeat)`` -- its head
    split's conv output, rotated along ``C`` when the model rotates it (the tables moved once,
    cached in ``tables``), with the grouped-K/V repeat factor; ``None`` when the operand is
    not such a chain. New nodes go where ``graph`` is inserting."""
    src = head_source(node)
    split = _head_input(src.split) if src is not None else None
    if src is None or split is None:
        return None
    x, heads = split
    if src.rotary is not None:
        cos, sin = (_table(t, tables, graph) for t in src.rotary)
        x = graph.call_function(channel_rotary, (x, cos, sin, heads))
    return x, heads, src.repeat


def _table(table: fx.Node, tables: dict[fx.Node, fx.Node], graph: fx.Graph) -> fx.Node:
    root = table_root(table)
    if root not in tables:
        tables[root] = graph.call_function(rotary_table, (root,))
    return tables[root]


def attention_pass(gm: fx.GraphModule) -> int:
    """Replace every SDPA whose Q, K, V come from the conv layout (and whose merged output
    goes back to it) by :func:`channel_attention`; returns how many. Q and K may be rotated
    (:mod:`fc2conv.pytorch.rotary`) and K, V repeated for grouped heads. The caller lints and
    recompiles (``cancel_inverse_moves`` then drops the move pairs this leaves)."""
    graph = gm.graph
    done = 0
    tables: dict[fx.Node, fx.Node] = {}  # one rotary table per model table, for all layers
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        args = _sdpa_args(node)
        merged = _merged_output(node)
        plan = _plan(args) if args is not None and merged is not None else None
        if plan is None or merged is None or args is None:
            log.info("attention %r stays in (B, H, S, D): its Q/K/V are not head splits of "
                     "conv outputs (through rotary and grouped K/V), or it has dropout",
                     node.name)
            continue
        (qs, ks, vs), heads, kv_heads = plan
        with graph.inserting_before(merged):
            q, k, v = (_operand(a, tables, graph) for a in (qs, ks, vs))
            att = graph.call_function(channel_attention, (q[0], k[0], v[0], heads), {  # type: ignore[index]
                "mask": args.get("attn_mask"), "scale": args.get("scale"),
                "is_causal": bool(args.get("is_causal", False)),
                **({"kv_heads": kv_heads} if kv_heads != heads else {})})
            back = graph.call_function(channels_to_last, (att, 1, True))
        merged.replace_all_uses_with(back)
        _erase_unused(graph, node, merged)
        done += 1
    return done


def _plan(args: dict[str, Any]) -> tuple[tuple[Any, Any, Any], int, int] | None:
    """Check (without building anything) that Q, K, V are chains :func:`_operand` reads, with
    consistent heads: ``((q, k, v), heads, kv_heads)``."""
    found = []
    for key in ("query", "key", "value"):
        src = head_source(args.get(key))
        split = _head_input(src.split) if src is not None else None
        if src is None or split is None:
            return None
        found.append((split[1], src.repeat, src.rotary is not None))
    (hq, rq, _), (hk, rk, _), (hv, rv, rot_v) = found
    if rq != 1 or rot_v or hk != hv or rk != rv or hk * rk != hq:
        return None
    return (args["query"], args["key"], args["value"]), hq, hk


def _erase_unused(graph: fx.Graph, sdpa: fx.Node, merged: fx.Node) -> None:
    """Erase the replaced SDPA, its merge chain, and what only they read (head splits, rotary,
    ``repeat_kv``, the moves before them), up to values something else still reads
    (``eliminate_dead_code`` would keep SDPA: it counts as impure, since it may draw dropout)."""
    region: list[fx.Node] = []
    cur: Any = merged
    while cur is not sdpa:  # the merge chain: single-input ops back to the SDPA
        region.append(cur)
        cur = cur.args[0]
    region.append(sdpa)
    inputs = list(sdpa.all_input_nodes)
    for node in region:  # from the output back to the SDPA
        if not node.users:
            graph.erase_node(node)
    while inputs:  # then whatever fed only the erased nodes
        node = inputs.pop()
        if node.users or node.op not in ("call_function", "call_method"):
            continue
        inputs.extend(node.all_input_nodes)
        graph.erase_node(node)


def _sdpa_heads(graph: fx.Graph, x: Any, heads: int) -> fx.Node:
    """``(B, C, 1, S)`` -> ``(B, H, S, D)``: the move to ``(B, S, C)``, then the head split; a
    :func:`channel_rotary` of a conv output becomes the rotation of its head split
    (:func:`~fc2conv.pytorch.rotary.head_rotary`, tables back to ``(B', 1, S, D)``)."""
    rot = x if isinstance(x, fx.Node) and x.op == "call_function" \
        and x.target is channel_rotary else None
    if rot is not None:
        x = rot.args[0]
    last = graph.call_function(channels_to_last, (x, 1, True))
    split = graph.call_method("unflatten", (last, -1, (heads, -1)))
    heads_view = graph.call_method("transpose", (split, 1, 2))
    if rot is None:
        return heads_view
    cos, sin = (graph.call_function(position_table, (_table_source(t),)) for t in rot.args[1:3])
    return graph.call_function(head_rotary, (heads_view, cos, sin))


def _table_source(table: Any) -> Any:
    """The model's own table a :func:`rotary_table` node moved (else the node itself, moved
    back by its transpose)."""
    if isinstance(table, fx.Node) and table.op == "call_function" \
            and table.target is rotary_table:
        return table.args[0]
    return table


def sdpa_pass(gm: fx.GraphModule) -> int:
    """The way back (``to_linear``): every :func:`channel_attention` becomes the sandwich it
    replaced -- ``channels_to_last``, head split ``unflatten(-1, (H, D)).transpose(1, 2)``
    (a :func:`channel_rotary` operand rotated after it, K and V heads repeated by
    ``repeat_interleave`` for grouped heads), ``scaled_dot_product_attention`` (same mask,
    scale and causality: its masks broadcast against ``(B, H, Sq, Sk)`` as they do against
    the einsum scores), head merge ``transpose(1, 2).flatten(2)`` and ``last_to_channels`` --
    so the moves cancel against the Linears' layout and ``to_linear(to_conv(m))`` computes
    attention as ``m`` did; returns how many. The caller lints and recompiles."""
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not channel_attention:
            continue
        kw = dict(zip(("q", "k", "v", "heads", "mask", "scale", "is_causal", "kv_heads"),
                      node.args, strict=False)) | dict(node.kwargs)
        q, k, v, heads = kw["q"], kw["k"], kw["v"], int(kw["heads"])  # type: ignore[call-overload]
        kv_heads = int(kw.get("kv_heads") or heads)  # type: ignore[call-overload]
        with graph.inserting_before(node):
            qh = _sdpa_heads(graph, q, heads)
            kh, vh = (_sdpa_heads(graph, t, kv_heads) for t in (k, v))
            if kv_heads != heads:
                kh, vh = (graph.call_method("repeat_interleave", (t, heads // kv_heads),
                                            {"dim": 1}) for t in (kh, vh))
            att = graph.call_function(F.scaled_dot_product_attention, (qh, kh, vh), {
                "attn_mask": kw.get("mask"), "scale": kw.get("scale"),
                "is_causal": bool(kw.get("is_causal", False))})
            merged = graph.call_method("flatten", (graph.call_method("transpose", (att, 1, 2)),
                                                   2))
            back = graph.call_function(last_to_channels, (merged, 1, True))
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        for arg in (q, k):  # rotations and tables nothing else reads any more
            for dead in (arg, *(arg.args[1:3] if isinstance(arg, fx.Node) else ())):
                if isinstance(dead, fx.Node) and not dead.users and dead.op == "call_function":
                    graph.erase_node(dead)
        done += 1
    return done
