"""``to_linear``: every 1x1 convolution that is one linear map per position becomes an
``nn.Linear`` on a channels-last view, same input/output contract.

A conv with kernel 1, stride 1 and no padding computes ``y[:, :, p] = K x[:, :, p] + b`` at
every position ``p`` of ``(N, C, *S)``; :func:`fc2conv.conv_to_linear` gives the Linear with
``W = K`` (block diagonal for grouped convs) acting on the last axis of ``(N, *S, C)``.
Activations move to channels-last once before a region of converted layers and per-position
ops, and back once. Other convs (3x3, strided, padded) stay. A
:class:`~fc2conv.pytorch.layout.ChannelLayerNorm` in a converted region becomes an
``nn.LayerNorm`` again, so ``to_linear(to_conv(m))`` gives back ``m``'s layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import fx, nn

from fc2conv.core.describe import describe
from fc2conv.core.layers import conv_to_linear
from fc2conv.core.positionwise import elementwise
from fc2conv.core.provenance import mark, source_of
from fc2conv.pytorch.attention import sdpa_pass
from fc2conv.pytorch.direct_calls import install_direct_calls
from fc2conv.pytorch.layout import (
    ChannelLayerNorm,
    Move,
    channel_reduce,
    channels_to_last,
    is_move,
    last_to_channels,
    op_name,
    relayout,
)
from fc2conv.pytorch.ops import (
    TransposedLinear,
    attr_of,
    is_pointwise,
    layer_name,
    module_of,
    new_module_name,
    tensor_args,
)
from fc2conv.pytorch.selfcheck import reference_copy, self_check
from fc2conv.pytorch.to_conv import check_only, replaceable
from fc2conv.pytorch.trace import (
    as_inputs,
    drop_dead_attrs,
    finish,
    record_shapes,
    to_graph,
    unique_name,
)
from fc2conv.pytorch.weights import (
    accept_source_layout,
    restore_modules,
    retarget_aliases,
    share_storage,
)

log = logging.getLogger(__name__)

aten = torch.ops.aten
_CONV_FUNCS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
               torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


def _pointwise_conv(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, fx.Node, str,
                                                                 str | None] | None:
    """A per-position conv node: (conv module, input, user's name, weight target or None)."""
    mod = module_of(gm, node)
    conv: Any
    if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        conv, x, name, wt = mod, node.args[0], str(node.target), None
    elif node.op == "call_function" and node.target in _CONV_FUNCS:
        w_node = node.args[1] if len(node.args) > 1 else None
        b_node = node.args[2] if len(node.args) > 2 else None
        weight, bias = attr_of(gm, w_node), attr_of(gm, b_node)
        if weight is None or (b_node is not None and bias is None):
            return None
        cls: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[_CONV_FUNCS[node.target]]
        rest: list[Any] = list(node.args[3:]) + [None] * 4
        stride, padding, dilation, groups = rest[0] or 1, rest[1] or 0, rest[2] or 1, rest[3] or 1
        if isinstance(padding, str):
            return None
        conv = cls(weight.shape[1] * int(groups), weight.shape[0], tuple(weight.shape[2:]),
                   stride=stride, padding=padding, dilation=dilation, groups=int(groups),
                   bias=bias is not None, device=weight.device, dtype=weight.dtype)
        conv.weight = nn.Parameter(weight.detach())
        if bias is not None:
            conv.bias = nn.Parameter(bias.detach())
        target = str(w_node.target)  # type: ignore[union-attr]
        x, wt = node.args[0], target
        name = layer_name(target)
    else:
        return None
    if getattr(conv, "padding_mode", "zeros") != "zeros" and any(
            p != 0 for p in (conv.padding if not isinstance(conv.padding, str) else (1,))):
        return None
    if any(k != 1 for k in conv.kernel_size) or any(s != 1 for s in conv.stride) or (
            conv.padding != "valid" and (isinstance(conv.padding, str)
                                         or any(p != 0 for p in conv.padding))):
        return None
    return conv, x, name, wt  # type: ignore[return-value]


def transposed_back(lin: nn.Linear) -> TransposedLinear:
    """The :class:`~fc2conv.pytorch.ops.TransposedLinear` (weight stored ``(in, out)``) of a
    Linear whose conv ``to_conv`` made from such a layer (GPT-2's ``Conv1D``): ``W_stored =
    W.T``, so the result loads the original state dict."""
    new = TransposedLinear(lin.weight.t(), lin.bias)
    new.train(lin.training)
    return mark(new, source_of(lin), f"Linear {lin.in_features}->{lin.out_features}, "  # type: ignore[return-value]
                "weight stored (in, out)")


def _region_args(gm: fx.GraphModule, member: Callable[[fx.Node], bool]
                 ) -> Callable[[fx.Node], tuple[int, bool]]:
    """How to move each value to channels-last: ``(extra, seq_last)`` per region.

    A region is a connected set of per-position nodes; all its values have the same spatial
    shape (1x1 convs, LayerNorm over channels and same-shape elementwise ops keep it). When the
    region is entered through :func:`last_to_channels` moves that agree (a model from
    ``to_conv``), its singleton axes are those the moves added: squeezing them gives back the
    original activations and each move cancels against the one it meets. Its other entries
    (masks, per-channel weights) do not decide; a region without such moves keeps its axes.
    """
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")
             and member(n)]
    inside = set(nodes)
    region: dict[fx.Node, int] = {}
    for seed in nodes:
        if seed in region:
            continue
        stack, rid = [seed], len(region)
        region[seed] = rid
        while stack:
            cur = stack.pop()
            for nb in [*tensor_args(cur), *cur.users]:
                if nb in inside and nb not in region:
                    region[nb] = rid
                    stack.append(nb)
    found: dict[int, set[tuple[int, bool]]] = {}  # the entry moves' args, per region
    for n in nodes:
        for a in tensor_args(n):
            if a not in inside and is_move(a) and a.target is last_to_channels:
                found.setdefault(region[n], set()).add(tuple(a.args[1:]))  # type: ignore[arg-type]

    def args_of(value: fx.Node) -> tuple[int, bool]:
        rid = region.get(value)
        # an entry: the regions of the members reading it must agree
        rids = {rid} if rid is not None else {region[u] for u in value.users if u in region}
        choices = set().union(*(found.get(r, set()) for r in rids)) if rids else set()
        return next(iter(choices)) if len(choices) == 1 else (0, True)

    return args_of


