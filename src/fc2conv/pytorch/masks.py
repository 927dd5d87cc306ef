"""Attention masks that keep every score, proven for every input size, are dropped.

transformers builds an SDPA mask from index arithmetic (``masking_utils.sdpa_mask``): a
bidirectional model with no padding (ViT, the Whisper encoder, a text encoder called without
``attention_mask``) gets ``q_idx >= 0`` over ``q_idx = arange(S) + 0``, expanded to
``(B, 1, S, S)``. Eager PyTorch skips that mask (``mask is None``: it checks the values, which
``torch.export`` cannot), so the captured graph builds a mask the original never builds, and
SDPA then pays for it on every call: the boolean mask becomes an additive one
(``where(M, 0, -inf)``, one pass over ``(B, H, S, S)``) and the kernel adds it to the scores.

The math. SDPA with a boolean mask ``M`` computes
``softmax(scale * Q K^T + where(M, 0, -inf)) V``. Where ``M`` is True everywhere the added term
is ``+0.0`` at every score, and ``s + 0.0 == s`` for every float ``s`` (``-0.0 + 0.0`` is
``+0.0``, and ``exp`` gives 1 for both), so ``SDPA(attn_mask=M) == SDPA(attn_mask=None)``: the
model computes the same function, without the mask's two passes.

The proof that ``M`` is all True, for every size the model accepts (never a look at one
example's values): interval arithmetic over the integer values that feed it. Sizes
(``sym_size``, ``size``, ``shape``) lie in ``[0, inf)``; ``arange(start, end, step > 0)`` in
``[start, end)``; ``add``/``sub`` add the intervals; reshapes, expands, slices and selections
keep them, and a cast to an integer type widens them to whole numbers. ``x >= c`` is all True
when ``lo(x) >= hi(c)`` (``>``, ``<=``, ``<`` alike); ``&`` of all-True masks is all True,
``|`` with one is; ``ones``/``full(True)`` of bool dtype are. Anything else is unknown, and
the mask stays.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import fx

from fc2conv.pytorch.rotary import name_of

log = logging.getLogger(__name__)

Bounds = tuple[float, float]  # lo, hi; -inf / inf where unknown

_SDPA = {torch.nn.functional.scaled_dot_product_attention,
         torch.ops.aten.scaled_dot_product_attention.default}
# ops whose output values are some of their first operand's values (or all of them)
_SUBSET = {"unsqueeze", "squeeze", "expand", "expand_as", "view", "reshape", "_unsafe_view",
           "permute", "transpose", "t", "clone", "contiguous", "alias", "slice", "select",
           "narrow", "flatten", "unflatten", "repeat", "movedim", "__getitem__", "getitem",
           "index", "index_select", "gather", "detach", "lift_fresh_copy"}
_CASTS = {"to", "_to_copy", "type", "long", "int"}
_SIZES = {"sym_size", "size", "sym_numel", "numel"}
_UNKNOWN: Bounds = (-math.inf, math.inf)
# comparison op -> the condition on (lo_x, hi_x, lo_y, hi_y) under which x op y holds everywhere
_COMPARE = {
    "ge": lambda lx, hx, ly, hy: lx >= hy, "gt": lambda lx, hx, ly, hy: lx > hy,
    "le": lambda lx, hx, ly, hy: hx <= ly, "lt": lambda lx, hx, ly, hy: hx < ly,
}
_AND = {"bitwise_and", "logical_and", "and_", "__and__", "mul"}
_OR = {"bitwise_or", "logical_or", "or_", "__or__"}


def bounds(value: Any, depth: int = 0) -> Bounds:
    """``(lo, hi)`` with ``lo <= v <= hi`` for every element ``v`` of ``value`` and every input
    size (``(-inf, inf)`` when not proven)."""
    if isinstance(value, bool):
        return _UNKNOWN
    if isinstance(value, int | float):
        return float(value), float(value)
    if not isinstance(value, fx.Node) or depth > 64:
        return _UNKNOWN
    name = name_of(value)
    args = list(value.args)
    if name in _SIZES or (name == "getattr" and args[1:2] == ["shape"]):
        return 0.0, math.inf
    if name == "arange":
        return _arange(args, dict(value.kwargs), depth)
    if name in ("add", "sub") and len(args) == 2 and value.kwargs.get("alpha", 1) == 1:
        (lx, hx), (ly, hy) = (bounds(a, depth + 1) for a in args)
        return (lx + ly, hx + hy) if name == "add" else (lx - hy, hx - ly)
    if name in _SUBSET and args:
        return bounds(args[0], depth + 1)
    if name in _CASTS and args and _keeps_integers(value):  # truncation stays in these
        lo, hi = bounds(args[0], depth + 1)
        return math.floor(lo) if math.isfinite(lo) else lo, \
            math.ceil(hi) if math.isfinite(hi) else hi
    return _UNKNOWN


def _arange(args: list[Any], kw: dict[str, Any], depth: int) -> Bounds:
    """``arange(end)``, ``arange(start, end)``, ``arange(start, end, step)``: values in
    ``[start, end)`` for ``step > 0``, ``(end, start]`` for ``step < 0``."""
    nums = args[:3]
    start, end = (0, nums[0]) if len(nums) == 1 else (nums[0], nums[1]) if len(nums) >= 2 \
        else (kw.get("start", 0), kw.get("end"))
    step = nums[2] if len(nums) == 3 else kw.get("step", 1)
    if isinstance(step, bool) or not isinstance(step, int | float) or step == 0 or end is None:
        return _UNKNOWN
    (ls, hs), (le, he) = bounds(start, depth + 1), bounds(end, depth + 1)
    return (ls, he) if step > 0 else (le, hs)


def _keeps_integers(node: fx.Node) -> bool:
    """A cast whose recorded output is an integer tensor (a cast to bool or float is not
    followed)."""
    meta = node.meta.get("tensor_meta") or node.meta.get("val")
    dtype = getattr(meta, "dtype", None)
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex \
        and dtype != torch.bool


def all_true(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a boolean tensor that is True everywhere, for every input size
    (see the module docstring for the rules)."""
    if not isinstance(value, fx.Node) or depth > 64:
        return False
    name = name_of(value)
    args = list(value.args)
    if name in _COMPARE and len(args) == 2:
        (lx, hx), (ly, hy) = (bounds(a, depth + 1) for a in args)
        return bool(_COMPARE[name](lx, hx, ly, hy))
    if name in _AND and len(args) == 2:
        return all(all_true(a, depth + 1) for a in args)
    if name in _OR and len(args) == 2:
        return any(all_true(a, depth + 1) for a in args)
    if name in _SUBSET and args:
        return all_true(args[0], depth + 1)
    if name in ("ones", "new_ones", "ones_like", "full", "new_full", "full_like"):
        fill = args[-1] if name.startswith(("full", "new_full")) and len(args) >= 2 \
            else value.kwargs.get("fill_value", True)
        return value.kwargs.get("dtype") is torch.bool and bool(fill)
    return False


def drop_true_masks(gm: fx.GraphModule) -> int:
    """Set the mask of every ``scaled_dot_product_attention`` whose boolean mask is proven True
    everywhere (:func:`all_true`) to ``None``, and erase what only the mask read; returns how
    many masks were dropped. The caller lints and recompiles."""
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        in_kwargs = "attn_mask" in node.kwargs
        mask = node.kwargs["attn_mask"] if in_kwargs else \
            node.args[3] if len(node.args) > 3 else None
        if mask is None or not all_true(mask):
            continue
        if in_kwargs:
            node.kwargs = {**node.kwargs, "attn_mask": None}
        else:
            node.args = (*node.args[:3], None, *node.args[4:])
        log.info("attention %r: its mask %r is True everywhere, dropped (as eager PyTorch "
                 "skips it)", node.name, mask.name)
        _erase_unread(graph, mask)
        done += 1
    return done


def _erase_unread(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` when nothing reads it, then whatever only it read (pure ops only)."""
    todo = [node]
    while todo:
        cur = todo.pop()
        if cur.users or cur.op not in ("call_function", "call_method") or cur.is_impure():
            continue
        todo.extend(cur.all_input_nodes)
        graph.erase_node(cur)
