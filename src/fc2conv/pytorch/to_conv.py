"""``to_conv``: every Linear of a model becomes a 1x1 convolution, same input/output contract.

A Linear acts on the last axis of ``(N, *S, C)``; the 1x1 conv (:func:`fc2conv.linear_to_conv`,
``K[o, c, 1...] = W[o, c]``) acts on axis 1 of ``(N, C, *S')``. Activations move into the conv
layout once before the first converted layer of a region, stay there through per-position ops
(other converted layers, activations, dropout, arithmetic between same-shape values, LayerNorm
over the channels as :class:`~fc2conv.pytorch.layout.ChannelLayerNorm`), and move back once
where anything else reads them. The conv layout of a rank-``r`` activation with ``dims``
spatial axes: ``(B, S, C) -> (B, C, 1, S)`` for ``dims=2`` (Apple's ANE layout; ``layout=
"height"`` gives ``(B, C, S, 1)``), ``(B, C, S)`` for ``dims=1``, ``(N, C) -> (N, C, 1, 1)``,
``(N, H, W, C) -> (N, C, H, W)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fc2conv.core.describe import describe
from fc2conv.core.layers import conv_class, linear_to_conv
from fc2conv.core.provenance import mark
from fc2conv.errors import Fc2ConvError, wrap
from fc2conv.pytorch.attention import attention_pass
from fc2conv.pytorch.direct_calls import install_direct_calls
from fc2conv.pytorch.layout import (
    ChannelLayerNorm,
    Move,
    cancel_inverse_moves,
    drop_full_slices,
    last_to_channels,
    relayout,
)
from fc2conv.pytorch.masks import drop_true_masks
from fc2conv.pytorch.matmuls import normalize_matmuls
from fc2conv.pytorch.ops import (
    attr_of,
    is_pointwise,
    linear_of,
    module_of,
    new_module_name,
    tensor_shape,
    user_name,
)
from fc2conv.pytorch.quantized import quantized_layers, why_unconverted
from fc2conv.pytorch.selfcheck import reference_copy, self_check
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

LAYOUTS = ("auto", "ane", "width", "height")


def _layer_norm_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module, str] | None:
    """A LayerNorm over the last axis only: (input, a ChannelLayerNorm, user's name)."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
        new = ChannelLayerNorm(mod.normalized_shape[0], mod.eps, mod.weight, mod.bias)
        return node.args[0], new, str(node.target)  # type: ignore[return-value]
    import torch

    if node.op == "call_function" and node.target is torch.ops.aten.layer_norm.default:
        shape = node.args[1]
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            return None
        w_node = node.args[2] if len(node.args) > 2 else None
        b_node = node.args[3] if len(node.args) > 3 else None
        weight = attr_of(gm, w_node)
        bias = attr_of(gm, b_node)
        if (w_node is not None and weight is None) or (b_node is not None and bias is None):
            return None
        eps = float(node.args[4]) if len(node.args) > 4 else 1e-5  # type: ignore[arg-type]
        name = str(w_node.target).removesuffix(".weight") if isinstance(w_node, fx.Node) \
            else node.name
        channels: Any = shape[0]
        source: Any = node.args[0]
        return source, ChannelLayerNorm(int(channels), eps, weight, bias), name
    return None


def to_conv(model: nn.Module | torch.export.ExportedProgram, example_inputs: Any, *,
            dims: int = 2, layout: str = "auto", inplace: bool = False,
            only: Collection[str] | None = None, verify: bool = True) -> fx.GraphModule:
    """Return a copy of ``model`` in which every ``nn.Linear`` and every product with a stored
    weight (``F.linear``, ``x @ W``, ``x @ W.T``, ``mm``, ``addmm``: weights stored ``(out,
    in)`` or ``(in, out)`` as GPT-2's ``Conv1D``; see :mod:`fc2conv.pytorch.matmuls`) is a 1x1
    ``nn.Conv{dims}d``, with the same input and output shapes. A product that stays is named
    in a warning with its reason. Weights keep their contract (:mod:`fc2conv.pytorch.weights`):
    a tied weight stays one parameter, unchanged modules keep their names and types, and each
    converted layer loads the state-dict entry of the layer it replaced.

    ``example_inputs`` (a tensor, a tuple, or a dict of keyword inputs such as a tokenizer's
    output) fixes the ranks of the activations; any batch size or sequence length the original
    accepts keeps working (a model captured by ``torch.export`` is exported with dynamic axes;
    an axis its code pins is named in a warning), and keyword calls work as on the original.
    A converted layer keeps the user's name (``blocks.0.up`` is a Conv2d at ``blocks.0.up``)
    and records its origin (``fc2conv_source``, ``fc2conv_origin``). ``layout``: where a
    sequence axis goes when ``dims`` exceeds it: ``"auto"``/``"width"`` -> ``(B, C, 1, S)``,
    ``"height"`` -> ``(B, C, S, 1)``. ``only``: convert just the layers with these names. Raises
    :class:`~fc2conv.errors.Fc2ConvError` naming the layer when an activation has more axes
    than ``dims`` can hold. ``verify``: check the result against ``model`` with
    :func:`fc2conv.compare` on the example inputs and a fresh draw, raising ``Fc2ConvError``
    naming the first diverging layer when it is different (``False`` skips it, for speed).
    """
    if layout not in LAYOUTS:
        raise Fc2ConvError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    conv_class(dims)
    inputs = as_inputs(example_inputs)
    quantized = quantized_layers(model) if isinstance(model, nn.Module) else []
    for qname, qdesc in quantized:
        log.warning(why_unconverted(qname, qdesc))
    if quantized and verify:
        log.warning("the result is not self-checked: compare's float64 reference cannot run "
                    "quantized layers (%s)", ", ".join(repr(n) for n, _ in quantized))
    original = reference_copy(model, inplace, verify and not quantized)
    gm = to_graph(model, inputs, inplace=inplace)
    record_shapes(gm, inputs)
    retarget_aliases(gm)
    drop_full_slices(gm.graph)
    drop_true_masks(gm)  # a mask eager PyTorch would skip (a captured all-True SDPA mask)
    if normalize_matmuls(gm):
        record_shapes(gm, inputs)
    seq_last = layout != "height"
    # recognized before any rewrite: once a shared layer's module is replaced by its conv, a
    # later call of it no longer looks like a Linear, yet it must be converted too
    ops = {n: op for n in gm.graph.nodes if (op := linear_of(gm, n)) is not None}
    converted: dict[str, nn.Module] = {}
    names: dict[str, str] = {}
    made: list[tuple[nn.Module, torch.Tensor]] = []  # (new layer, the weight it came from)

    def rewrite(node: fx.Node, is_moved: Callable[[fx.Node], bool]
                ) -> tuple[nn.Module, str, fx.Node] | None:
        op = ops.get(node)
        if op is not None and (only is None or op.name in only):
            key = op.weight_target or op.name
            if key not in converted:
                try:
                    conv = linear_to_conv(op.linear, dims, source=op.name)
                except Fc2ConvError as err:
                    raise wrap(f"Cannot convert {op.name!r} ({describe(op.linear)})", err) from None
                if op.transposed:  # to_linear gives back a weight stored (in, out)
                    conv.fc2conv_transposed = True  # type: ignore[assignment]
                accept_source_layout(conv)
                made.append((conv, op.linear.weight))
                converted[key] = conv
                names[key] = (op.name if op.weight_target is None
                              or replaceable(gm, op.name, {n for n, o in ops.items()
                                                           if o.weight_target == key})
                              else unique_name(gm, new_module_name(op.name, op.weight_target,
                                                                   "conv")))
            return converted[key], names[key], op.input
        ln = _layer_norm_of(gm, node)
        # over channels when its input is in the conv layout, or when only converted layers
        # read it (pre-LN blocks): then its input moves instead, and a residual shares that move
        if ln is not None and isinstance(ln[0], fx.Node) and (
                is_moved(ln[0]) or (node.users and all(u in ops for u in node.users))):
            source, new, name = ln
            mark(new, name, f"LayerNorm {new.channels}")  # type: ignore[attr-defined]
            keeps_name = (_calls_only_moved(gm, node) if node.op == "call_module"
                          else replaceable(gm, name, {node}))
            target = name if keeps_name else unique_name(gm, f"{name}_channels")
            return new, target, source
        return None

    def move(value: fx.Node) -> Move:
        shape = tensor_shape(value)
        rank = len(shape) if shape is not None else 0
        extra = dims - (rank - 2)
        if rank < 2 or extra < 0:
            raise Fc2ConvError(
                f"Cannot convert the layers reading {value.name!r}: its shape {shape} has "
                f"{rank - 2} position axes, more than dims={dims} convolution axes; pass "
                f"dims={rank - 2}"
            )
        return Move(last_to_channels, (extra, seq_last))

    if only is not None:
        check_only(only, {op.name for op in ops.values()}, "Linear")
    _warn_opaque(gm)
    def vector_shape(x: fx.Node, m: Move) -> tuple[int, ...]:
        return (-1, *([1] * (len(tensor_shape(x) or ()) - 2 + m.args[0])))

    anchors = [n for n, op in ops.items() if only is None or op.name in only]
    gm = relayout(gm, rewrite, lambda n: is_pointwise(gm, n), move, "Linear", vector_shape,
                  anchors=anchors)
    if dims == 2 and seq_last and attention_pass(gm):
        cancel_inverse_moves(gm.graph)
    weights = {str(a.target) for n, op in ops.items() if (op.weight_target or op.name) in converted
               for a in n.all_input_nodes if a.op == "get_attr"}
    drop_dead_attrs(gm, weights)
    gm = finish(gm)
    share_storage(gm, made)
    restore_modules(gm, model)
    install_direct_calls(gm)  # eager: aten ops without OpOverload's Python frame
    for name, conv in converted.items():
        log.info("%s -> %s", name, describe(conv))
    self_check(original, gm, inputs, "to_conv result")
    return gm


def _warn_opaque(gm: fx.GraphModule) -> None:
    """Say which Linears stay because they live inside a module traced as one op."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (
                F.linear, torch.ops.aten.linear.default) and linear_of(gm, node) is None:
            log.warning("%r (%s) computes its Linear weight in the graph (not a stored "
                        "parameter), so it stays a Linear", user_name(node), node.name)
        mod = module_of(gm, node)
        if mod is None or isinstance(mod, nn.Linear):
            continue
        inner = [n for n, m in mod.named_modules() if isinstance(m, nn.Linear)]
        if inner:
            log.warning(
                "%r (%s) is traced as one op, so its Linear layers (%s) stay Linear; "
                "its weights are used by its own forward", str(node.target),
                type(mod).__name__, ", ".join(inner))


def replaceable(gm: fx.GraphModule, name: str, owners: set[fx.Node]) -> bool:
    """Whether the parameter-holding submodule ``name`` (from ``ep.module()``) can be replaced:
    it has no children, is never called, and its tensors are read only by ``owners``."""
    try:
        mod = gm.get_submodule(name)
    except AttributeError:
        return False
    if any(True for _ in mod.children()):
        return False
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == name:
            return False
        if n.op == "get_attr" and str(n.target).startswith(name + ".") \
                and not set(n.users) <= owners:
            return False
    return True


def _calls_only_moved(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s module is called only here (so it can be replaced at its name)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]
    return len(calls) == 1


def check_only(only: Collection[str], names: set[str], kind: str) -> None:
    """Refuse names in ``only`` that are not convertible layers of the model."""
    unknown = sorted(set(only) - names)
    if unknown:
        raise Fc2ConvError(
            f"no convertible {kind} named {', '.join(map(repr, unknown))}; the model has "
            f"{', '.join(sorted(names)) or 'none'}"
        )
