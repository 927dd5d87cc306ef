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
from fc2conv.pytorch.receptive_ops import (
    INT_VALUE,
    computed_conv_of,
    is_global_norm,
    last_axes_norm_of,
    logits_node,
    pad_of,
    permutation_of,
    reduction_of,
    transposed_conv_of,
)
from fc2conv.pytorch.trace import check_model, flat_inputs, record_shapes, to_graph

log = logging.getLogger(__name__)

_PER_POSITION = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, ChannelLayerNorm, nn.Identity)
_DROPOUT = {"dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
            "alpha_dropout_", "dropout1d", "dropout2d", "dropout3d"}
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


# A value's layout: the tensor axis holding each spatial axis (``(2, 3)`` for NCHW, ``(1, 2)``
# for NHWC after a permute), so channels-last stretches (ConvNeXt's LayerNorm + Linear) and
# their permutes pass through the walk.
_Axes = tuple[int, ...]


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
    _record(gm, example)
    n_axes = len(shape) - 1
    fields: dict[fx.Node, tuple[AxisField, ...]] = {}
    axes: dict[fx.Node, _Axes] = {}
    reasons: list[str] = []
    out_node: fx.Node | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            fields[node] = (AxisField(),) * n_axes
            axes[node] = tuple(range(2, 2 + n_axes))
            continue
        if node.op == "output":
            value = logits_node(node.args[0])
            out_node = value if isinstance(value, fx.Node) else None
            continue
        operands = [a for a in node.all_input_nodes if a in fields]
        if not operands:
            continue  # constants, weights (also weights computed from parameters)
        if is_global_norm(gm, node):
            raise Fc2ConvError(
                f"{user_name(node)!r} ({_op(node)}) normalizes with statistics over all "
                f"positions of the map (GroupNorm/InstanceNorm), so each cell depends on the "
                f"whole input and has no finite receptive field"
            )
        if tensor_shape(node) is None:  # not a tensor: a shape query, or a tuple of results
            if _is_batch_norm(node) or (node.op == "call_function"
                                        and node.target is operator.getitem):
                fields[node], axes[node] = fields[operands[0]], axes[operands[0]]
            elif (norm := last_axes_norm_of(gm, node)) is not None:  # native_layer_norm
                fields[node], axes[node] = _norm(node, norm, fields, axes)
            elif not _is_shape_query(node):
                raise Fc2ConvError(
                    f"{user_name(node)!r} ({getattr(node.target, '__name__', node.target)}) "
                    f"is not a convolution, pooling or per-position op, so fc2conv cannot say "
                    f"which input window its cells see"
                )
            continue
        fields[node], axes[node] = _through(gm, node, operands, fields, axes, reasons)
    if out_node is None or out_node not in fields:
        raise Fc2ConvError("the model must return one tensor computed from its input")
    out_shape = tensor_shape(out_node)
    assert out_shape is not None
    return (fields[out_node], shape[1:], tuple(out_shape[a] for a in axes[out_node]),
            reasons)


class _IntRecorder(fx.Interpreter):
    """Records the ints that size computations take (pads computed from ``x.shape``)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, int | torch.SymInt) and not isinstance(result, bool):
            n.meta[INT_VALUE] = int(result)
        return result


def _record(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Shapes of every value (``record_shapes``), then the ints of size computations, when
    the graph has any (a second run, only then)."""
    record_shapes(gm, (example,))
    if any(n.op == "call_function" and tensor_shape(n) is None and "sym_size" in _op(n)
           or n.op == "call_method" and n.target == "size"
           or n.op == "call_function" and n.target is getattr for n in gm.graph.nodes):
        with torch.no_grad():
            _IntRecorder(gm).run(*flat_inputs(gm, (example,)))


def _is_batch_norm(node: fx.Node) -> bool:
    """aten's batch norm ops (per channel, per position), whatever their variant."""
    return node.op == "call_function" and "batch_norm" in getattr(node.target, "__name__", "")


