"""``layout="ane"``, after the walk: constant scalings next to the 1x1 Convs, where a runtime
folds them (or where they are folded here), so that fewer ops run per layer.

The ane graph keeps activations in ``(B, C, 1, S)``, so onnxruntime's fusions of the Linear
layout (a query's scale into ``FusedMatMul``'s alpha, a LayerNorm's weight and bias into
``LayerNormalization``) no longer apply, and at small widths every op left costs about a
microsecond. Two rewrites give those constants to the Convs instead:

* :func:`move_scales_onto_convs` -- a head view scaled by a scalar constant,
  ``Mul(Reshape(Conv(x, K, b)), c)``, is written ``Reshape(Mul(Conv(x, K, b), c))``. An
  elementwise product by a scalar commutes with any Reshape, so the graph computes the same
  numbers, bit for bit; onnxruntime's ``ConvMulFusion`` then folds ``c`` into ``K`` and ``b``
  (as it folds the original's scale into its ``FusedMatMul``).
* :func:`fold_affine_into_convs` -- a per-channel affine map read only by 1x1 Convs (a pre-norm
  block's LayerNorm or RMSNorm weight and bias: ``y = x * w + t``, any chain of ``Mul`` and
  ``Add`` by constants ``c[k]`` along the channel axis) goes into the Convs' constants::

      Conv(y, K, b)[o] = sum_k K[o, k] (s[k] x[k] + t[k]) + b[o]
                       = sum_k (K[o, k] s[k]) x[k] + (b[o] + sum_k K[o, k] t[k])

  with ``s``, ``t`` the chain composed backwards (``Mul(a, c)``: ``s <- s c, t`` kept;
  ``Add(a, c)``: ``t <- t + s c``). Rounding: ``K[o, k] s[k]`` is rounded once to the kernel's
  dtype and the new bias is summed in float64 and rounded once, so each term of the Conv's sum
  differs from the unfolded graph's by at most about two units of roundoff of ``|K s x|`` and
  the output by the same order as the Conv's own summation error: compare says equivalent,
  not identical. A Conv is taken only when it is a 1x1, group-1, unpadded Conv with a
  constant 4-D kernel ``(O, C, 1, 1)``; the chain stops at a value with another reader, and a
  value read by anything but such Convs (a residual Add, a graph output) is not folded.
* :func:`fold_shifts_into_residuals` -- a post-norm's ``y = n * w + t``, read by such Convs
  and by one residual ``Add(Conv_c(h), y)``: the Convs take ``w`` and ``t`` as above, the
  residual's Conv takes ``t`` into its bias and the residual adds ``n * w``, one op fewer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.ane_twin import _const_array
from fc2conv.onnx.rules.base import (
    FLOAT_TYPES,
    Context,
    Refused,
    constant,
    drop_if_unused,
    new_initializer,
)

log = logging.getLogger(__name__)


def _readers(value: ir.Value) -> list[ir.Node]:
    return list({id(u.node): u.node for u in value.uses()}.values())


def _only_reader(value: ir.Value) -> ir.Node | None:
    readers = _readers(value)
    if len(readers) != 1 or value.is_graph_output() or len(value.uses()) != 1:
        return None
    return readers[0]


def _const_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """``(activation, constant)`` of a binary op with exactly one constant operand."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = _const_array(a), _const_array(b)
    if (ca is None) == (cb is None):
        return None
    return (b, ca) if ca is not None else (a, cb)  # type: ignore[return-value]


