"""Receptive fields of fully convolutional models, from exact layer arithmetic over the graph.

Walks the fx graph in order, carrying per value one :class:`~fc2conv.core.receptive.AxisField`
per spatial axis (see :mod:`fc2conv.core.receptive` for the arithmetic). Convs and pools
compose; per-position ops (activations, batch norm, dropout, 1x1 convs) pass the field on;
residual adds and concatenations take the union of aligned branches (same jump) and refuse
branches that do not align. Padding anywhere, or a ``ceil_mode`` pool whose last window hangs
over the training-size map, means dense cells are not the classifier on their window: zero
padding at a crop's border is not padding inside a large image.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fc2conv.core.describe import shape_str
from fc2conv.core.receptive import (
    AxisField,
    ReceptiveField,
    adaptive_as_fixed,
    has_partial_window,
)
from fc2conv.core.shapes import as_shape
from fc2conv.errors import Fc2ConvError
from fc2conv.pytorch.layout import ChannelLayerNorm, is_move
from fc2conv.pytorch.ops import (
    adaptive_of,
    is_pointwise,
    linear_of,
    main_output,
    module_of,
    softmax_dim,
    tensor_shape,
    user_name,
    window_of,
)
from fc2conv.pytorch.trace import check_model, record_shapes, to_graph

log = logging.getLogger(__name__)

_PER_POSITION = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, ChannelLayerNorm, nn.Identity)
_CONCAT = {torch.cat, torch.concat, torch.ops.aten.cat.default}


class NotConvolutional(Fc2ConvError):
    """The model flattens its feature map (a classifier not yet convolutionalized)."""


def _dense(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """``model`` itself when fully convolutional, else ``convolutionalize(model, input_shape)``."""
    try:
        _field(model, input_shape)
        return model
    except NotConvolutional:
        from fc2conv.pytorch.convolutionalize import convolutionalize

        log.info("%s is not fully convolutional: convolutionalizing it first",
                 type(model).__name__)
        return convolutionalize(model, input_shape)


def _field(model: nn.Module, input_shape: Sequence[int]) -> tuple[
        tuple[AxisField, ...], tuple[int, ...], tuple[int, ...], list[str]]:
    """(field per axis of the output, input spatial size, output spatial size, inexact reasons)."""
    check_model(model)
    shape = as_shape(input_shape, min_len=2, max_len=4)
    example = torch.randn(1, *shape)
    for p in model.parameters():
        example = example.to(p.dtype if p.is_floating_point() else torch.float32)
        break
    gm = to_graph(model, (example,))
    record_shapes(gm, (example,))
    n_axes = len(shape) - 1
    fields: dict[fx.Node, tuple[AxisField, ...]] = {}
    reasons: list[str] = []
    out_node: fx.Node | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            fields[node] = (AxisField(),) * n_axes
            continue
        if node.op == "output":
            value = node.args[0]
            while isinstance(value, (tuple, list)) and len(value) == 1:
                value = value[0]
            out_node = value if isinstance(value, fx.Node) else None
            continue
        operands = [a for a in node.all_input_nodes if a in fields]
        if not operands:
            continue  # constants, weights
        if tensor_shape(node) is None:  # not a tensor: a shape query, or a tuple of results
            if _is_batch_norm(node) or (node.op == "call_function"
                                        and node.target is operator.getitem):
                fields[node] = fields[operands[0]]
            elif not _is_shape_query(node):
                raise Fc2ConvError(
                    f"{user_name(node)!r} ({getattr(node.target, '__name__', node.target)}) "
                    f"is not a convolution, pooling or per-position op, so fc2conv cannot say "
                    f"which input window its cells see"
                )
            continue
        fields[node] = _through(gm, node, operands, fields, reasons, n_axes)
    if out_node is None or out_node not in fields:
        raise Fc2ConvError("the model must return one tensor computed from its input")
    out_shape = tensor_shape(out_node)
    assert out_shape is not None
    return fields[out_node], shape[1:], out_shape[2:], reasons


def _is_batch_norm(node: fx.Node) -> bool:
    """aten's batch norm ops (per channel, per position), whatever their variant."""
    return node.op == "call_function" and "batch_norm" in getattr(node.target, "__name__", "")


