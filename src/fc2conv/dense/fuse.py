"""Eval-mode BatchNorm folded into the convolution before it, in the net dense_map runs.

In eval mode ``BatchNorm(y) = (y - mu) * g / sqrt(var + eps) + beta`` per channel ``c``, an
affine map of the conv's output; with ``s_c = g_c / sqrt(var_c + eps)`` the conv
``y = W * x + b`` followed by it is the single conv

    W'_c = s_c W_c,        b'_c = (b_c - mu_c) s_c + beta_c

(the same function in real arithmetic). ``s``, ``W'`` and ``b'`` are computed in float64 and
rounded once to the conv's dtype, so the folded net differs from the unfolded one by rounding
only (one relative unit per weight). A BatchNorm is folded only when its input is a conv's
output used by nothing else and it normalizes with running statistics (eval mode). Both may be
module calls (``Conv{1,2,3}d``, ``BatchNorm{1,2,3}d``) or functional calls in the traced graph
(``F.conv2d(x, self.w, self.b)``, ``F.batch_norm(y, mean, var, ..., training=False)``, and the
aten ops of an exported program's graph, ``aten.conv2d`` / ``aten.batch_norm``) whose weights
and statistics are the module's own tensors (``get_attr``) read by nothing else. The net is a
copy (an fx ``GraphModule``), the caller's module is never changed.
A ReLU whose input is such a fresh conv / BatchNorm / sum output, used by nothing else, runs in
place (``relu_``: the same values, one tensor less to write). A box-filter pool followed only
by a 1x1 conv that narrows the channels (a dense GAP head's classifier) runs after it: both are
linear, so ``conv(pool(x)) = pool(conv(x))``, and the pool then sums fewer channels.
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Norm:
    """An eval-mode batch norm's tensors (``weight`` / ``bias`` may be ``None``)."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _fold(w: torch.Tensor, b: torch.Tensor | None, bn: _Norm
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of ``bn(conv(x))`` (see module): float64, rounded once to ``w``'s dtype."""
    dtype, wd = w.dtype, w.detach().double()
    mean, var = bn.mean.detach().double(), bn.var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    bias = b.detach().double() if b is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return ((wd * scale.reshape(-1, *[1] * (wd.dim() - 1))).to(dtype),
            ((bias - mean) * scale + beta).to(dtype))


def folded(conv: Any, bn: Any) -> nn.Module:
    """A new conv equal to ``bn(conv(x))`` (eval mode), its weights computed in float64."""
    return _with_weights(conv, *_fold(conv.weight, conv.bias, _Norm(
        bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)))


def _with_weights(conv: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(conv)
    out.weight = nn.Parameter(w, requires_grad=False)
    out.bias = nn.Parameter(b, requires_grad=False)
    return out


_ATEN = torch.ops.aten
# positional parameter names of the functional forms (the aten ops' schemas name them alike)
_BN_F = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
         "eps")
_BN_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
            "eps", "cudnn_enabled")
_BN_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    nn.functional.batch_norm: _BN_F, torch.batch_norm: _BN_ATEN,
    _ATEN.batch_norm.default: _BN_ATEN}
_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_FUNCTIONS = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d,
                   torch.conv1d, torch.conv2d, torch.conv3d, _ATEN.conv1d.default,
                   _ATEN.conv2d.default, _ATEN.conv3d.default)


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    return {**dict(zip(names, node.args, strict=False)), **node.kwargs}


def _tensor(gm: fx.GraphModule, value: Any, users: int | None = None) -> Any:
    """The module tensor a ``get_attr`` node reads (``None`` for ``None``); ``False`` when
    ``value`` is not one (computed in the graph), or has other readers than ``users``."""
    if value is None:
        return None
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return False
    if users is not None and len(value.users) > users:
        return False
    try:
        out = operator.attrgetter(str(value.target))(gm)
    except AttributeError:
        return False
    return out if isinstance(out, torch.Tensor) else False


