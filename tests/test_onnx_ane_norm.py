"""``to_conv(layout="ane")`` writes a channel norm's variance as one ``ReduceSumSquare`` with
``C eps`` and ``sqrt(C) w`` (``onnx/rules/ane_norm.py``), and the attention product's Einsum
with the operand whose free label leads the output first (``onnx/rules/ane_heads.py``):

* LayerNorm and the RMSNorm forms exporters write (``Pow``/``Mul`` square, ``Div(1, s)`` or
  ``Reciprocal`` then ``Mul``, or ``Div(x, s)``) with a weight become the one-reduction form;
  a norm without a weight keeps its form (``sqrt(C)`` would need an op of its own);
* the results match the float64 reference of the original (onnx's reference evaluator) at
  opsets 17 (axes as attribute) and 18 (axes as input), as do ``to_linear``'s, which fuses the
  LayerNorm back into ``LayerNormalization`` and keeps the original's Transposes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_matches_reference, init, model, op_counts, vinfo
from onnx import helper, numpy_helper

from fc2conv.onnx import convert

B, S, C, H = 2, 5, 16, 4
D = C // H


def _mean(n, src: str, out: str, opset: int) -> onnx.NodeProto:
    if opset >= 18:
        return n("ReduceMean", [src, "ax"], [out], keepdims=1)
    return n("ReduceMean", [src], [out], axes=[-1], keepdims=1)


def _norms(rng: np.random.Generator, opset: int) -> onnx.ModelProto:
    """Four RMSNorm forms on ``h = x @ w6`` (three with a weight), one with a weight on ``x``
    itself (as it enters the layout), a LayerNorm read by a MatMul and by a residual, each
    followed by a MatMul."""
    inits = [init(rng, f"w{i}", C, C) for i in range(8)]
    inits += [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(C)).astype(np.float32),
                                      f"g{i}") for i in range(5)]
    inits += [init(rng, "lb", C)]
    inits += [numpy_helper.from_array(np.asarray(v, dtype), name) for name, v, dtype in (
        ("two", 2.0, np.float32), ("one", 1.0, np.float32), ("eps", 1e-6, np.float32),
        ("ax", [-1], np.int64))]
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w6"], ["h"]),
        # Pow, Div(1, s), Mul(h, r), weight
        n("Pow", ["h", "two"], ["a0"]), _mean(n, "a0", "a1", opset),
        n("Add", ["a1", "eps"], ["a2"]),
        n("Sqrt", ["a2"], ["a3"]), n("Div", ["one", "a3"], ["a4"]), n("Mul", ["h", "a4"], ["a5"]),
        n("Mul", ["g0", "a5"], ["a6"]), n("MatMul", ["a6", "w0"], ["y0"]),
        # Mul square, Reciprocal, Mul(r, h), a same-type Cast, weight
        n("Mul", ["h", "h"], ["b0"]), _mean(n, "b0", "b1", opset), n("Add", ["eps", "b1"], ["b2"]),
        n("Sqrt", ["b2"], ["b3"]), n("Reciprocal", ["b3"], ["b4"]), n("Mul", ["b4", "h"], ["b5"]),
        n("Cast", ["b5"], ["b6"], to=onnx.TensorProto.FLOAT), n("Mul", ["b6", "g1"], ["b7"]),
        n("MatMul", ["b7", "w1"], ["y1"]),
        # Div(h, s), weight
        n("Pow", ["h", "two"], ["c0"]), _mean(n, "c0", "c1", opset),
        n("Add", ["c1", "eps"], ["c2"]),
        n("Sqrt", ["c2"], ["c3"]), n("Div", ["h", "c3"], ["c4"]), n("Mul", ["c4", "g2"], ["c5"]),
        n("MatMul", ["c5", "w2"], ["y2"]),
        # no weight: kept
        n("Pow", ["h", "two"], ["d0"]), _mean(n, "d0", "d1", opset),
        n("Add", ["d1", "eps"], ["d2"]),
        n("Sqrt", ["d2"], ["d3"]), n("Div", ["h", "d3"], ["d4"]), n("MatMul", ["d4", "w3"], ["y3"]),
        # a post-LN: read by a MatMul and by the residual
        n("MatMul", ["x", "w4"], ["e0"]),
        n("LayerNormalization", ["e0", "g3", "lb"], ["e1"], axis=-1, epsilon=1e-5),
        n("MatMul", ["e1", "w5"], ["e2"]), n("Add", ["e1", "e2"], ["y4"]),
        # a weighted norm of x as it enters the layout: kept (module docstring of ane_norm)
        n("Pow", ["x", "two"], ["f0"]), _mean(n, "f0", "f1", opset),
        n("Add", ["f1", "eps"], ["f2"]),
        n("Sqrt", ["f2"], ["f3"]), n("Div", ["x", "f3"], ["f4"]), n("Mul", ["f4", "g4"], ["f5"]),
        n("MatMul", ["f5", "w7"], ["y5"]),
    ]
    outs = [vinfo(f"y{i}", [B, S, C]) for i in range(6)]
    return model(nodes, [vinfo("x", [B, S, C])], outs, inits, opset=opset)


def _squares_averaged(m: onnx.ModelProto) -> int:
    """ReduceMeans of a square (``Pow(v, 2)`` or ``Mul(v, v)``)."""
    producer = {o: node for node in m.graph.node for o in node.output}
    count = 0
    for node in m.graph.node:
        src = producer.get(node.input[0]) if node.op_type == "ReduceMean" else None
        if src is not None and (src.op_type == "Pow" or (
                src.op_type == "Mul" and src.input[0] == src.input[1])):
            count += 1
    return count


@pytest.mark.parametrize("opset", [17, 18])
def test_weighted_norms_take_one_sum_of_squares(opset: int) -> None:
    rng = np.random.default_rng(5)
    m = _norms(rng, opset)
    conv, _ = convert(m, "conv", layout="ane")
    counts = op_counts(conv)
    assert counts["ReduceSumSquare"] == 4, counts  # three weighted RMSNorms and the LayerNorm
    assert _squares_averaged(conv) == 2  # the norm without a weight, the one of x as it enters
    assert counts["Pow"] == 2 and counts["Transpose"] == op_counts(m)["Transpose"] + 1 + 6
    for seed in (6, 7):
        x = np.random.default_rng(seed).standard_normal((B, S, C)).astype(np.float32) * 3
        assert_matches_reference(m, conv, {"x": x}, depth=2 * C)
    back, _ = convert(conv, "linear")
    back_counts = op_counts(back)
    assert back_counts["LayerNormalization"] == 1 and back_counts["Conv"] == 0, back_counts
    assert back_counts["Transpose"] == 0 and back_counts["ReduceSumSquare"] == 3
    for seed in (8, 9):
        x = np.random.default_rng(seed).standard_normal((B, S, C)).astype(np.float32)
        assert_matches_reference(m, back, {"x": x}, depth=2 * C)


def test_the_sum_of_squares_keeps_tiny_and_large_rows() -> None:
    """Rows far below and far above eps's scale: ``C eps`` keeps its share of the sum (no
    cancellation, unlike ``E[x^2] - E[x]^2``)."""
    rng = np.random.default_rng(15)
    m = _norms(rng, 18)
    conv, _ = convert(m, "conv", layout="ane")
    x = rng.standard_normal((B, S, C)).astype(np.float32)
    x[0] *= 1e-4
    x[1] *= 1e3
    assert_matches_reference(m, conv, {"x": x}, depth=2 * C)


def _attention(rng: np.random.Generator) -> onnx.ModelProto:
    inits = [init(rng, f"w{p}", C, C) for p in "qkvo"]
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), name) for name, v in (
        ("split", [B, S, H, D]), ("merge", [B, S, C]))]
    n = helper.make_node
    nodes = [n("MatMul", ["x", f"w{p}"], [f"{p}0"]) for p in "qkv"]
    nodes += [n("Reshape", [f"{p}0", "split"], [f"{p}1"]) for p in "qkv"]
    nodes += [
        n("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
        n("MatMul", ["q", "kt"], ["s"]), n("Softmax", ["s"], ["p"], axis=-1),
        n("MatMul", ["p", "v"], ["o0"]), n("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
        n("Reshape", ["o1", "merge"], ["o2"]), n("MatMul", ["o2", "wo"], ["y"]),
    ]
    return model(nodes, [vinfo("x", [B, S, C])], [vinfo("y", [B, S, C])], inits, opset=17)


def test_the_attention_product_puts_the_values_first() -> None:
    """``out'[b,h,d,q] = sum_k V'[b,h,d,k] P[b,h,q,k]``: ``V'`` (whose free label ``d`` leads
    the output) is the Einsum's first operand, so onnxruntime copies only ``P``."""
    rng = np.random.default_rng(25)
    m = _attention(rng)
    conv, _ = convert(m, "conv", layout="ane")
    producer = {o: node for node in conv.graph.node for o in node.output}
    einsums = [node for node in conv.graph.node if node.op_type == "Einsum"]
    assert len(einsums) == 2
    for node in einsums:
        equation = helper.get_attribute_value(node.attribute[0]).decode()
        (left, right), out = equation.split("->")[0].split(","), equation.split("->")[1]
        free_left = (set(left) - set(right)).pop()
        assert out.index(free_left) < out.index((set(right) - set(left)).pop()), equation
    product = next(node for node in einsums if producer[node.input[1]].op_type == "Softmax")
    assert producer[product.input[0]].op_type == "Reshape"  # V', the head view of a Conv
    for seed in (26, 27):
        x = np.random.default_rng(seed).standard_normal((B, S, C)).astype(np.float32)
        assert_matches_reference(m, conv, {"x": x}, depth=3 * C)
    back, _ = convert(conv, "linear")
    assert op_counts(back)["Transpose"] == op_counts(m)["Transpose"]
    x = rng.standard_normal((B, S, C)).astype(np.float32)
    assert_matches_reference(m, back, {"x": x}, depth=3 * C)
