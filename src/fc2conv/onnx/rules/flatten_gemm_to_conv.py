"""Flatten (or Reshape to ``(N, -1)``) of a feature map + Gemm -> one Conv ("convolutionalize").

A Gemm (read as a Linear ``W`` of shape ``(O, C*prod(S))``, bias ``b``, see
:mod:`fc2conv.onnx.rules.gemm_to_conv`) applied to the row-major flatten of an ``(N, C, *S)``
map is a conv whose kernel covers the whole map
(:func:`fc2conv.onnx.weights.flatten_linear_to_conv_kernel`, mirroring
:func:`fc2conv.core.flatten_linear_to_conv` with ``order="chw"``)::

    K = W.reshape(O, C, *S)                      bias = b
    Y = Flatten(Conv(X, K, bias), axis=1)        # Conv output (N, O, 1, ...)

With ``dynamic_spatial=True`` the kernel slides over larger maps (OverFeat): the model's image
dims become symbolic and a graph output that was ``(N, O)`` becomes the score map
``(N, O, h, w)``, equal to the original output at ``h = w = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.base import (
    LAYOUT_KEY,
    Context,
    Refused,
    drop_if_unused,
    fmt,
    new_initializer,
    provenance,
    static_shape,
)
from fc2conv.onnx.rules.gemm_to_conv import (
    GemmMatch,
    bias_initializer,
    gemm_weight,
    linear_weight,
)
from fc2conv.onnx.weights import flatten_linear_to_conv_kernel


@dataclass
class FlattenGemmMatch:
    gemm: GemmMatch
    flatten: ir.Node
    x: ir.Value
    in_shape: tuple[int, ...]


def _flattened_map(a: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    producer = a.producer()
    if producer is None or producer.domain != "":
        return None
    if producer.op_type == "Flatten":
        axis = producer.attributes.get("axis")
        if (1 if axis is None else axis.value) != 1:
            return None
    elif producer.op_type == "Reshape":
        target = producer.inputs[1]
        const = target.const_value if target is not None else None
        x = producer.inputs[0]
        batch = x.shape[0] if x is not None and x.shape is not None and x.shape.rank() else None
        wanted = [[0, -1]] + ([[batch, -1]] if isinstance(batch, int) else [])
        if const is None or [int(v) for v in const.numpy().reshape(-1)] not in wanted:
            return None
    else:
        return None
    x = producer.inputs[0]
    return None if x is None else (producer, x)


class FlattenGemmToConv:
    name = "flatten_gemm_to_conv"
    op_types = ("Gemm",)

    def check(self, node: ir.Node, ctx: Context) -> FlattenGemmMatch:
        a = node.inputs[0]
        assert a is not None
        found = _flattened_map(a)
        if found is None:
            raise Refused("its input is not a Flatten(axis=1) of a feature map")
        flatten, x = found
        shape = static_shape(x)
        if shape is None or not 3 <= len(shape) <= 5:
            raise Refused(
                f"the flattened map has shape {fmt(shape)}; expected (N, C, *S) of rank 3-5"
            )
        if any(d is None for d in shape[1:]):
            raise Refused(f"the flattened map {fmt(shape)} has symbolic channel/spatial dims")
        in_shape = tuple(int(d) for d in shape[1:])  # type: ignore[arg-type]
        gemm = gemm_weight(node)
        if gemm.in_features != int(np.prod(in_shape)):
            raise Refused(
                f"its weight takes {gemm.in_features} features, the map {fmt(in_shape)} "
                f"flattens to {int(np.prod(in_shape))}"
            )
        return FlattenGemmMatch(gemm, flatten, x, in_shape)

    def rewrite(self, m: FlattenGemmMatch, ctx: Context) -> str:
        node, g = m.gemm.node, m.gemm
        base = node.name or node.outputs[0].name or "gemm"
        b, c = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        assert b is not None
        kernel = new_initializer(
            ctx,
            f"{b.name}_conv",
            lambda: flatten_linear_to_conv_kernel(linear_weight(g), m.in_shape),
            g.weight.dtype,
            (g.out_features, *m.in_shape),
            [g.weight],
            recipe=("flatten_gemm", g.alpha, g.trans_b, m.in_shape),
        )
        inputs = [kernel]
        if g.bias is not None:
            inputs.append(bias_initializer(g, ctx))
        spatial = m.in_shape[1:]
        conv = ir.node(
            "Conv", [m.x, *inputs], {"kernel_shape": list(spatial)}, name=ctx.unique(f"{base}_conv")
        )
        conv.outputs[0].name = ctx.unique(f"{base}_conv_out")
        provenance(
            conv,
            node.name or base,
            f"Flatten {fmt(m.in_shape)} + Gemm {g.in_features}->{g.out_features}",
        )
        out = ir.node("Flatten", [conv.outputs[0]], {"axis": 1}, name=ctx.unique(f"{base}_to_nc"))
        out.metadata_props[LAYOUT_KEY] = (
            "exit:flat" if len(spatial) == 2 else f"exit:f{len(spatial)}"
        )
        ir.convenience.replace_nodes_and_values(
            ctx.graph, node, [node], [conv, out], node.outputs, out.outputs
        )
        if not m.flatten.outputs[0].uses() and not m.flatten.outputs[0].is_graph_output():
            ctx.graph.remove(m.flatten, safe=True)
        drop_if_unused(ctx, b, c)
        return f"Conv {fmt(spatial)} {m.in_shape[0]}->{g.out_features}"
