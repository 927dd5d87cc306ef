"""1x1 Conv -> MatMul (+ Add) on a channels-last view (``--to linear``).

A Conv with a ``1x1...`` kernel ``K`` of shape ``(O, C/g, 1, ...)``, stride 1, no padding and
``g`` groups applies one Linear at every position: ``W = diag(K_1, ..., K_g)`` of shape
``(O, C)``, block diagonal with exact zeros off the blocks
(:func:`fc2conv.onnx.weights.conv_kernel_to_linear`, mirroring
:func:`fc2conv.core.conv_to_linear`)::

    B = W.T  (C, O)            Y = Transpose(MatMul(Transpose(X, to NHWC), B) + bias, to NCHW)

Consecutive rewritten convs share their Transposes (:mod:`fc2conv.onnx.rules.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
from fc2conv.onnx.rules.layout import enter_linear, exit_linear, kind_of
from fc2conv.onnx.weights import conv_kernel_to_linear


@dataclass
class ConvMatch:
    node: ir.Node
    weight: ir.TensorProtocol
    bias: ir.TensorProtocol | None
    groups: int
    rank: int


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.value]


class ConvToMatMul:
    name = "conv_to_matmul"
    op_types = ("Conv",)

    def check(self, node: ir.Node, ctx: Context) -> ConvMatch:
        x = node.inputs[0]
        assert x is not None
        weight = constant(node.inputs[1], "Conv weight 'W'")
        kernel = list(weight.shape)[2:]
        if any(k != 1 for k in kernel):
            raise Refused(
                f"its {'x'.join(map(str, kernel))} kernel mixes neighbouring positions, "
                f"so it is not one Linear per position"
            )
        if any(s != 1 for s in _ints(node, "strides") or []):
            raise Refused(f"its stride {_ints(node, 'strides')} skips positions")
        if any(p != 0 for p in _ints(node, "pads") or []):
            raise Refused(
                f"its padding {_ints(node, 'pads')} adds border positions that see only padding"
            )
        check_dtype(x, "its input")
        rank = len(kernel) + 2
        kind_of(rank)
        groups_attr = node.attributes.get("group")
        groups = 1 if groups_attr is None else int(groups_attr.value)
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant(node.inputs[2], "Conv bias 'B'")
        return ConvMatch(node, weight, bias, groups, rank)

    def rewrite(self, m: ConvMatch, ctx: Context) -> str:
        node = m.node
        base = node.name or node.outputs[0].name or "conv"
        w_value = node.inputs[1]
        b_value = node.inputs[2] if len(node.inputs) > 2 else None
        assert w_value is not None and node.inputs[0] is not None
        out_ch, in_ch = dims(m.weight)[0], dims(m.weight)[1] * m.groups
        matrix = new_initializer(
            ctx,
            f"{w_value.name}_linear",
            lambda: conv_kernel_to_linear(m.weight.numpy(), m.groups).T,
            m.weight.dtype,
            (in_ch, out_ch),
            [m.weight],
            recipe=("conv_to_matmul", m.groups),
        )
        into = enter_linear(ctx, node.inputs[0], m.rank, f"{base}_to_nhwc")
        matmul = ir.node("MatMul", [into.outputs[0], matrix], name=ctx.unique(f"{base}_linear"))
        matmul.outputs[0].name = ctx.unique(f"{base}_linear_out")
        origin = f"Conv 1x1 {in_ch}->{out_ch}" + (f", groups {m.groups}" if m.groups > 1 else "")
        provenance(matmul, node.name or base, origin)
        new_nodes = [into, matmul]
        last = matmul.outputs[0]
        if m.bias is not None:
            assert b_value is not None
            bias_t = m.bias
            bias = new_initializer(
                ctx,
                f"{b_value.name}_linear",
                bias_t.numpy,
                m.bias.dtype,
                (out_ch,),
                [bias_t],
                recipe=("bias",),
            )
            add = ir.node("Add", [last, bias], name=ctx.unique(f"{base}_linear_bias"))
            add.outputs[0].name = ctx.unique(f"{base}_linear_bias_out")
            provenance(add, node.name or base, origin)
            new_nodes.append(add)
            last = add.outputs[0]
        out = exit_linear(ctx, last, m.rank, f"{base}_to_nchw")
        new_nodes.append(out)
        ir.convenience.replace_nodes_and_values(
            ctx.graph, node, [node], new_nodes, node.outputs, out.outputs
        )
        drop_if_unused(ctx, w_value, b_value)
        dense = f"MatMul {in_ch}->{out_ch}" + (" + Add" if m.bias is not None else "")
        return dense + (" (block-diagonal)" if m.groups > 1 else "")
