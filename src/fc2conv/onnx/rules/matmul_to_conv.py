"""MatMul (+ Add) -> 1x1 Conv.

``Y = X @ B (+ c)`` with ``X`` of shape ``(N, *S, C)`` (rank 2 to 5), a constant ``B`` of shape
``(C, O)`` and an optional constant bias ``c`` broadcasting along the last axis only (shape
``()``, ``(O,)`` or ``(1, ..., 1, O)``) is the Linear ``W = B.T`` applied at every position. As a
conv (:func:`fc2conv.onnx.weights.linear_to_conv_kernel`, mirroring
:func:`fc2conv.core.linear_to_conv`)::

    K[o, c, 1, ...] = B[c, o]        bias[o] = c[..., o]
    Y = exit(Conv(enter(X), K, bias))

with ``enter``/``exit`` the layout changes of :mod:`fc2conv.onnx.rules.layout` (a Transpose to
channels-first and back for rank 3-5; Reshape to ``(N, C, 1, 1)`` and Flatten for rank 2).
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
from fc2conv.onnx.rules.layout import enter, exit_, kind_of, spatial_dims
from fc2conv.onnx.weights import linear_to_conv_kernel


@dataclass
class MatMulMatch:
    node: ir.Node
    add: ir.Node | None
    bias_value: ir.Value | None
    weight: ir.TensorProtocol
    bias: ir.TensorProtocol | None
    rank: int


def _bias_of(
    node: ir.Node, out_features: int, rank: int
) -> tuple[ir.Node, ir.Value, ir.TensorProtocol] | None:
    """The following ``Add`` of a per-output constant, if the MatMul output feeds only it."""
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or other.is_graph_input():
        return None
    try:
        tensor = constant(other, "bias")
    except Refused:
        return None
    shape = dims(tensor)
    if (
        len(shape) > rank
        or any(d != 1 for d in shape[:-1])
        or (shape and shape[-1] not in (1, out_features))
    ):
        return None
    return add, other, tensor


class MatMulToConv:
    name = "matmul_to_conv"
    op_types = ("MatMul",)

    def check(self, node: ir.Node, ctx: Context) -> MatMulMatch:
        x = node.inputs[0]
        assert x is not None
        weight = constant(node.inputs[1], "MatMul weight")
        if len(weight.shape) != 2:
            raise Refused(
                f"its weight has rank {len(weight.shape)}; only a 2-D (C, O) weight is one Linear"
            )
        check_dtype(x, "its input")
        if x.shape is None:
            raise Refused("the rank of its input is unknown (shape inference could not tell)")
        rank = x.shape.rank()
        if rank < 2:
            raise Refused("its input is a vector; there is no batch/position axis for a Conv")
        kind_of(rank)
        found = _bias_of(node, dims(weight)[1], rank)
        add, bias_value, bias = found if found is not None else (None, None, None)
        return MatMulMatch(node, add, bias_value, weight, bias, rank)

    def rewrite(self, m: MatMulMatch, ctx: Context) -> str:
        node = m.node
        base = node.name or node.outputs[0].name or "matmul"
        b = node.inputs[1]
        assert b is not None and node.inputs[0] is not None
        in_f, out_f = dims(m.weight)
        n_spatial = spatial_dims(m.rank)
        kernel = new_initializer(
            ctx,
            f"{b.name}_conv",
            lambda: linear_to_conv_kernel(m.weight.numpy().T, n_spatial),
            m.weight.dtype,
            (out_f, in_f, *([1] * n_spatial)),
            [m.weight],
            recipe=("matmul", n_spatial),
        )
        inputs = [kernel]
        if m.bias is not None:
            bias_t = m.bias
            dtype = m.weight.dtype.numpy()
            inputs.append(
                new_initializer(
                    ctx,
                    f"{m.bias_value.name if m.bias_value else base}_conv",
                    lambda: np.broadcast_to(bias_t.numpy().reshape(-1), (out_f,)).astype(dtype),
                    m.weight.dtype,
                    (out_f,),
                    [bias_t],
                    recipe=("bias", out_f),
                )
            )
        into = enter(ctx, node.inputs[0], m.rank, f"{base}_to_nchw")
        conv = ir.node(
            "Conv",
            [into.outputs[0], *inputs],
            {"kernel_shape": [1] * n_spatial},
            name=ctx.unique(f"{base}_conv"),
        )
        conv.outputs[0].name = ctx.unique(f"{base}_conv_out")
        old_nodes = [node] if m.add is None else [node, m.add]
        origin = f"MatMul {in_f}->{out_f}" + (" + Add" if m.add is not None else "")
        provenance(conv, node.name or base, origin)
        out = exit_(ctx, conv.outputs[0], m.rank, f"{base}_to_nhwc")
        last = old_nodes[-1]
        ir.convenience.replace_nodes_and_values(
            ctx.graph, last, old_nodes, [into, conv, out], last.outputs, out.outputs
        )
        drop_if_unused(ctx, b, m.bias_value)
        return f"Conv{n_spatial}d 1x1 {in_f}->{out_f}" + (" + bias" if m.add is not None else "")
