"""``convolutionalize``: a classifier ``features -> [pool] -> flatten -> FC head`` becomes a fully
convolutional net (OverFeat, FCN; Caffe's "net surgery" done for any graph).

On the feature map ``(C, H, W)`` that the training size ``input_shape`` produces:

* the first Linear over ``flatten(x)`` becomes a conv with kernel ``(H, W)``
  (:func:`fc2conv.flatten_linear_to_conv`, ``K = W.reshape(O, C, H, W)``; for a channels-last
  flatten ``x.permute(0, 2, 3, 1).flatten(1)``, ``K = W.reshape(O, H, W, C).movedim(-1, 1)``);
* later Linears become 1x1 convs (:func:`fc2conv.linear_to_conv`); activations and dropout stay;
  ``BatchNorm1d`` becomes ``BatchNorm2d`` with the same statistics; softmax moves to axis 1;
* ``AdaptiveAvgPool2d`` before the flatten: dropped where it is the identity at the training
  size (VGG at 224), replaced by a fixed ``AvgPool2d(k)`` where its windows are all ``k x k``
  and disjoint (``H = k h``), refused otherwise;
* global average pooling + head (ResNet, ConvNeXt, MobileNet, MONAI 3-D nets), three modes:
  ``"dense"`` (default): the global pool over the training-size map ``(h, w)`` becomes a
  stride-1 ``AvgPool(h, w)`` and the head runs per position after it (Linear -> 1x1 conv,
  LayerNorm over channels, BatchNorm1d -> BatchNorm2d, activations, dropout), so on a larger
  image each cell is the classifier on its window (exactly, for padding-free features);
  ``"keep"``: average and affine maps commute, ``mean_p (W x_p + b) = W mean_p x_p + b``, so
  the head's leading affine layers become 1x1 convs before a global mean that is kept (the
  logits at any size); ``"drop"``: that pre-pool map of per-position scores.

At ``input_shape`` the result returns ``(N, classes, 1, 1)`` equal to the original logits; on a
larger input, a dense map of scores (see :func:`fc2conv.receptive_field`).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from fc2conv.core.describe import describe, shape_str
from fc2conv.core.layers import flatten_linear_to_conv, linear_to_conv
from fc2conv.core.provenance import mark
from fc2conv.core.receptive import adaptive_as_fixed, adaptive_windows
from fc2conv.core.shapes import as_shape
from fc2conv.errors import Fc2ConvError, wrap
from fc2conv.pytorch.ops import (
    LinearOp,
    adaptive_of,
    channels_last_source,
    first_input,
    flatten_of,
    is_pointwise,
    linear_of,
    module_of,
    softmax_dim,
    tensor_shape,
    user_name,
)
from fc2conv.pytorch.receptive_ops import logits_node
from fc2conv.pytorch.selfcheck import reference_copy, self_check
from fc2conv.pytorch.trace import (
    Inputs,
    check_model,
    finish,
    record_shapes,
    to_graph,
    unique_name,
)

log = logging.getLogger(__name__)

GLOBAL_POOL = ("dense", "keep", "drop")
_AFFINE = (nn.Dropout, nn.Identity)  # affine in eval mode (dropout is the identity)


def _mean_pool_source(node: fx.Node) -> fx.Node | None:
    """``x.mean((2, 3))`` / ``torch.mean(x, [-2, -1])`` of an ``(N, C, H, W)`` map -> ``x``."""
    if not ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target in (torch.mean,
                                                               torch.ops.aten.mean.dim))):
        return None
    src = first_input(node)
    shape = tensor_shape(src)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if isinstance(dims, int):
        dims = [dims]
    if (isinstance(src, fx.Node) and shape is not None and len(shape) == 3 and not keep
            and isinstance(dims, (list, tuple)) and [int(d) % 3 for d in dims] == [2]):
        inner = flatten_of_positions(src)  # x.flatten(2).mean(-1): the positions, averaged
        if inner is not None:
            return inner
    if shape is None or len(shape) < 3 or keep or not isinstance(dims, (list, tuple)):
        return None
    rank = len(shape)
    spatial = list(range(2, rank))
    return src if sorted(int(d) % rank for d in dims) == spatial else None  # type: ignore[return-value]


def flatten_of_positions(node: fx.Node) -> fx.Node | None:
    """``x.flatten(2)`` of an ``(N, C, *spatial)`` map (all positions on one axis) -> ``x``."""
    name = node.target if node.op == "call_method" else str(
        getattr(node.target, "__name__", "")).split(".")[0]
    if name != "flatten" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    shape = tensor_shape(src)
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end: Any = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if shape is None or len(shape) < 3 or start != 2 or int(end) % len(shape) != len(shape) - 1:
        return None
    return src


_DROPOUTS = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default,
             torch.nn.functional.dropout)


def _eval_dropout(n: fx.Node) -> bool:
    """A functional dropout (``F.dropout``, ``aten.dropout``, in-place ``aten.dropout_``)
    with ``train=False``: the identity."""
    if n.op != "call_function" or n.target not in _DROPOUTS:
        return False
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", n.kwargs.get("training"))
    if n.target is torch.nn.functional.dropout and train is None:
        train = True  # F.dropout's default
    return train is False


def _token_pick(node: fx.Node) -> fx.Node | None:
    """``x[:, i]`` of a ``(N, S, C)`` sequence (``select``/``getitem``) -> ``x``."""
    src = first_input(node)
    if not isinstance(src, fx.Node):
        return None
    shape, out = tensor_shape(src), tensor_shape(node)
    if shape is None or out is None or len(shape) != 3 or len(out) != 2:
        return None
    picks = node.op == "call_function" and node.target in (
        torch.ops.aten.select.int, operator.getitem, torch.select)
    return src if picks else None


def _is_head_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """What a classifier head may hold between the pooled vector and the logits (what
    :func:`_convert_layer` and the LayerNorm swap convert)."""
    from fc2conv.pytorch.to_conv import _layer_norm_of

    return (linear_of(gm, node) is not None or is_pointwise(gm, node) or _eval_dropout(node)
            or isinstance(module_of(gm, node), nn.BatchNorm1d | nn.Dropout | nn.Identity)
            or softmax_dim(gm, node) is not None or _layer_norm_of(gm, node) is not None)


def _branches(node: fx.Node) -> list[fx.Node]:
    """The operands of ``node`` computed from the model's input (not weights or constants)."""
    def from_input(n: fx.Node) -> bool:
        seen, todo = set(), [n]
        while todo:
            m = todo.pop()
            if m.op == "placeholder":
                return True
            if m in seen:
                continue
            seen.add(m)
            todo.extend(m.all_input_nodes)
        return False

    return [a for a in node.all_input_nodes if from_input(a)]


