"""Gemm -> 1x1 Conv.

``Y = alpha * A @ B' + beta * C`` with ``A`` of shape ``(M, K)`` (``transA = 0``), ``B'`` =
``B`` (``transB = 0``, ``B`` of shape ``(K, N)``) or ``B.T`` (``transB = 1``) and ``C``
broadcasting per output column (shape ``()``, ``(1,)``, ``(N,)`` or ``(1, N)``), is the Linear
layer ``W = alpha * B'.T`` of shape ``(N, K)`` with bias ``b = beta * C`` broadcast to ``(N,)``.
As a conv (:func:`fc2conv.onnx.weights.linear_to_conv_kernel`, mirroring
:func:`fc2conv.core.linear_to_conv`)::

    K[n, k, 0, 0] = alpha * B'[k, n]          bias[n] = beta * C[n]
    Y = Flatten(Conv(Reshape(A, [0, -1, 1, 1]), K, bias), axis=1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.base import (
    Context,
    Refused,
    check_dtype,
    constant,
    dims,
    drop_if_unused,
    new_initializer,
    provenance,
)
from fc2conv.onnx.rules.layout import enter, exit_
from fc2conv.onnx.weights import linear_to_conv_kernel


@dataclass
class GemmMatch:
    node: ir.Node
    weight: ir.TensorProtocol
    bias: ir.TensorProtocol | None
    alpha: float
    beta: float
    trans_b: bool
    out_features: int
    in_features: int


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def gemm_weight(node: ir.Node) -> GemmMatch:
    """Read a Gemm as a Linear layer, or refuse (shared with the Flatten+Gemm rule)."""
    if _attr(node, "transA", 0):
        raise Refused("transA=1 reads the input transposed, which is not one Linear per row")
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    assert a is not None
    check_dtype(a, "its input")
    weight = constant(b, "Gemm weight 'B'")
    if len(weight.shape) != 2:
        raise Refused(f"Gemm weight 'B' has rank {len(weight.shape)}, expected 2")
    trans_b = bool(_attr(node, "transB", 0))
    rows, cols = dims(weight)
    out_f, in_f = (rows, cols) if trans_b else (cols, rows)
    bias = None
    if c is not None:
        bias = constant(c, "Gemm bias 'C'")
        shape = dims(bias)
        if (
            any(d != 1 for d in shape[:-1])
            or (shape and shape[-1] not in (1, out_f))
            or len(shape) > 2
        ):
            raise Refused(
                f"Gemm bias 'C' of shape {shape} varies per row; only a per-output bias "
                f"((), (1,), ({out_f},) or (1, {out_f})) is a Linear bias"
            )
    return GemmMatch(
        node,
        weight,
        bias,
        float(_attr(node, "alpha", 1.0)),
        float(_attr(node, "beta", 1.0)),
        trans_b,
        out_f,
        in_f,
    )


def linear_weight(m: GemmMatch) -> np.ndarray:
    """``W = alpha * B'.T`` of shape ``(N, K)``, in the weight's dtype."""
    raw = m.weight.numpy()
    weight = raw if m.trans_b else raw.T
    if m.alpha != 1.0:
        weight = (weight * np.asarray(m.alpha, dtype=raw.dtype)).astype(raw.dtype)
    return weight


def linear_bias(m: GemmMatch) -> np.ndarray:
    """``b = beta * C`` broadcast to ``(N,)``, in the weight's dtype."""
    assert m.bias is not None
    b = m.bias.numpy().reshape(-1).astype(m.weight.dtype.numpy())
    if m.beta != 1.0:
        b = b * np.asarray(m.beta, dtype=b.dtype)
    return np.broadcast_to(b, (m.out_features,)).astype(b.dtype)


def bias_initializer(m: GemmMatch, ctx: Context) -> ir.Value:
    """The conv bias ``beta * C`` of a Gemm with a bias, as a new initializer ``<C>_conv``."""
    c = m.node.inputs[2]
    assert c is not None and m.bias is not None
    return new_initializer(
        ctx,
        f"{c.name}_conv",
        lambda: linear_bias(m),
        m.weight.dtype,
        (m.out_features,),
        [m.weight, m.bias],
        recipe=("gemm_bias", m.beta, m.out_features),
    )


class GemmToConv:
    name = "gemm_to_conv"
    op_types = ("Gemm",)

    def check(self, node: ir.Node, ctx: Context) -> GemmMatch:
        return gemm_weight(node)

    def rewrite(self, m: GemmMatch, ctx: Context) -> str:
        node = m.node
        base = node.name or node.outputs[0].name or "gemm"
        b, c = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        assert b is not None and node.inputs[0] is not None
        kernel = new_initializer(
            ctx,
            f"{b.name}_conv",
            lambda: linear_to_conv_kernel(linear_weight(m), 2),
            m.weight.dtype,
            (m.out_features, m.in_features, 1, 1),
            [m.weight],
            recipe=("gemm", m.alpha, m.trans_b),
        )
        inputs = [kernel]
        if m.bias is not None:
            inputs.append(bias_initializer(m, ctx))
        into = enter(ctx, node.inputs[0], 2, f"{base}_to_nchw")
        conv = ir.node(
            "Conv",
            [into.outputs[0], *inputs],
            {"kernel_shape": [1, 1]},
            name=ctx.unique(f"{base}_conv"),
        )
        conv.outputs[0].name = ctx.unique(f"{base}_conv_out")
        origin = f"Gemm {m.in_features}->{m.out_features}"
        provenance(conv, node.name or base, origin)
        out = exit_(ctx, conv.outputs[0], 2, f"{base}_to_nc")
        ir.convenience.replace_nodes_and_values(
            ctx.graph, node, [node], [into, conv, out], node.outputs, out.outputs
        )
        drop_if_unused(ctx, b, c)
        return f"Conv 1x1 {m.in_features}->{m.out_features}"