def _pointwise_kernel(conv: ir.Node) -> np.ndarray | None:
    """The ``(O, C, 1, 1)`` kernel of a plain 1x1 Conv (group 1, no padding, stride or
    dilation other than 1), or None."""
    if conv.op_type != "Conv" or conv.domain != "" or len(conv.inputs) < 2:
        return None
    attrs = conv.attributes
    if "group" in attrs and int(attrs["group"].value) != 1:
        return None
    for key in ("pads", "strides", "dilations"):
        if key in attrs and any(int(v) != (0 if key == "pads" else 1) for v in attrs[key].value):
            return None
    if "auto_pad" in attrs and str(attrs["auto_pad"].value) not in ("NOTSET", "VALID"):
        return None
    try:
        kernel = constant(conv.inputs[1], "Conv kernel")
    except Refused:
        return None
    if kernel.dtype not in FLOAT_TYPES or len(kernel.shape) != 4 \
            or tuple(kernel.shape)[2:] != (1, 1):
        return None
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        try:
            constant(conv.inputs[2], "Conv bias")
        except Refused:
            return None
    return kernel.numpy()


def _channel_vector(c: np.ndarray, channels: int) -> np.ndarray | None:
    """``c`` as ``(C,)`` when it broadcasts against ``(B, C, 1, S)`` along axis 1 only."""
    if c.ndim > 4 or not np.issubdtype(c.dtype, np.floating):
        return None
    shape = (1,) * (4 - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float64)


def fold_affine_into_convs(ctx: Context, convs: Collection[ir.Node]) -> int:
    """Fold every per-channel ``Mul``/``Add`` chain read only by plain 1x1 Convs among
    ``convs`` (those the pass made: a model's own Convs keep their inputs) into their kernels
    and biases (see the module docstring); return how many chains were folded."""
    folded = 0
    for node in list(ctx.graph):
        if node.graph is not ctx.graph or node.op_type not in ("Mul", "Add") \
                or node.domain != "":
            continue
        y = node.outputs[0]
        readers = _readers(y)
        if not readers or y.is_graph_output() or any(
                r not in convs or r.inputs[0] is not y or y in r.inputs[1:] for r in readers):
            continue
        kernels = [_pointwise_kernel(r) for r in readers]
        if any(k is None for k in kernels):
            continue
        channels = int(kernels[0].shape[1])  # type: ignore[union-attr]
        if any(k.shape[1] != channels for k in kernels):  # type: ignore[union-attr]
            continue
        scale, shift = np.ones(channels), np.zeros(channels)
        chain: list[ir.Node] = []
        x: ir.Value = y
        step: ir.Node | None = node
        while step is not None and step.op_type in ("Mul", "Add") and step.domain == "" \
                and step.graph is ctx.graph:
            found = _const_operand(step)
            vec = _channel_vector(found[1], channels) if found is not None else None
            if found is None or vec is None:
                break
            if step.op_type == "Mul":
                scale = scale * vec
            else:
                shift = shift + scale * vec
            chain.append(step)
            x = found[0]
            producer = x.producer()
            step = producer if producer is not None and _only_reader(x) is step else None
        if not chain or x.dtype not in FLOAT_TYPES or x.shape is None or y.shape is None \
                or x.shape.rank() != 4 or list(x.shape) != list(y.shape) \
                or x.shape[1] != channels:
            continue  # (shapes inferred: a constant must not broadcast x up to y)
        for conv, kernel in zip(readers, kernels, strict=True):
            _fold(ctx, conv, kernel, scale, shift, x)  # type: ignore[arg-type]
        operands = [v for n in chain for v in n.inputs if v is not None and v is not x]
        ctx.graph.remove(chain, safe=True)  # each value of the chain is read inside it only
        drop_if_unused(ctx, *operands)
        folded += 1
    if folded:
        log.debug("ane: %d per-channel affine maps folded into the Convs reading them", folded)
    return folded


def _fold(ctx: Context, conv: ir.Node, kernel: np.ndarray, scale: np.ndarray,
          shift: np.ndarray, x: ir.Value) -> None:
    k_value = conv.inputs[1]
    assert k_value is not None
    dtype = kernel.dtype
    new_k = (kernel.astype(np.float64) * scale[None, :, None, None]).astype(dtype)
    name = k_value.name or "kernel"
    k_new = new_initializer(ctx, f"{name}_affine", lambda: new_k, ir.DataType.from_numpy(dtype),
                            new_k.shape)
    conv.replace_input_with(0, x)
    conv.replace_input_with(1, k_new)
    if np.any(shift != 0):
        _add_to_bias(ctx, conv, kernel.astype(np.float64)[:, :, 0, 0] @ shift, dtype,
                     f"{name}_affine", "_affine")
    drop_if_unused(ctx, k_value)