def _norm_of(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]
             ) -> tuple[Any, _Norm] | None:
    """``(input, its eval-mode batch norm)`` when ``node`` is one (module or function)."""
    if node.op == "call_module":
        bn = modules.get(str(node.target))
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training
                or bn.running_mean is None or bn.running_var is None
                or len(node.args) != 1 or node.kwargs):
            return None
        return node.args[0], _Norm(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    if node.op != "call_function" or node.target not in _BN_FUNCTIONS:
        return None
    kw = _bound(node, _BN_FUNCTIONS[node.target])
    if kw.get("training", False) is not False or "input" not in kw:
        return None
    parts = [_tensor(gm, kw.get(k)) for k in ("running_mean", "running_var", "weight", "bias")]
    if any(p is False for p in parts) or parts[0] is None or parts[1] is None:
        return None
    eps = kw.get("eps", 1e-5)
    if not isinstance(eps, (int, float)):
        return None
    mean, var, weight, bias = parts
    return kw["input"], _Norm(mean, var, weight, bias, float(eps))


def _conv_of(gm: fx.GraphModule, node: Any, modules: dict[str, nn.Module], channels: int
             ) -> tuple[Any, Any] | None:
    """``(weight, bias)`` of the conv ``node`` when its output (read only by the batch norm)
    may take the folded weights: a ``Conv{1,2,3}d`` module, or a functional conv whose weight
    and bias are module tensors read only by it; ``channels`` must be its output channels."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.op == "call_module":
        conv = modules.get(str(node.target))
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and conv.out_channels == channels:
            return conv.weight, conv.bias
        return None
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None
    kw = _bound(node, _CONV_NAMES)
    w, b = _tensor(gm, kw.get("weight"), 1), _tensor(gm, kw.get("bias"), 1)
    if w is False or w is None or b is False or w.shape[0] != channels:
        return None
    return w, b


def _set_conv_weights(gm: fx.GraphModule, node: fx.Node, w: torch.Tensor, b: torch.Tensor,
                      k: int) -> None:
    """Point a functional conv at new weights ``w``, ``b`` (module attributes of ``gm``)."""
    names = (f"_fc2conv_folded{k}_weight", f"_fc2conv_folded{k}_bias")
    kw = _bound(node, _CONV_NAMES)
    old = [v for v in (kw.get("weight"), kw.get("bias")) if isinstance(v, fx.Node)]
    for name, t in zip(names, (w, b), strict=True):
        gm.register_parameter(name, nn.Parameter(t, requires_grad=False))
    with gm.graph.inserting_before(node):
        kw["weight"], kw["bias"] = (gm.graph.get_attr(n) for n in names)
    positional = [kw.pop(n) for n in _CONV_NAMES[:3]]
    node.args, node.kwargs = tuple(positional), kw
    for attr in old:
        if not attr.users:
            gm.graph.erase_node(attr)


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
    if net.training and "eval" not in vars(net):  # an exported program's mode is its graph's
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
        found = _norm_of(gm, node, modules)
        if found is not None and _conv_of(gm, found[0], modules, found[1].mean.numel()):
            pairs.append((found[0], node))
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
    modules = dict(gm.named_modules())
    for k, (conv_node, bn_node) in enumerate(pairs):
        _, norm = _norm_of(gm, bn_node, modules)  # type: ignore[misc]
        if conv_node.op == "call_module":
            conv: Any = gm.get_submodule(str(conv_node.target))
            fused = _with_weights(conv, *_fold(conv.weight, conv.bias, norm))
            parent, _, attr = str(conv_node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        else:
            w, b = _conv_of(gm, conv_node, modules, norm.mean.numel())  # type: ignore[misc]
            _set_conv_weights(gm, conv_node, *_fold(w, b, norm), k)
        reads = [a for a in bn_node.all_input_nodes if a.op == "get_attr"]
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        for attr in reads:
            if not attr.users:
                gm.graph.erase_node(attr)
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
        if (node.target not in (torch.relu, nn.functional.relu, _ATEN.relu.default)
                or len(node.args) != 1):
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
    return prev.op == "call_function" and (prev.target in _FRESH_FUNCTIONS
                                           or prev.target in _CONV_FUNCTIONS
                                           or prev.target in _BN_FUNCTIONS)


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
