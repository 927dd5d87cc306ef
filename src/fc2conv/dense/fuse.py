"""Eval-mode BatchNorm folded into the convolution before it, in the net dense_map runs.

In eval mode ``BatchNorm(y) = (y - mu) * g / sqrt(var + eps) + beta`` per channel ``c``, an
affine map of the conv's output; with ``s_c = g_c / sqrt(var_c + eps)`` the conv
``y = W * x + b`` followed by it is the single conv

    W'_c = s_c W_c,        b'_c = (b_c - mu_c) s_c + beta_c

(the same function in real arithmetic). ``s``, ``W'`` and ``b'`` are computed in float64 and
rounded once to the conv's dtype, so the folded net differs from the unfolded one by rounding
only (one relative unit per weight). A BatchNorm is folded only when its input is a
``Conv{1,2,3}d``'s output used by nothing else, it keeps running statistics and the net is in
eval mode; the net is a copy (an fx ``GraphModule``), the caller's module is never changed.
A ReLU whose input is such a fresh conv / BatchNorm / sum output, used by nothing else, runs in
place (``relu_``: the same values, one tensor less to write). A box-filter pool followed only
by a 1x1 conv that narrows the channels (a dense GAP head's classifier) runs after it: both are
linear, so ``conv(pool(x)) = pool(conv(x))``, and the pool then sums fewer channels.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _foldable(conv: Any, bn: Any) -> bool:
    return (any(isinstance(conv, c) and isinstance(bn, b) for c, b in _PAIRS)
            and not bn.training and bn.running_mean is not None
            and bn.running_var is not None and conv.weight.is_floating_point())


def folded(conv: Any, bn: Any) -> nn.Module:
    """A new conv equal to ``bn(conv(x))`` (eval mode), its weights computed in float64."""
    dtype = conv.weight.dtype
    w = conv.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    out = copy.deepcopy(conv)
    out.weight = nn.Parameter((w * scale.reshape(-1, *[1] * (w.dim() - 1))).to(dtype),
                              requires_grad=False)
    out.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype), requires_grad=False)
    return out


def _trace(net: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace`` keeping :class:`~fc2conv.dense.pools.BoxMean` as one module."""
    from fc2conv.dense.pools import BoxMean

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, BoxMean) or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(net)
    return fx.GraphModule(net, graph, type(net).__name__)


def fold_batchnorm(net: nn.Module, *, owned: bool) -> nn.Module:
    """``net`` with every eval-mode BatchNorm that follows a conv folded into it and ReLUs of
    fresh tensors in place (see module).

    ``owned``: ``net`` may be changed in place; otherwise a copy is changed. Returns ``net``
    itself when nothing is folded (training mode, no such pair, or a net fx cannot trace)."""
    if net.training:
        log.info("dense map: the net is in training mode; BatchNorm is not folded")
        return net
    try:
        gm = net if isinstance(net, fx.GraphModule) else _trace(net)
    except Exception as err:  # noqa: BLE001 - any net fx cannot trace runs as it is
        log.info("dense map: BatchNorm not folded (fx cannot trace the net: %s)",
                 str(err).splitlines()[0] if str(err) else type(err).__name__)
        return net
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and _foldable(modules[prev.target], modules[node.target])):
            pairs.append((prev, node))
    relus = [n for n in gm.graph.nodes if _inplace_relu(n, modules)]
    swaps = [n for n in gm.graph.nodes if _head_first(n, modules)]
    if not pairs and not relus and not swaps:
        log.info("dense map: no BatchNorm after a conv to fold; the net runs unfused")
        return net
    if gm is net and not owned:
        gm = copy.deepcopy(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        pairs = [(by_name[c.name], by_name[b.name]) for c, b in pairs]
        relus = [by_name[r.name] for r in relus]
        swaps = [by_name[p.name] for p in swaps]
    for conv_node, bn_node in pairs:
        fused = folded(gm.get_submodule(str(conv_node.target)),
                       gm.get_submodule(str(bn_node.target)))
        parent, _, attr = str(conv_node.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
    for node in relus:  # the same values, written over the fresh tensor they came from
        node.op, node.target, node.args, node.kwargs = ("call_function", torch.relu_,
                                                        (node.args[0],), {})
    for pool in swaps:  # pool(head(x)) = head(pool(x)): both linear, the head 1x1
        head = next(iter(pool.users))
        with gm.graph.inserting_before(pool):
            new_head = gm.graph.call_module(str(head.target), (pool.args[0],))
            new_pool = gm.graph.call_module(str(pool.target), (new_head,))
        head.replace_all_uses_with(new_pool)
        gm.graph.erase_node(head)
        gm.graph.erase_node(pool)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    log.info("dense map: formulation 'conv+BN folded': %d eval-mode BatchNorm(s) folded into "
             "the conv before them (weights rescaled in float64), %d ReLU(s) in place, %d "
             "box-filter pool(s) moved after the 1x1 head that narrows it", len(pairs),
             len(relus), len(swaps))
    return gm


_FRESH_FUNCTIONS = (operator.add, torch.add, operator.sub, torch.sub)


def _inplace_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a ReLU whose input is a fresh tensor (a conv's, BatchNorm's or a
    sum's output) used by nothing else, so it may be overwritten: ``relu_`` then."""
    if node.op == "call_function":
        if node.target not in (torch.relu, nn.functional.relu) or len(node.args) != 1:
            return False
    elif node.op == "call_module":
        if not isinstance(modules.get(str(node.target)), nn.ReLU) or len(node.args) != 1:
            return False
    else:
        return False
    if set(node.kwargs) - {"inplace"}:
        return False
    prev = node.args[0]
    if not isinstance(prev, fx.Node) or len(prev.users) != 1:
        return False
    if prev.op == "call_module":
        return isinstance(modules.get(str(prev.target)),
                          (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm))
    return prev.op == "call_function" and prev.target in _FRESH_FUNCTIONS


def _head_first(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a box-filter pool (:class:`~fc2conv.dense.pools.BoxMean`) whose
    only user is a 1x1 conv (stride 1, no padding, one group) with fewer output than input
    channels: running that conv first (``BoxMean(conv(x))``, equal in real arithmetic, a
    constant bias averaging to itself) leaves the pool fewer channels to sum."""
    from fc2conv.dense.pools import BoxMean

    if (node.op != "call_module" or not isinstance(modules.get(str(node.target)), BoxMean)
            or len(node.args) != 1 or node.kwargs or len(node.users) != 1):
        return False
    head = next(iter(node.users))
    conv = modules.get(str(head.target)) if head.op == "call_module" else None
    return (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(head.args) == 1
            and not head.kwargs and all(k == 1 for k in conv.kernel_size)
            and all(s == 1 for s in conv.stride) and all(d == 1 for d in conv.dilation)
            and conv.padding in ("valid", (0,) * len(conv.kernel_size)) and conv.groups == 1
            and conv.out_channels < conv.in_channels)