def _add_to_bias(ctx: Context, conv: ir.Node, delta: np.ndarray, dtype: np.dtype,
                 unnamed: str, suffix: str) -> None:
    """``conv``'s bias (zeros without one) plus ``delta``, summed in float64 and rounded once
    to ``dtype``: a new initializer named for the old bias (``unnamed`` without one) and
    ``suffix``; the old one goes when nothing else reads it."""
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    base = constant(bias_value, "Conv bias").numpy().astype(np.float64).reshape(-1) \
        if bias_value is not None else np.zeros(delta.shape[0])
    assert base.shape == delta.shape
    new_b = (base + delta).astype(dtype)
    name = f"{bias_value.name}{suffix}" if bias_value is not None and bias_value.name \
        else unnamed
    b_new = new_initializer(ctx, name, lambda: new_b, ir.DataType.from_numpy(dtype),
                            new_b.shape)
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, b_new)
    drop_if_unused(ctx, bias_value)


def fold_shifts_into_residuals(ctx: Context, convs: Collection[ir.Node]) -> int:
    """A post-norm's bias, ``z = Add(Mul(n, w), t)`` read by 1x1 Convs among ``convs`` and by
    one residual ``Add(c, z)`` whose other operand ``c`` is the output of a Conv among
    ``convs`` read only there: the Convs read ``n`` with ``w`` and ``t`` folded in (as
    :func:`fold_affine_into_convs`), ``t`` goes into ``c``'s Conv bias, and the residual adds
    ``Mul(n, w)``::

        Conv_c(h) + b_c + (n w + t) = (Conv_c(h) + (b_c + t)) + n w

    ``b_c + t`` summed in float64 and rounded once; one op fewer per such norm. Return how
    many were folded."""
    folded = 0
    for add in list(ctx.graph):
        if add.graph is not ctx.graph or add.op_type != "Add" or add.domain != "":
            continue
        z = add.outputs[0]
        found = _const_operand(add)
        y = found[0] if found is not None else None
        mul = y.producer() if y is not None else None
        if found is None or y is None or mul is None or mul.op_type != "Mul" \
                or mul.domain != "" or _only_reader(y) is not add or z.is_graph_output():
            continue
        scaled = _const_operand(mul)
        if scaled is None or z.shape is None or z.shape.rank() != 4 \
                or not isinstance(z.shape[1], int) or z.dtype not in FLOAT_TYPES:
            continue
        channels = int(z.shape[1])
        n, w = scaled
        t = _channel_vector(found[1], channels)
        scale = _channel_vector(w, channels)
        if t is None or scale is None or n.shape is None or list(n.shape) != list(z.shape):
            continue  # (a constant must not broadcast n up to z)
        readers = _readers(z)
        residuals = [r for r in readers if r not in convs]
        if len(residuals) != 1 or residuals[0].op_type != "Add" or residuals[0].domain != "" \
                or len(residuals[0].inputs) != 2:
            continue
        residual = residuals[0]
        other = residual.inputs[1] if residual.inputs[0] is z else residual.inputs[0]
        source = other.producer() if other is not None else None
        if other is None or other is z or source is None or source not in convs \
                or _only_reader(other) is not residual or other.shape is None \
                or list(other.shape) != list(z.shape):
            continue
        source_kernel = _pointwise_kernel(source)
        if source_kernel is None or source_kernel.shape[0] != channels:
            continue
        pointwise = [r for r in readers if r is not residual]
        kernels = [_pointwise_kernel(r) for r in pointwise]
        if any(k is None or k.shape[1] != channels or r.inputs[0] is not z or z in r.inputs[1:]
               for r, k in zip(pointwise, kernels, strict=True)):
            continue
        for conv, kernel in zip(pointwise, kernels, strict=True):
            _fold(ctx, conv, kernel, scale, t, n)  # type: ignore[arg-type]
        _add_to_bias(ctx, source, t, source_kernel.dtype, "bias_shift", "_shift")
        residual.replace_input_with(0 if residual.inputs[0] is z else 1, y)
        operands = [v for v in add.inputs if v is not y]
        ctx.graph.remove(add, safe=True)
        drop_if_unused(ctx, *operands)
        folded += 1
    if folded:
        log.debug("ane: %d post-norm biases folded into the residual's Conv", folded)
    return folded