def _head(gm: fx.GraphModule) -> list[fx.Node]:
    """The chain of nodes from the output back to (excluding) the flatten or global pool.

    Walking back from the logits, the first node that a head cannot hold is named with the
    reason: a join of two branches (a distillation head ``(head(x) + dist_head(x)) / 2``) or
    an op that is not Linear, activation, dropout, BatchNorm1d, LayerNorm or softmax (the
    model has no flatten or global average pool before its classifier)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = logits_node(out.args[0])
    if not isinstance(value, fx.Node):
        raise Fc2ConvError("the model must return one tensor (the logits)")
    chain: list[fx.Node] = []
    node = value
    while True:
        if flatten_of(gm, node) is not None or _mean_pool_source(node) is not None:
            break
        src = first_input(node)
        token = _token_pick(node)
        if token is not None:
            reader = chain[-1] if chain else node
            raise Fc2ConvError(
                f"Cannot convolutionalize {user_name(reader)!r}: the classifier reads one "
                f"token (x[:, i], a CLS token) of a {shape_str(tensor_shape(token) or ())} "
                f"sequence, not a pooled feature map, so its logits belong to no image window"
            )
        branches = _branches(node)
        if len(branches) > 1:
            names = " and ".join(repr(user_name(b)) for b in branches)
            raise Fc2ConvError(
                f"Cannot convolutionalize the head at {user_name(node)!r} "
                f"({getattr(node.target, '__name__', node.target)}): it joins {len(branches)} "
                f"branches ({names}); only a single chain of Linear, activation, dropout, "
                f"BatchNorm1d, LayerNorm and softmax layers after the pool is supported"
            )
        if not isinstance(src, fx.Node) or tensor_shape(node) is None or not _is_head_op(
                gm, node):
            read_by = f" (read by {user_name(chain[-1])!r})" if chain else ""
            raise Fc2ConvError(
                f"Cannot convolutionalize the head at {user_name(node)!r} "
                f"({node.op} {getattr(node.target, '__name__', node.target)}, output "
                f"{shape_str(tensor_shape(node) or ())}){read_by}: it is not a Linear, "
                f"activation, dropout, BatchNorm1d, LayerNorm or softmax layer, and no flatten "
                f"or global average pool comes before it"
            )
        chain.append(node)
        node = src
    chain.reverse()
    return [node, *chain]


class PooledMap(nn.Module):
    """The spatial mean of a dense map, as ``(N, K)``: what the original's logits equal when
    ``global_pool="drop"`` returned the pre-pool map (the map averages to the logits)."""

    def __init__(self, dense: nn.Module) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x)
        return out.mean(tuple(range(2, out.dim()))) if out.dim() > 2 else out


def convolutionalize(model: nn.Module | torch.export.ExportedProgram, input_shape: Sequence[int],
                     *, global_pool: str = "dense", inplace: bool = False,
                     verify: bool = True) -> fx.GraphModule:
    """Return ``model`` (a classifier on ``(N, *input_shape)`` images) as a fully convolutional
    ``GraphModule``: ``(N, classes, 1, 1)`` at ``input_shape``, equal to the original logits,
    and a dense map of scores on larger inputs.

    ``global_pool``: for a global-average-pooling head, ``"dense"`` (default) turns the pool
    into a stride-1 average pool of the training-size feature map, so each cell of a larger
    image's map is the classifier on its window; ``"keep"`` pools globally after the converted
    affine head layers (``(N, classes, 1, 1)``, the logits, at any size); ``"drop"`` returns
    the pre-pool map of scores per position (needs a head without nonlinearities). Raises
    :class:`~fc2conv.errors.Fc2ConvError` (a ``ValueError``) naming the layer it cannot convert
    exactly, and why. ``model`` should be in eval mode (dropout, batch norm). ``verify``: check
    the result against ``model`` with :func:`fc2conv.compare` at ``input_shape`` on a random
    image and a fresh draw (with ``"drop"``, the map's spatial mean), raising ``Fc2ConvError``
    naming the first diverging layer when it is different; ``False`` skips it.
    """
    if global_pool not in GLOBAL_POOL:
        raise Fc2ConvError(
            f"global_pool must be 'dense', 'keep' or 'drop', got {global_pool!r}")
    check_model(model)
    shape = as_shape(input_shape, min_len=2, max_len=4)
    original = reference_copy(model, inplace, verify)
    example = torch.randn(2, *shape, dtype=_dtype(model))  # batch 2: a dynamic batch axis
    gm = _convolutionalize(model, shape, global_pool, inplace, example)
    checked: nn.Module = PooledMap(gm) if global_pool == "drop" else gm
    self_check(original, checked, Inputs((example,)), "convolutionalized model")
    return gm


def _convolutionalize(model: nn.Module | torch.export.ExportedProgram, shape: tuple[int, ...],
                      global_pool: str, inplace: bool, example: torch.Tensor) -> fx.GraphModule:
    """The rewrite behind :func:`convolutionalize` (without the self-check)."""
    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule) and model.training:
        log.warning("%s is in training mode: dropout and batch norm make its outputs random; "
                    "call model.eval() first", type(model).__name__)
    gm = to_graph(model, (example,), inplace=inplace)
    record_shapes(gm, (example,))
    start, *head = _head(gm)
    ops = _head_linears(gm, head)
    if not ops:
        raise Fc2ConvError("the classifier head has no Linear layer to convert")
    mean_src = _mean_pool_source(start)
    if mean_src is not None:  # x.mean((2, 3)): a global average pool and a flatten in one
        _global_head(gm, start, mean_src, None, head, global_pool, ops)
        return finish(gm)
    flat_src = flatten_of(gm, start)
    assert flat_src is not None
    order = "chw"
    cl = channels_last_source(flat_src)
    if cl is not None:
        order, flat_src = "hwc", cl
    fmap: fx.Node = flat_src
    pool = adaptive_of(gm, fmap)
    in_hw = tensor_shape(pool.input if pool else fmap)
    if pool is not None and in_hw is not None:
        out_hw = tensor_shape(fmap)[2:]  # type: ignore[index]
        if all(o == 1 for o in out_hw) and any(i != 1 for i in in_hw[2:]) and pool.kind == "avg":
            if order == "hwc":
                raise Fc2ConvError("a channels-last flatten after global pooling is not supported")
            _global_head(gm, start, pool.input, fmap, head, global_pool, ops)
            return finish(gm)
        fmap = _fold_adaptive(gm, fmap, pool, in_hw[2:], out_hw)
    _flat_head(gm, start, fmap, head, order, ops)
    return finish(gm)


def _dtype(model: Any) -> torch.dtype:
    for p in model.parameters():
        return p.dtype if p.is_floating_point() else torch.float32
    return torch.float32


def _fold_adaptive(gm: fx.GraphModule, node: fx.Node, pool: object, in_hw: tuple[int, ...],
                   out_hw: tuple[int, ...]) -> fx.Node:
    """Drop an identity adaptive pool, or replace it by the fixed pool equal to it."""
    assert hasattr(pool, "input") and hasattr(pool, "kind") and hasattr(pool, "name")
    kernels = [adaptive_as_fixed(i, o) for i, o in zip(in_hw, out_hw, strict=True)]
    if all(k == 1 for k in kernels):
        log.warning("dropped %r (Adaptive%sPool %s -> %s): the identity at the training size",
                    pool.name, pool.kind.title(), shape_str(in_hw), shape_str(out_hw))
        return pool.input  # type: ignore[no-any-return]
    if any(k is None for k in kernels):
        bad = next(i for i, k in enumerate(kernels) if k is None)
        sizes = sorted({e - s for s, e in adaptive_windows(in_hw[bad], out_hw[bad])})
        raise Fc2ConvError(
            f"Cannot convolutionalize {pool.name!r} (Adaptive{pool.kind.title()}Pool "
            f"{shape_str(in_hw)} -> {shape_str(out_hw)}): its windows have sizes "
            f"{' and '.join(map(str, sizes))} and overlap, so no fixed pool equals it on larger "
            f"inputs; choose an input_shape whose feature map is a multiple of "
            f"{shape_str(out_hw)}"
        )
    k: Any = tuple(int(x) for x in kernels)  # type: ignore[arg-type]
    pools = ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d) if pool.kind == "avg"
             else (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
    fixed: nn.Module = pools[len(k) - 1](k, k)
    mark(fixed, pool.name, f"Adaptive{pool.kind.title()}Pool {shape_str(in_hw)} -> "
                           f"{shape_str(out_hw)}")
    name = pool.name if node.op == "call_module" else unique_name(gm, f"{pool.name}_fixed")
    gm.add_submodule(name, fixed)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (pool.input,))
    new.meta = dict(node.meta)
    log.warning("replaced %r by %s (equal at the training size and exact on larger inputs)",
                pool.name, type(fixed).__name__)
    return new


def _swap(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str, arg: fx.Node) -> fx.Node:
    """Replace ``node`` by a call of ``module`` registered at ``name`` on ``arg``."""
    from fc2conv.pytorch.to_conv import replaceable

    target = name if node.op == "call_module" or replaceable(gm, name, {node}) \
        else unique_name(gm, name)
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (arg,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _head_linears(gm: fx.GraphModule, head: list[fx.Node]) -> dict[fx.Node, LinearOp]:
    """The head's Linear nodes, recognized before any is replaced (a Linear called twice in the
    head is converted at both calls). A Linear module also called outside the head is refused:
    replacing it would change what the other call computes."""
    ops = {n: op for n in head if (op := linear_of(gm, n)) is not None}
    inside = set(head)
    for node, op in ops.items():
        if node.op != "call_module":
            continue
        others = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target
                  and n not in inside]
        if others:
            raise Fc2ConvError(
                f"Cannot convolutionalize {op.name!r} ({describe(op.linear)}): the same layer is "
                f"also called outside the classifier head (at {others[0].name!r}); give the head "
                f"its own nn.Linear"
            )
    return ops


def _convert_layer(gm: fx.GraphModule, node: fx.Node, arg: fx.Node, first: bool,
                   fmap_shape: tuple[int, ...] | None, order: str,
                   ops: dict[fx.Node, LinearOp], dims: int = 2) -> fx.Node:
    """Rewrite one head node to act on ``(N, C, h, w)`` maps; return the new node."""
    if len(node.users) > 1:
        raise Fc2ConvError(
            f"Cannot convolutionalize {user_name(node)!r}: its output is also used by "
            f"{', '.join(u.name for u in node.users)}, outside the classifier head"
        )
    lin = ops.get(node)
    if lin is not None:
        try:
            if first and fmap_shape is not None:
                conv: nn.Module = flatten_linear_to_conv(lin.linear, fmap_shape, order,
                                                         source=lin.name)
            else:
                conv = linear_to_conv(lin.linear, dims, source=lin.name)
        except Fc2ConvError as err:
            raise wrap(f"Cannot convolutionalize {lin.name!r} ({describe(lin.linear)})",
                       err) from None
        log.info("%s (%s) -> %s", lin.name, describe(lin.linear), describe(conv))
        return _swap(gm, node, conv, lin.name, arg)
    mod = module_of(gm, node)
    if isinstance(mod, nn.BatchNorm1d):
        if first:
            raise Fc2ConvError(
                f"Cannot convolutionalize {node.target!r}: a BatchNorm1d over flattened "
                f"features normalizes each pixel separately, which no per-channel layer equals"
            )
        bn_class = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        bn = bn_class(mod.num_features, mod.eps, mod.momentum, mod.affine,
                            mod.track_running_stats)
        bn.load_state_dict(mod.state_dict())
        bn.train(mod.training)
        mark(bn, str(node.target), f"BatchNorm1d {mod.num_features}")
        return _swap(gm, node, bn, str(node.target), arg)
    soft = softmax_dim(gm, node)
    if soft is not None:
        dim, set_dim = soft
        if dim not in (1, -1):
            raise Fc2ConvError(
                f"Cannot convolutionalize {user_name(node)!r}: softmax over dim {dim}, not the "
                f"classes"
            )
        set_dim(1)
    elif _eval_dropout(node):
        pass  # the identity, in place or not: it reads and returns the head's value
    elif not is_pointwise(gm, node):
        raise Fc2ConvError(
            f"Cannot convolutionalize {user_name(node)!r} "
            f"({node.op} {getattr(node.target, '__name__', node.target)}): "
            f"only Linear, activations, dropout, BatchNorm1d and softmax are supported in the "
            f"classifier head"
        )
    node.replace_input_with(first_input(node), arg)
    return node


def _flat_head(gm: fx.GraphModule, start: fx.Node, fmap: fx.Node, head: list[fx.Node],
               order: str, ops: dict[fx.Node, LinearOp]) -> None:
    shape = tensor_shape(fmap)
    assert shape is not None
    fmap_shape = shape[1:]
    if not 2 <= len(fmap_shape) <= 4 or (order != "chw" and len(fmap_shape) != 3):
        raise Fc2ConvError(
            f"convolutionalize supports 1-D, 2-D and 3-D feature maps (channels-last only in "
            f"2-D); the flatten reads {shape_str(shape)}"
        )
    arg, first = fmap, True
    for node in head:
        is_lin = node in ops
        arg = _convert_layer(gm, node, arg, first, fmap_shape, order, ops, len(fmap_shape) - 1)
        first = first and not is_lin
    del start


def _global_head(gm: fx.GraphModule, start: fx.Node, fmap: fx.Node, pool_node: fx.Node | None,
                 head: list[fx.Node], global_pool: str, ops: dict[fx.Node, LinearOp]) -> None:
    """Global average pool + head: move the leading affine layers before the pool."""
    def affine(n: fx.Node) -> bool:
        return n in ops or isinstance(module_of(gm, n), _AFFINE) or _eval_dropout(n)

    if global_pool == "dense":
        _dense_head(gm, fmap, head, ops)
        return
    split = 0
    while split < len(head) and affine(head[split]):
        split += 1
    if global_pool == "drop" and split < len(head):
        raise Fc2ConvError(
            f"Cannot return the pre-pool map: {user_name(head[split])!r} is not affine, so it "
            f"does not commute with the global average pool; use global_pool='keep'"
        )
    arg = fmap
    spatial = tuple(range(2, len(tensor_shape(fmap) or (0, 0, 0, 0))))
    for node in head[:split]:
        arg = _convert_layer(gm, node, arg, False, None, "chw", ops, len(spatial))
    if global_pool == "drop":
        log.warning("dropped the global average pool: returning the map of scores per position")
        return
    with gm.graph.inserting_after(arg):
        pooled = gm.graph.call_method("mean", (arg, spatial), {"keepdim": True})
    for node in head[split:]:
        pooled = _convert_layer(gm, node, pooled, False, None, "chw", ops, len(spatial))
    if split == len(head):  # the pool is now the last op: the output reads it
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = fx.node.map_arg(out.args, lambda a: pooled if a is arg else a)
    del start, pool_node


def _dense_head(gm: fx.GraphModule, fmap: fx.Node, head: list[fx.Node],
                ops: dict[fx.Node, LinearOp]) -> None:
    """The global pool becomes ``AvgPool(S, stride=1)`` with ``S`` the training-size map; the
    head runs per position after it. At the training size the pool's one cell is the global
    mean, so the logits are unchanged; on a larger map cell ``p`` averages window ``p``."""
    shape = tensor_shape(fmap)
    assert shape is not None
    size = tuple(int(d) for d in shape[2:])
    dims = len(size)
    pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](size, stride=1)  # type: ignore[arg-type]
    mark(pool, "global average pool", f"global average pool over {shape_str(size)}")
    name = unique_name(gm, "global_pool_dense")
    gm.add_submodule(name, pool)
    with gm.graph.inserting_after(fmap):
        arg = gm.graph.call_module(name, (fmap,))
    for node in head:
        ln = _layer_norm_node(gm, node)
        if ln is not None:
            arg = _swap(gm, node, ln[0], ln[1], arg)
            continue
        arg = _convert_layer(gm, node, arg, False, None, "chw", ops, dims)
    log.warning("the global average pool over %s became a stride-1 average pool of %s: each "
                "cell of a larger image's map is the classifier on its window",
                shape_str(size), shape_str(size))


def _layer_norm_node(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str] | None:
    """A LayerNorm over the features of the pooled vector -> the same LayerNorm over the
    channels of each position (:class:`~fc2conv.pytorch.layout.ChannelLayerNorm`)."""
    from fc2conv.pytorch.to_conv import _layer_norm_of

    found = _layer_norm_of(gm, node)
    if found is None:
        return None
    _, new, name = found
    mark(new, name, f"LayerNorm {new.channels}")  # type: ignore[attr-defined]
    return new, name
