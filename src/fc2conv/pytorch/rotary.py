"""Rotary position embeddings and grouped K/V heads in the conv layout ``(B, C, 1, S)``.

Llama (and Mistral, Qwen2: the same code) rotate Q and K between the head split and SDPA, and
repeat each K/V head for a group of query heads::

    q' = q * cos + rotate_half(q) * sin        q: (B, H, S, D), cos/sin: (B', 1, S, D)
    rotate_half(q) = cat(-q[..., D/2:], q[..., :D/2])
    repeat_kv(k)   = k[:, :, None].expand(B, Hkv, r, S, D).reshape(B, Hkv * r, S, D)

In ``(B, C, 1, S)`` head ``h`` owns channels ``hD .. hD + D - 1``, so the ``(B, H, D, S)`` view
of a conv output is free, and per head (:func:`channel_rotary`)::

    q'[b, h, d, s] = q[b, h, d, s] * cosT[b', 0, d, s] + rot[b, h, d, s] * sinT[b', 0, d, s]
    rot[:, :, d] = -q[:, :, d + D/2] (d < D/2),  q[:, :, d - D/2] (d >= D/2)

a per-head channel permutation with sign, and ``cosT``/``sinT`` are the model's own tables
moved once (:func:`rotary_table`: ``(B', S, D) -> (B', 1, D, S)``, positions by head
dimension, shared by every layer; not an activation). Each product and the sum are the same
float operations as in the model, so the rotation is bit-identical. ``repeat_kv`` needs no copy
at all: :func:`fc2conv.pytorch.attention.channel_attention` takes ``kv_heads`` and contracts
each group of ``r`` query heads with its K/V head (a grouped einsum).

This module only recognizes the patterns (:func:`head_source`); the attention pass builds the
replacement.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fc2conv.pytorch.ops import tensor_shape

_RESHAPES = {"view", "reshape", "_unsafe_view"}
_NOOPS = {"contiguous", "clone", "alias"}


def rotary_table(t: torch.Tensor) -> torch.Tensor:
    """A rotary ``cos``/``sin`` table in the conv layout: ``(B', S, D)`` or ``(B', 1, S, D)``
    -> ``(B', 1, D, S)``, which broadcasts against the ``(B, H, D, S)`` head view."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.transpose(-1, -2).contiguous()


rotary_table.fc2conv_layout_table = True  # type: ignore[attr-defined]  # listed by layout_changes


def channel_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
                   ) -> torch.Tensor:
    """Rotate ``x`` (``(B, C, 1, S)``, ``heads`` heads along ``C``) by the tables of
    :func:`rotary_table`: ``x * cos + rotate_half(x) * sin`` per head (module docstring)."""
    b, c, _, s = x.shape
    d = c // heads
    xh = x.reshape(b, heads, d, s)
    half = d // 2
    rot = torch.cat((-xh[:, :, half:], xh[:, :, :half]), dim=2)
    return (xh * cos + rot * sin).reshape(b, c, 1, s)