def _scalar_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """``(a, c)`` of ``Mul(a, c)`` with ``c`` a one-element float constant, or None."""
    found = _const_operand(node)
    if found is None or found[1].size != 1 or not np.issubdtype(found[1].dtype, np.floating):
        return None
    return found


def move_scales_onto_convs(ctx: Context) -> int:
    """Write ``Mul(Reshape(..Reshape(Conv(..))), c)``, ``c`` a scalar constant, as
    ``Reshape(..Reshape(Mul(Conv(..), c)))`` where the Conv and each Reshape have no other
    reader (see the module docstring); scalar Muls already between the Conv and the Reshapes
    stay where they are, before the moved one (the products keep their order); return how
    many were moved."""
    moved = 0
    for node in list(ctx.graph):
        if node.graph is not ctx.graph or node.op_type != "Mul" or node.domain != "" \
                or node.outputs[0].is_graph_output():
            continue
        found = _scalar_operand(node)
        if found is None:
            continue
        view, c = found
        first, src, reader = None, view, node  # first: the Reshape nearest the Conv
        producer = src.producer()
        path: list[str] = []
        while producer is not None and _only_reader(src) is reader and producer.domain == "" \
                and producer.inputs[0] is not None and (producer.op_type == "Reshape" or (
                    producer.op_type == "Mul" and _scalar_operand(producer) is not None)):
            if producer.op_type == "Reshape":
                if "Mul" in path:  # c would move past a scale: not the same roundings
                    break
                first = producer
            path.append(producer.op_type)
            reader = producer
            src = producer.inputs[0] if producer.op_type == "Reshape" \
                else _scalar_operand(producer)[0]  # type: ignore[index,assignment]
            producer = src.producer()
        if first is None or producer is None or producer.op_type != "Conv" \
                or _only_reader(src) is not reader or src.dtype != view.dtype:
            continue
        src = first.inputs[0]  # type: ignore[assignment]
        producer = src.producer()  # the Conv, or a scale already on it
        assert producer is not None
        scalar = ir.Value(name=ctx.unique(f"{node.name or 'scale'}_scalar"), shape=ir.Shape([]),
                          type=ir.TensorType(ir.DataType.from_numpy(c.dtype)),
                          const_value=ir.tensor(np.asarray(c.reshape(()))))
        ctx.graph.register_initializer(scalar)
        mul = ir.node("Mul", [src, scalar], {}, name=ctx.unique(f"{node.name or 'scale'}_on_conv"))
        mul.outputs[0].name = ctx.unique(f"{src.name or 'conv'}_scaled")
        mul.outputs[0].type, mul.outputs[0].shape = src.type, src.shape
        ctx.graph.insert_after(producer, mul)
        first.replace_input_with(0, mul.outputs[0])  # the views read only by this chain
        ir.convenience.replace_all_uses_with(node.outputs[0], view)
        operands = [v for v in node.inputs if v is not view]
        ctx.graph.remove(node, safe=True)
        drop_if_unused(ctx, *operands)
        moved += 1
    if moved:
        log.debug("ane: %d scalar scales moved onto the Convs before their head view", moved)
    return moved