def _is_shape_query(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in ("size", "dim", "getattr", "sym_size", "sym_size.int", "numel")


def _through(gm: fx.GraphModule, node: fx.Node, operands: list[fx.Node],
             fields: dict[fx.Node, tuple[AxisField, ...]], reasons: list[str],
             n_axes: int) -> tuple[AxisField, ...]:
    name = user_name(node)
    win = window_of(gm, node)
    if win is not None:
        src = fields[win.input]
        in_shape = tensor_shape(win.input) or ()
        if any(p for p in win.padding):
            reasons.append(f"{name!r} pads by {shape_str(win.padding)}")
        if win.ceil_mode and any(
                has_partial_window(n, k, s, p, d, True) for n, k, s, p, d in
                zip(in_shape[2:], win.kernel, win.stride, win.padding, win.dilation, strict=True)):
            reasons.append(f"{name!r} (ceil_mode) has a partial last window at the training size")
        return tuple(f.through(k, s, p, d) for f, k, s, p, d in
                     zip(src, win.kernel, win.stride, win.padding, win.dilation, strict=True))
    pool = adaptive_of(gm, node)
    if pool is not None:
        in_hw = (tensor_shape(pool.input) or ())[2:]
        out_hw = (tensor_shape(node) or ())[2:]
        kernels = [adaptive_as_fixed(i, o) for i, o in zip(in_hw, out_hw, strict=True)]
        if any(k is None for k in kernels):
            raise Fc2ConvError(
                f"{name!r} (adaptive pooling {shape_str(in_hw)} -> {shape_str(out_hw)}) has "
                f"windows of varying size, so its output cells have no fixed receptive field"
            )
        return tuple(f.through(int(k), int(k)) for f, k in zip(fields[pool.input], kernels,  # type: ignore[arg-type]
                                                               strict=True))
    if node.op in ("call_method", "call_function") and getattr(
            node.target, "__name__", node.target) in ("mean", "amax", "sum", "dim"):
        out_sp = (tensor_shape(node) or ())[2:]
        if all(s == 1 for s in out_sp) or len(tensor_shape(node) or ()) <= 2:
            raise Fc2ConvError(
                f"{name!r} pools over all positions (global pooling), so every output depends "
                f"on the whole input and there is no per-cell window; convolutionalize with "
                f"global_pool='drop' for a dense map"
            )
    if is_move(node):
        raise Fc2ConvError(
            "the model moves activations between the Linear and conv layouts (it came from "
            "to_conv); receptive fields describe image models, whose positions are pixels"
        )
    mod = module_of(gm, node)
    lin = linear_of(gm, node)
    if lin is not None or isinstance(mod, nn.Flatten) or (
            node.op in ("call_function", "call_method")
            # aten overloads read "flatten.using_ints", "view.default": the op is the first part
            and str(getattr(node.target, "__name__", node.target)).split(".")[0]
            in ("flatten", "view", "reshape", "_unsafe_view")):
        raise NotConvolutional(
            f"{name!r} flattens or mixes all positions, so the model is not fully "
            f"convolutional; run fc2conv.convolutionalize(model, input_shape) first"
        )
    same_rank = all(len(tensor_shape(a) or ()) == len(tensor_shape(node) or ()) for a in operands)
    elementwise = is_pointwise(gm, node) or isinstance(mod, _PER_POSITION) or _is_batch_norm(
        node) or (
        softmax_dim(gm, node) is not None and softmax_dim(gm, node)[0] == 1)  # type: ignore[index]
    if node.op == "call_function" and node.target in (operator.add, operator.mul, torch.add,
                                                      torch.ops.aten.add.Tensor,
                                                      torch.ops.aten.mul.Tensor) and same_rank:
        out_sp = (tensor_shape(node) or ())[2:]
        if all((tensor_shape(a) or ())[2:] == out_sp for a in operands):
            elementwise = True
    if node.op == "call_function" and node.target in _CONCAT:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        elementwise = dim == 1
    if not elementwise or not same_rank:
        raise Fc2ConvError(
            f"{name!r} ({getattr(node.target, '__name__', node.target)}) is not a convolution, "
            f"pooling or per-position op, so fc2conv cannot say which input window its cells see"
        )
    result = fields[operands[0]]
    for other in operands[1:]:
        try:
            result = tuple(a.union(b) for a, b in zip(result, fields[other], strict=True))
        except Fc2ConvError as err:
            raise Fc2ConvError(f"Cannot compute the receptive field at {name!r}: {err}") from None
    return result


def receptive_field(model: nn.Module, input_shape: Sequence[int]) -> ReceptiveField:
    """The receptive field of a fully convolutional ``model`` (e.g. from
    :func:`fc2conv.convolutionalize`) on ``(N, *input_shape)`` inputs.

    ``size``/``stride``/``padding`` per spatial axis come from exact layer arithmetic.
    When the output is ``1x1`` at ``input_shape`` (a convolutionalized classifier),
    ``window(i, j)`` is the ``input_shape``-sized crop that cell ``(i, j)`` of a dense map
    classifies: ``(i * stride, j * stride, i * stride + H, j * stride + W)``; otherwise it is
    the cell's receptive field itself. A classifier that still flattens its features is
    convolutionalized first (:func:`fc2conv.convolutionalize`).
    """
    try:
        fields, in_size, out_size, reasons = _field(model, input_shape)
    except NotConvolutional:
        fields, in_size, out_size, reasons = _field(_dense(model, input_shape), input_shape)
    one_cell = all(s == 1 for s in out_size)
    return ReceptiveField(
        size=tuple(f.size for f in fields),
        stride=tuple(f.jump for f in fields),
        padding=tuple(-f.start for f in fields),
        input_size=in_size,
        output_size=out_size,
        window_size=in_size if one_cell else tuple(f.size for f in fields),
        window_offset=(0,) * len(fields) if one_cell else tuple(f.start for f in fields),
        exact=not reasons,
        reason="; ".join(reasons) if reasons else None,
    )


@dataclass(frozen=True)
class WindowCheck:
    """Measured agreement between dense cells and the classifier run on their windows."""

    exact: bool
    max_abs_error: float
    max_rel_error: float
    cells: int
    reason: str | None

    def __bool__(self) -> bool:
        return self.exact

    def __str__(self) -> str:
        verdict = "window-exact" if self.exact else f"not window-exact ({self.reason})"
        return (f"{verdict}: over {self.cells} cells of a random image, dense vs crop max abs "
                f"difference {self.max_abs_error:.3g} (relative {self.max_rel_error:.3g})")


@torch.no_grad()
def is_window_exact(model: nn.Module, input_shape: Sequence[int], *, cells: int = 3,
                    seed: int = 0) -> WindowCheck:
    """Whether each dense cell of the fully convolutional ``model`` equals ``model`` run on a
    crop around it, by structure (no padding, no partial ceil_mode window) and measured.

    Measured on a random image ``cells - 1`` strides larger than ``input_shape`` per axis:
    crops of ``input_shape`` at the first, middle and last stride offsets; the crop's map
    (``1x1`` for a convolutionalized classifier: the classifier on ``window(i, j)``) is compared
    with the same cells of the big image's map. The measured error is reported either way. A
    classifier that still flattens its features is convolutionalized first.
    """
    model = _dense(model, input_shape)
    rf = receptive_field(model, input_shape)
    shape = as_shape(input_shape)
    gen = torch.Generator().manual_seed(seed)
    size = tuple(n + (cells - 1) * s for n, s in zip(shape[1:], rf.stride, strict=True))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    image = torch.randn(1, shape[0], *size, generator=gen, dtype=dtype)
    dense = main_output(model(image))
    worst_abs, worst_rel, compared = 0.0, 0.0, 0
    for k in sorted({0, (cells - 1) // 2, cells - 1}):
        starts = tuple(k * s for s in rf.stride)
        region: Any = (..., *(slice(a, a + n) for a, n in zip(starts, shape[1:], strict=True)))
        ref = main_output(model(image[region]))
        cell: Any = (..., *(slice(k, k + m) for m in ref.shape[2:]))
        got = dense[cell]
        if got.shape != ref.shape:
            continue
        diff = (got - ref).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(ref.abs().max().item(), 1e-30))
        compared += int(math.prod(ref.shape[2:]))
    if not compared:
        raise Fc2ConvError("no crop of input_shape lines up with the dense map's cells")
    eps = torch.finfo(dtype).eps
    tol = 64 * eps * math.sqrt(max(1, math.prod(rf.size)))
    measured_exact = worst_rel <= tol
    return WindowCheck(rf.exact and measured_exact, worst_abs, worst_rel, compared,
                       rf.reason if not rf.exact else (
                           None if measured_exact else "cells differ from their crops"))
