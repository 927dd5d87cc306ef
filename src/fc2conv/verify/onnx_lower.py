"""Float64 convolutions onnxruntime can run: ``Conv`` rewritten as slices and one ``MatMul``.

onnxruntime's CPU provider has no float64 ``Conv`` kernel, which sent every CNN's float64 twin
to onnx's reference evaluator, one numpy/torch call per op and per draw. The same sums are a
``MatMul`` over the input's patches (im2col), which onnxruntime runs in float64:

    Xp = Pad(X, pads)                                    (N, C, *P)
    cols[n, c, k, *i] = Xp[n, c, s*i + d*k]              one strided Slice per kernel offset k
    cols -> (N, g, C/g * K, L)                           K = prod(kernel), L = prod(out)
    Y = W.reshape(g, O/g, C/g * K) @ cols                (N, g, O/g, L)
    Y -> (N, O, L) + B[:, None] -> (N, O, *out)

i.e. ``y[n, o, i] = b[o] + sum_{c, k} W[o, c, k] x[n, c, s*i + d*k - p]``, the definition of
ONNX ``Conv``, summed in float64 (in another order than a direct convolution: irrelevant at
float64 for a reference of float32 models). The slice for offset ``k`` along an axis of padded
size ``P`` starts at ``d k`` and ends ``d (K - 1 - k)`` before the end, with step ``s``: it
holds ``floor((P - d (K - 1) - 1) / s) + 1`` elements, the output size, for any input size.

Rewritten: ``Conv`` nodes whose weight is a float64 initializer (its shape known), with explicit
``pads`` or ``auto_pad`` ``NOTSET``/``VALID`` and 1-3 spatial axes; others are left as they
are (onnxruntime then refuses the graph and the next engine runs it). The patches take ``K``
times the input's memory for the duration of one node.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

_END = (1 << 63) - 1


def convs_as_matmuls(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` with its lowerable float64 ``Conv`` nodes rewritten (see module
    docstring), and how many were. A ``Conv`` whose weight is float32 or float16 (the float32
    magnitude twin's) is kept: onnxruntime has those kernels."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer
            if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = list(g.node)
    del g.node[:]
    count = 0
    for k, node in enumerate(nodes):
        lowered = _lower(node, dims, f"__conv{k}", g) if node.op_type == "Conv" and \
            node.domain in ("", "ai.onnx") else None
        if lowered is None:
            g.node.append(node)
        else:
            g.node.extend(lowered)
            count += 1
    return out, count


def _const(graph: Any, name: str, values: list[int]) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def _lower(node: Any, dims: dict[str, list[int]], tag: str, graph: Any) -> list[Any] | None:
    if len(node.input) < 2 or node.input[1] not in dims:
        return None
    w = dims[node.input[1]]
    nd = len(w) - 2
    if nd not in (1, 2, 3):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    kernel = list(attrs.get("kernel_shape", w[2:]))
    if kernel != w[2:]:
        return None
    pads = [0] * (2 * nd) if auto_pad == "VALID" else list(attrs.get("pads", [0] * (2 * nd)))
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    group = int(attrs.get("group", 1))
    o, cg = w[0], w[1]
    if group < 1 or o % group:
        return None
    kprod = 1
    for kk in kernel:
        kprod *= kk
    x, y = node.input[0], node.output[0]
    nodes = []
    if any(pads):
        _const(graph, f"{tag}_pads", [0, 0, *pads[:nd], 0, 0, *pads[nd:]])
        nodes.append(helper.make_node("Pad", [x, f"{tag}_pads"], [f"{tag}_xp"]))
        x = f"{tag}_xp"
    axes = _const(graph, f"{tag}_axes", list(range(2, 2 + nd)))
    steps = _const(graph, f"{tag}_steps", strides)
    _const(graph, f"{tag}_ax2", [2])
    slices = []
    for i, offset in enumerate(itertools.product(*(range(kk) for kk in kernel))):
        starts = [d * kk for d, kk in zip(dil, offset, strict=True)]
        ends = [-(d * (kk_all - 1 - kk)) or _END
                for d, kk, kk_all in zip(dil, offset, kernel, strict=True)]
        s_name, e_name = (_const(graph, f"{tag}_s{i}", starts),
                          _const(graph, f"{tag}_e{i}", ends))
        nodes.append(helper.make_node("Slice", [x, s_name, e_name, axes, steps],
                                      [f"{tag}_sl{i}"]))
        nodes.append(helper.make_node("Unsqueeze", [f"{tag}_sl{i}", f"{tag}_ax2"],
                                      [f"{tag}_u{i}"]))
        slices.append(f"{tag}_u{i}")
    cols = f"{tag}_cols"
    nodes.append(helper.make_node("Concat", slices, [cols], axis=2) if len(slices) > 1
                 else helper.make_node("Identity", slices, [cols]))
    _const(graph, f"{tag}_colshape", [0, group, cg * kprod, -1])
    _const(graph, f"{tag}_wshape", [group, o // group, cg * kprod])
    _const(graph, f"{tag}_yshape", [0, o, -1])
    _const(graph, f"{tag}_head", [0, o])
    nodes += [
        helper.make_node("Reshape", [cols, f"{tag}_colshape"], [f"{tag}_cols2"]),
        helper.make_node("Reshape", [node.input[1], f"{tag}_wshape"], [f"{tag}_w"]),
        helper.make_node("MatMul", [f"{tag}_w", f"{tag}_cols2"], [f"{tag}_prod"]),
        helper.make_node("Reshape", [f"{tag}_prod", f"{tag}_yshape"], [f"{tag}_flat"]),
    ]
    flat = f"{tag}_flat"
    if len(node.input) > 2 and node.input[2]:
        _const(graph, f"{tag}_bshape", [o, 1])
        nodes += [helper.make_node("Reshape", [node.input[2], f"{tag}_bshape"], [f"{tag}_b"]),
                  helper.make_node("Add", [flat, f"{tag}_b"], [f"{tag}_biased"])]
        flat = f"{tag}_biased"
    _const(graph, f"{tag}_two", [2])
    _const(graph, f"{tag}_last", [_END])
    nodes += [
        helper.make_node("Shape", [f"{tag}_sl0"], [f"{tag}_sshape"]),
        helper.make_node("Slice", [f"{tag}_sshape", f"{tag}_two", f"{tag}_last"],
                         [f"{tag}_spatial"]),
        helper.make_node("Concat", [f"{tag}_head", f"{tag}_spatial"], [f"{tag}_oshape"],
                         axis=0),
        helper.make_node("Reshape", [flat, f"{tag}_oshape"], [y]),
    ]
    return nodes