def position_table(t: torch.Tensor) -> torch.Tensor:
    """The way back from :func:`rotary_table`'s input: ``(B', S, D) -> (B', 1, S, D)``, the
    table as Llama broadcasts it against ``(B, H, S, D)`` (a 4-d table stays)."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def head_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's ``x * cos + rotate_half(x) * sin`` on ``(B, H, S, D)`` heads (the way back
    from :func:`channel_rotary`; the same float operations)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def name_of(node: Any) -> str:
    """The op name of an fx node (``aten.slice.Tensor`` -> ``slice``, a method's name)."""
    if not isinstance(node, fx.Node):
        return ""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        target: Any = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target._opname  # type: ignore[no-any-return]
        return getattr(target, "__name__", "")
    return ""


def skip_noops(node: Any) -> Any:
    """Walk up through ops that give back their input: ``contiguous``/``clone``, a reshape
    or a slice that keeps the shape (a full slice ``x[:, 0:]``) and dtype."""
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        name, src = name_of(node), node.args[0]
        same = tensor_shape(node) == tensor_shape(src) and _dtype(node) == _dtype(src)
        if not (same and (name in _NOOPS or name in _RESHAPES or _full_slice(node))):
            break
        node = src
    return node


def _dtype(node: fx.Node) -> Any:
    val = node.meta.get("val")
    meta = node.meta.get("tensor_meta")
    return getattr(val, "dtype", None) or getattr(meta, "dtype", None)


def _full_slice(node: fx.Node) -> bool:
    """``slice(x, dim, start, end, step)`` with step 1 (same shape then means all of it)."""
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    return name_of(node) == "slice" and step in (1, None)


def _slice_last(node: Any, rank: int) -> tuple[fx.Node, int, int] | None:
    """``slice(x, -1, start, end)`` (or ``x[..., start:end]``) of a rank-``rank`` ``x``:
    ``(x, start, end)`` (ends clipped to the axis length)."""
    if name_of(node) == "getitem":
        return _getitem_last(node, rank)
    if name_of(node) != "slice" or not _full_slice(node):
        return None
    x = node.args[0]
    shape = tensor_shape(x)
    args = list(node.args) + [None] * 4
    dim, start, end = args[1] or 0, args[2] or 0, args[3]
    if shape is None or len(shape) != rank or int(dim) % rank != rank - 1 \
            or not isinstance(start, int) or not isinstance(end, int | None):
        return None
    n = shape[-1]
    end = n if end is None or end > n else end
    return x, start, end  # type: ignore[return-value]


def _getitem_last(node: fx.Node, rank: int) -> tuple[fx.Node, int, int] | None:
    """``x[..., a:b]`` or ``x[:, :, :, a:b]`` with integer bounds: ``(x, a, b)``."""
    x, index = node.args[0], node.args[1]
    shape = tensor_shape(x)
    if not isinstance(x, fx.Node) or shape is None or len(shape) != rank \
            or not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    full = slice(None)
    if index[:-1] not in ((Ellipsis,), (full,) * (rank - 1)):
        return None
    last: slice = index[-1]
    n = shape[-1]
    lo, hi = (None if v is None else _static_int(v) for v in (last.start, last.stop))
    if last.step not in (None, 1) or (last.start is not None and lo is None) \
            or (last.stop is not None and hi is None):
        return None
    start, end = (lo or 0), (n if hi is None or hi > n else hi)
    return (x, start, end) if start >= 0 and end >= 0 else None


def _static_int(v: Any) -> int | None:
    """An int, or a traced ``t.shape[i]`` / ``t.size(i)`` of a recorded shape, or ``a // k``
    of such (``x.shape[-1] // 2``, the half of a head's width, fixed by the weights)."""
    if isinstance(v, int):
        return v
    if not isinstance(v, fx.Node) or v.op not in ("call_function", "call_method"):
        return None
    if v.target is operator.floordiv and len(v.args) == 2:
        a, b = (_static_int(x) for x in v.args)
        return a // b if a is not None and b else None
    if v.target is operator.getitem and len(v.args) == 2 and isinstance(v.args[1], int):
        src = v.args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr \
                and src.args[1:] == ("shape",):
            shape = tensor_shape(src.args[0])
            return shape[v.args[1]] if shape is not None else None
    if v.op == "call_method" and v.target == "size" and len(v.args) == 2 \
            and isinstance(v.args[1], int):
        shape = tensor_shape(v.args[0])
        return shape[v.args[1]] if shape is not None else None
    return None


def _rotate_half_source(node: Any) -> fx.Node | None:
    """``cat([neg(x[..., D/2:]), x[..., :D/2]], -1)`` of a ``(B, H, S, D)`` ``x``: that ``x``."""
    if name_of(node) != "cat" or len(node.args) < 1:
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, list | tuple) or len(parts) != 2 or int(dim) % 4 != 3:
        return None
    neg, low = parts
    if name_of(neg) != "neg":
        return None
    high = _slice_last(neg.args[0], 4)
    first = _slice_last(low, 4)
    if high is None or first is None or high[0] is not first[0]:
        return None
    x, d = high[0], (tensor_shape(high[0]) or (0,))[-1]
    if d % 2 or high[1:] != (d // 2, d) or first[1:] != (0, d // 2):
        return None
    return x


def _table_ok(table: Any, x: fx.Node) -> bool:
    """A ``(B', 1, S, D)`` table broadcasting against ``x`` ``(B, H, S, D)`` per position."""
    t, s = tensor_shape(table), tensor_shape(x)
    return t is not None and s is not None and len(t) == 4 and t[1] == 1 \
        and t[2:] == s[2:] and t[0] in (1, s[0])


def _rotary_parts(node: Any) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``x * cos + rotate_half(x) * sin`` (operands in either order): ``(x, cos, sin)``."""
    if name_of(node) != "add" or len(node.args) != 2 or node.kwargs:
        return None
    terms = [a for a in node.args if name_of(a) == "mul" and len(a.args) == 2]
    if len(terms) != 2:
        return None
    for plain, rotated in (terms, terms[::-1]):
        for x, cos in (plain.args, plain.args[::-1]):
            for rot, sin in (rotated.args, rotated.args[::-1]):
                if isinstance(x, fx.Node) and _rotate_half_source(rot) is x \
                        and _table_ok(cos, x) and _table_ok(sin, x):
                    return x, cos, sin
    return None


def _repeat_kv(node: Any) -> tuple[fx.Node, int] | None:
    """``x[:, :, None].expand(B, Hkv, r, S, D).reshape(B, Hkv * r, S, D)``: ``(x, r)``."""
    if name_of(node) not in _RESHAPES:
        return None
    expand = skip_noops(node.args[0])
    shape = tensor_shape(expand)
    if name_of(expand) != "expand" or shape is None or len(shape) != 5:
        return None
    unsq = skip_noops(expand.args[0])
    if name_of(unsq) != "unsqueeze" or int(unsq.args[1]) % 5 != 2:
        return None
    x = skip_noops(unsq.args[0])
    xs, out = tensor_shape(x), tensor_shape(node)
    b, hkv, r, s, d = shape
    if xs != (b, hkv, s, d) or out != (b, hkv * r, s, d):
        return None
    return x, r


@dataclass(frozen=True)
class HeadSource:
    """Where an SDPA operand ``(B, H, S, D)`` comes from: ``split`` is its head split (a
    ``(B, H, S, D)`` node), ``rotary`` the ``(cos, sin)`` tables applied after it, ``repeat``
    the grouped-K/V repeat factor applied last (1: none)."""

    split: fx.Node
    rotary: tuple[fx.Node, fx.Node] | None
    repeat: int


def head_source(node: Any) -> HeadSource | None:
    """Read an SDPA operand back through ``repeat_kv`` and a rotary embedding (each optional,
    in that order) to the value they act on."""
    node = skip_noops(node)
    repeat = 1
    found = _repeat_kv(node)
    if found is not None:
        node, repeat = skip_noops(found[0]), found[1]
    rotary = None
    parts = _rotary_parts(node)
    if parts is not None:
        node, rotary = skip_noops(parts[0]), (parts[1], parts[2])
    return HeadSource(node, rotary, repeat) if isinstance(node, fx.Node) else None


def table_root(table: fx.Node) -> fx.Node:
    """The ``(B', S, D)`` value a ``(B', 1, S, D)`` table was unsqueezed from (each layer
    unsqueezes the shared table anew), so one :func:`rotary_table` serves every layer."""
    node = skip_noops(table)
    if name_of(node) == "unsqueeze" and int(node.args[1]) % 4 == 1:
        src = node.args[0]
        if isinstance(src, fx.Node) and len(tensor_shape(src) or ()) == 3:
            return src
    return table