def to_linear(model: nn.Module | torch.export.ExportedProgram, example_inputs: Any, *,
              inplace: bool = False, only: Collection[str] | None = None,
              verify: bool = True) -> fx.GraphModule:
    """Return a copy of ``model`` in which every per-position convolution (kernel 1, stride 1, no
    padding, any groups) is an ``nn.Linear`` applied to a channels-last view; other convs stay.

    Same input/output shapes as ``model``; converted layers keep their names and record their
    origin, and load the state-dict entry of the conv they replace (``(O, C, 1, ...)``); a conv
    ``to_conv`` made from a weight stored ``(in, out)`` comes back as a
    :class:`~fc2conv.pytorch.ops.TransposedLinear`, and one whose weight is tied comes back
    holding that very parameter, so ``to_linear(to_conv(m))`` loads ``m.state_dict()``.
    ``example_inputs`` (a tensor or tuple) fixes the activation ranks. ``only``: convert
    just the layers with these names. ``verify``: check the result against ``model`` with
    :func:`fc2conv.compare` on the example inputs and a fresh draw (``Fc2ConvError`` naming the
    first diverging layer when different; ``False`` skips it).
    """
    inputs = as_inputs(example_inputs)
    original = reference_copy(model, inplace, verify)
    gm = to_graph(model, inputs, inplace=inplace)
    if sdpa_pass(gm):  # channel_attention back to SDPA on (B, H, S, D)
        gm.graph.lint()
        gm.recompile()
    record_shapes(gm, inputs)
    retarget_aliases(gm)
    # recognized before any rewrite: once a shared conv is replaced by its Linear, a later
    # call of it no longer looks like a conv, yet it must be converted too
    convs = {n: f for n in gm.graph.nodes if (f := _pointwise_conv(gm, n)) is not None}
    converted: dict[str, tuple[nn.Module, str]] = {}
    made: list[tuple[nn.Module, torch.Tensor]] = []  # (new layer, the weight it came from)

    def rewrite(node: fx.Node, is_moved: Callable[[fx.Node], bool]
                ) -> tuple[nn.Module, str, fx.Node] | None:
        found = convs.get(node)
        if found is not None and (only is None or found[2] in only):
            conv, x, name, wt = found
            key = wt or name
            if key not in converted:
                lin: nn.Module = conv_to_linear(conv, source=source_of(conv) or name)  # type: ignore[arg-type]
                if getattr(conv, "fc2conv_transposed", False) and conv.groups == 1:
                    lin = transposed_back(lin)  # type: ignore[arg-type]
                else:
                    accept_source_layout(lin)
                made.append((lin, conv.weight))  # type: ignore[arg-type]
                owners = {n for n, f in convs.items() if (f[3] or f[2]) == key}
                target = name if wt is None or replaceable(gm, name, owners) \
                    else unique_name(gm, new_module_name(name, wt, "linear"))
                converted[key] = (lin, target)
            return converted[key][0], converted[key][1], x
        mod = module_of(gm, node)
        reads_only_convs = bool(node.users) and set(node.users) <= set(convs)
        if isinstance(mod, ChannelLayerNorm) and (
                is_moved(node.args[0]) or reads_only_convs):  # type: ignore[arg-type]
            ln = nn.LayerNorm(mod.channels, eps=mod.eps, elementwise_affine=mod.weight is not None,
                              bias=mod.bias is not None)
            with torch.no_grad():
                if mod.weight is not None:
                    ln.weight.copy_(mod.weight)
                if mod.bias is not None:
                    ln.bias.copy_(mod.bias)
            mark(ln, source_of(mod) or str(node.target), f"ChannelLayerNorm {mod.channels}")
            return ln, str(node.target), node.args[0]  # type: ignore[return-value]
        return None

    region_args = _region_args(gm, lambda n: (
        ((f := convs.get(n)) is not None and (only is None or f[2] in only))
        or isinstance(module_of(gm, n), ChannelLayerNorm) or is_pointwise(gm, n)
        or elementwise(op_name(n)) or channel_reduce(n, set(n.all_input_nodes), 1)))

    def move(value: fx.Node) -> Move:
        return Move(channels_to_last, region_args(value))

    if only is not None:
        check_only(only, {f[2] for f in convs.values()},
                   "per-position conv")
    anchors = [n for n, f in convs.items() if only is None or f[2] in only]
    gm = relayout(gm, rewrite, lambda n: is_pointwise(gm, n), move, "conv",
                  lambda x, m: (-1,), move_to_conv=False, anchors=anchors)
    weights = {str(a.target) for n, f in convs.items() if (f[3] or f[2]) in converted
               for a in n.all_input_nodes if a.op == "get_attr"}
    drop_dead_attrs(gm, weights)
    for _, (lin, target) in converted.items():
        log.info("%s -> %s", target, describe(lin))
    gm = finish(gm)
    share_storage(gm, made)
    restore_modules(gm, model)
    install_direct_calls(gm)  # eager: aten ops without OpOverload's Python frame
    self_check(original, gm, inputs, "to_linear result")
    return gm