def _is_shape_query(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in ("size", "dim", "getattr", "sym_size", "sym_size.int", "numel")


def _op(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _not_windowed(node: fx.Node, why: str = "") -> Fc2ConvError:
    return Fc2ConvError(
        f"{user_name(node)!r} ({_op(node)}) is not a convolution, pooling or per-position op"
        f"{why}, so fc2conv cannot say which input window its cells see"
    )


def _norm(node: fx.Node, norm: tuple[fx.Node, int], fields: dict[fx.Node, Any],
          axes: dict[fx.Node, _Axes]) -> tuple[tuple[AxisField, ...], _Axes]:
    """A LayerNorm over the last ``L`` axes is per position when no spatial axis is among them
    (channels-last LayerNorm); over a spatial axis it mixes positions."""
    src, n_last = norm
    rank = len(tensor_shape(src) or ())
    if any(a >= rank - n_last for a in axes[src]):
        raise _not_windowed(node, " (it normalizes over a spatial axis)")
    return fields[src], axes[src]


def _through(gm: fx.GraphModule, node: fx.Node, operands: list[fx.Node],
             fields: dict[fx.Node, tuple[AxisField, ...]], axes: dict[fx.Node, _Axes],
             reasons: list[str]) -> tuple[tuple[AxisField, ...], _Axes]:
    name = user_name(node)
    out_shape = tensor_shape(node) or ()
    rank = len(out_shape)
    standard = tuple(range(2, rank))
    win = window_of(gm, node) or computed_conv_of(node)
    if win is not None:
        win_field = fields[win.input]
        if axes[win.input] != standard:
            raise _not_windowed(node, " over channels-first axes (its input was permuted)")
        in_shape = tensor_shape(win.input) or ()
        if any(p for p in win.padding):
            reasons.append(f"{name!r} pads by {shape_str(win.padding)}")
        if win.ceil_mode and any(
                has_partial_window(n, k, s, p, d, True) for n, k, s, p, d in
                zip(in_shape[2:], win.kernel, win.stride, win.padding, win.dilation, strict=True)):
            reasons.append(f"{name!r} (ceil_mode) has a partial last window at the training size")
        return tuple(f.through(k, s, p, d) for f, k, s, p, d in
                     zip(win_field, win.kernel, win.stride, win.padding, win.dilation,
                         strict=True)), standard
    tconv = transposed_conv_of(gm, node)
    if tconv is not None:
        if axes[tconv.input] != standard:
            raise _not_windowed(node, " over channels-first axes (its input was permuted)")
        try:
            out = tuple(f.through_transposed(k, s, p, d) for f, k, s, p, d in zip(
                fields[tconv.input], tconv.kernel, tconv.stride, tconv.padding, tconv.dilation,
                strict=True))
        except Fc2ConvError as err:
            raise Fc2ConvError(f"{name!r} (ConvTranspose): {err}") from None
        if any(d * (k - 1) - p > 0 for k, p, d in zip(tconv.kernel, tconv.padding,
                                                       tconv.dilation, strict=True)):
            reasons.append(f"{name!r} (ConvTranspose) pads its input implicitly")
        return out, standard
    pad = pad_of(gm, node)
    if pad is not None:
        src_axes = axes[pad.input]
        sides = pad.low_high(len(tensor_shape(pad.input) or ()))
        lows_highs = [sides.get(a, (0, 0)) for a in src_axes]
        if any(lo > 0 or hi > 0 for lo, hi in lows_highs):
            reasons.append(f"{name!r} pads by {'x'.join(f'{lo}+{hi}' for lo, hi in lows_highs)}"
                           f" ({pad.mode})")
        return tuple(f.padded(lo) for f, (lo, _) in zip(fields[pad.input], lows_highs,
                                                         strict=True)), src_axes
    perm = permutation_of(node)
    if perm is not None:
        moved, order = perm
        return fields[moved], tuple(order.index(a) for a in axes[moved])
    norm = last_axes_norm_of(gm, node)
    if norm is not None:
        return _norm(node, norm, fields, axes)
    pool = adaptive_of(gm, node)
    if pool is not None:
        if axes[pool.input] != standard:
            raise _not_windowed(node, " over channels-first axes (its input was permuted)")
        in_hw = (tensor_shape(pool.input) or ())[2:]
        out_hw = out_shape[2:]
        kernels = [adaptive_as_fixed(i, o) for i, o in zip(in_hw, out_hw, strict=True)]
        if any(k is None for k in kernels):
            raise Fc2ConvError(
                f"{name!r} (adaptive pooling {shape_str(in_hw)} -> {shape_str(out_hw)}) has "
                f"windows of varying size, so its output cells have no fixed receptive field"
            )
        return tuple(f.through(int(k), int(k)) for f, k in zip(fields[pool.input], kernels,  # type: ignore[arg-type]
                                                               strict=True)), standard
    red = reduction_of(node)
    if red is not None:
        reduced, dims, keep = red
        src_axes = axes[reduced]
        if dims is not None and not set(dims) & set(src_axes):
            # over channels only (a hand-written channel LayerNorm's mean/var): per position
            new_axes = src_axes if keep else tuple(a - sum(d < a for d in dims)
                                                   for a in src_axes)
            return fields[reduced], new_axes
        if dims is not None and not set(src_axes) <= set(dims):
            raise _not_windowed(node, " (it reduces over some spatial axes, not all)")
        if not keep and rank == 2 and src_axes == tuple(range(2, 2 + len(src_axes))):
            # an (N, C, *S) map pooled to an (N, C) vector: a classifier's global pool
            raise NotConvolutional(
                f"{name!r} pools over all positions into a vector, so the model is not fully "
                f"convolutional; run fc2conv.convolutionalize(model, input_shape) first"
            )
        raise Fc2ConvError(
            f"{name!r} pools over all positions (global pooling), so every output depends "
            f"on the whole input and there is no per-cell window; convolutionalize the "
            f"classifier with global_pool='dense' (the default) or 'drop' for a dense map"
        )
    if is_move(node):
        raise Fc2ConvError(
            "the model moves activations between the Linear and conv layouts (it came from "
            "to_conv); receptive fields describe image models, whose positions are pixels"
        )
    mod = module_of(gm, node)
    lin = linear_of(gm, node)
    in_axes = axes[operands[0]]
    if lin is not None and (tensor_shape(lin.input) or ()) and rank == len(
            tensor_shape(lin.input) or ()) and rank - 1 not in axes[lin.input]:
        return fields[lin.input], axes[lin.input]  # a Linear over channels-last channels
    if lin is not None or isinstance(mod, nn.Flatten) or (
            node.op in ("call_function", "call_method")
            # aten overloads read "flatten.using_ints", "view.default": the op is the first part
            and _op(node).split(".")[0] in ("flatten", "view", "reshape", "_unsafe_view")):
        raise NotConvolutional(
            f"{name!r} flattens or mixes all positions, so the model is not fully "
            f"convolutional; run fc2conv.convolutionalize(model, input_shape) first"
        )
    same_layout = all(len(tensor_shape(a) or ()) == rank and axes[a] == in_axes
                      for a in operands)
    soft = softmax_dim(gm, node)
    elementwise = is_pointwise(gm, node) or isinstance(mod, _PER_POSITION) or _is_batch_norm(
        node) or (soft is not None and soft[0] % max(rank, 1) not in in_axes)
    if isinstance(mod, _PER_POSITION) and not isinstance(mod, nn.Identity) or _is_batch_norm(node):
        elementwise = elementwise and in_axes == standard  # they normalize axis 1
    if node.op == "call_function" and node.target in (operator.add, operator.mul, torch.add,
                                                      torch.ops.aten.add.Tensor,
                                                      torch.ops.aten.mul.Tensor) and same_layout:
        out_sp = tuple(out_shape[a] for a in in_axes)
        if all(tuple((tensor_shape(a) or ())[x] for x in in_axes) == out_sp for a in operands):
            elementwise = True
    if node.op == "call_function" and node.target in _CONCAT:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        elementwise = isinstance(dim, int) and dim % max(rank, 1) not in (0, *in_axes)
    if _op(node).split(".")[0] in _DROPOUT and same_layout:
        elementwise = True  # the identity in eval (in-place forms too)
    if not elementwise and same_layout and len(operands) > 1 and any(
            all((tensor_shape(a) or ())[x] == 1 for x in in_axes) for a in operands) and any(
            all(out_shape[x] > 1 for x in in_axes) for _ in (0,)):
        raise Fc2ConvError(
            f"{name!r} ({_op(node)}) scales every position by a value pooled from the whole "
            f"map (a squeeze-and-excitation gate), so each cell depends on the whole input and "
            f"has no finite receptive field"
        )
    if not elementwise or not same_layout:
        raise _not_windowed(node)
    result = fields[operands[0]]
    for other in operands[1:]:
        try:
            result = tuple(a.union(b) for a, b in zip(result, fields[other], strict=True))
        except Fc2ConvError as err:
            raise Fc2ConvError(f"Cannot compute the receptive field at {name!r}: {err}") from None
    return result, in_axes


def _summary(reasons: list[str], shown: int = 3) -> str | None:
    """The first ``shown`` reasons, then how many more (a DenseNet pads in 60 layers)."""
    if not reasons:
        return None
    more = len(reasons) - shown
    return "; ".join(reasons[:shown]) + (f"; and {more} more" if more > 0 else "")


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
        reason=_summary(reasons),
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
