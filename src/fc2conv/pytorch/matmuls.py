"""Every product with a stored weight, written as one Linear form before the passes run.

A dense layer reaches a graph in many spellings. With ``W`` a stored 2-D tensor (a parameter
or buffer read by ``get_attr``):

- ``linear(x, W, b)`` / ``x @ W.T`` / ``mm(x, t(W))`` / ``addmm(b, x, t(W))``: ``W`` is stored
  ``(out, in)``, as by ``nn.Linear``; rewritten to ``aten.linear(x, W, b)``.
- ``x @ W`` / ``mm(x, W)`` / ``addmm(b, x, W)``: ``W`` is stored ``(in, out)``, as by GPT-2's
  ``Conv1D`` (``addmm(b, x.view(-1, nx), W)``); rewritten to :func:`linear_in_out` ``(x, W, b)
  = x @ W + b``, which :func:`fc2conv.pytorch.ops.linear_of` reads as the Linear ``W.T``.

Both compute ``y[..., o] = sum_c x[..., c] W'[o, c] + b[o]`` over the last axis of ``x``.
When ``addmm`` reads ``x.view(-1, C)`` of a higher-rank ``x`` and only views read its result,
the rewrite reads ``x`` itself (flattening the leading axes commutes with a per-row map), so
the layer joins its neighbours in the conv layout. A product with a stored weight that stays
(``W @ x``, a 3-D weight, ``addmm`` with ``alpha``/``beta`` other than 1, a bias that is not
stored) is named in a warning with its reason.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from fc2conv.pytorch.ops import attr_of, linear_in_out, tensor_shape, user_name

log = logging.getLogger(__name__)
aten = torch.ops.aten


_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.mm, aten.matmul.default, aten.mm.default}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
_ADDMM = {torch.addmm, aten.addmm.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_OTHER_PRODUCTS = {torch.einsum, aten.einsum.default, torch.bmm, aten.bmm.default,
                   torch.baddbmm, aten.baddbmm.default, torch.tensordot, torch.bilinear,
                   F.bilinear}


_TRANSPOSES = {aten.t.default, torch.t, aten.numpy_T.default, aten.mT.default,
               aten.adjoint.default}


def _is_reshape(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in _RESHAPES)
        or (node.op == "call_method" and node.target in ("view", "reshape")))


def _transposed_attr(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The ``get_attr`` node of a stored 2-D ``W`` when ``node`` is ``W.T`` (``t``,
    ``transpose(0, 1)``, ``permute(1, 0)``, ``.T``/``.mT``), else ``None``."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    src = node.args[0]
    tensor = attr_of(gm, src)
    if tensor is None or tensor.dim() != 2:
        return None
    target, rest = node.target, list[Any](node.args[1:])
    is_t = (target in _TRANSPOSES or (node.op == "call_method" and target == "t")
            or (target is getattr and rest in (["T"], ["mT"]))
            or ((target in (aten.transpose.int, torch.transpose)
                 or (node.op == "call_method" and target == "transpose"))
                and sorted(int(d) % 2 for d in rest) == [0, 1])
            or ((target is aten.permute.default or (node.op == "call_method"
                                                    and target == "permute"))
                and [int(d) % 2 for d in (rest[0] if len(rest) == 1 else rest)] == [1, 0]))
    return src if is_t else None  # type: ignore[return-value]


def _stored_2d(gm: fx.GraphModule, node: Any) -> bool:
    tensor = attr_of(gm, node)
    return tensor is not None and tensor.dim() == 2


def _flattened_source(node: Any) -> Any:
    """``x`` when ``node`` is ``x.view(-1, C)`` of a higher-rank ``x`` (leading axes
    flattened), else ``node``."""
    if not _is_reshape(node):
        return node
    src = node.args[0]
    shape, flat = tensor_shape(src), tensor_shape(node)
    if shape is None or flat is None or len(shape) < 3 or len(flat) != 2:
        return node
    lead = 1
    for s in shape[:-1]:
        lead *= s
    return src if flat == (lead, shape[-1]) else node


def _product(node: fx.Node) -> tuple[Any, Any, Any, dict[str, Any]] | None:
    """``(x, w, bias, extra kwargs)`` for a matmul/mm/addmm node, else ``None``."""
    if node.op == "call_function" and node.target in _ADDMM:
        if len(node.args) < 3:
            return None
        return node.args[1], node.args[2], node.args[0], dict(node.kwargs)
    if (node.op == "call_function" and node.target in _MATMUL_FUNCS) or (
            node.op == "call_method" and node.target in _MATMUL_METHODS):
        if len(node.args) < 2:
            return None
        return node.args[0], node.args[1], None, dict(node.kwargs)
    return None


def normalize_matmuls(gm: fx.GraphModule) -> int:
    """Rewrite every stored-weight product of ``gm`` into ``aten.linear`` or
    :func:`linear_in_out` (see the module docstring); warn, by the module's qualified name, for
    each one that stays and why. Returns how many nodes were rewritten (shapes must then be
    recorded again)."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (F.linear, aten.linear.default) \
                and len(node.args) > 1 and _transposed_attr(gm, node.args[1]) is not None:
            w_src = _transposed_attr(gm, node.args[1])
            with gm.graph.inserting_before(node):  # F.linear(x, W.T, b) = x @ W + b
                new = gm.graph.call_function(linear_in_out, (node.args[0], w_src,
                                                             *node.args[2:3]), node.kwargs)
            new.meta = {k: v for k, v in node.meta.items()
                        if k in ("nn_module_stack", "stack_trace")}
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed += 1
            continue
        found = _product(node)
        if found is None:
            if node.op == "call_function" and node.target in _OTHER_PRODUCTS and any(
                    attr_of(gm, a) is not None for a in node.all_input_nodes):
                _stays(node, f"{getattr(node.target, '__name__', node.target)} with a stored "
                       f"tensor is not a per-position linear map fc2conv recognizes")
            continue
        x, w, bias, extra = found
        if attr_of(gm, x) is not None or _transposed_attr(gm, x) is not None:
            if not (_stored_2d(gm, w) or _transposed_attr(gm, w) is not None):
                _stays(node, "the stored weight multiplies from the left (W @ x), which "
                       "contracts the input's second-to-last axis, not its features")
            continue  # a product of two stored tensors is weight algebra, not a layer
        w_plain = _stored_2d(gm, w)
        w_t = _transposed_attr(gm, w)
        if not w_plain and w_t is None:
            stored = attr_of(gm, w)
            if stored is not None:
                _stays(node, f"its stored weight has {stored.dim()} axes, not 2")
            continue
        if any(extra.get(k, 1) != 1 for k in ("alpha", "beta")):
            _stays(node, "addmm scales with alpha/beta other than 1")
            continue
        if bias is not None:
            b = attr_of(gm, bias)
            out = (attr_of(gm, w_t) if w_t is not None else attr_of(gm, w)).shape  # type: ignore[union-attr]
            n_out = out[0] if w_t is not None else out[1]
            if b is None or b.dim() != 1 or b.shape[0] != n_out:
                _stays(node, "its bias is not a stored vector of the output size")
                continue
        source, flat = x, _flattened_source(x)
        if flat is not x and node.users and all(_is_reshape(u) for u in node.users):
            source = flat
        args: tuple[Any, ...] = (source, w_t if w_t is not None else w)
        if bias is not None:
            args += (bias,)
        target: Any = aten.linear.default if w_t is not None else linear_in_out
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(target, args)
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _stays(node: fx.Node, reason: str) -> None:
    log.warning("%r (%s) stays unconverted: %s", user_name(node), node.name, reason)
