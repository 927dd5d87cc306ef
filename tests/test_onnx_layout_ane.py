"""``fc2conv.onnx.to_conv(m, layout="ane")`` on a hand-built pre-LN encoder block (the ops
exporters write: MatMul + Add, Reshape/Transpose head split, scaled Q K^T, additive mask,
Softmax, P V, head merge, residual adds, LayerNormalization, an RMSNorm written with
Pow/ReduceMean/Sqrt/Div, Gelu): every MatMul by a weight becomes a Conv2d on (B, C, 1, S),
the graph changes layout once in and once out (the block's own head-split Transposes are
gone), and the result matches the float64 reference of the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_matches_reference, init, model, op_counts, vinfo
from onnx import helper, numpy_helper

from fc2conv.errors import Fc2ConvError
from fc2conv.onnx import convert, to_conv

B, S, C, H, F = 2, 6, 12, 3, 20
D = C // H


def _const(name: str, values: list[int] | np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def _block(rng: np.random.Generator) -> onnx.ModelProto:
    inits = [init(rng, n, C, C) for n in ("wq", "wk", "wv", "wo")]
    inits += [init(rng, n, C) for n in ("bq", "bk", "bv", "bo", "ln_w", "ln_b", "rms_w")]
    inits += [init(rng, "w1", C, F), init(rng, "b1", F), init(rng, "w2", F, C)]
    inits += [_const("split", [B, S, H, D]), _const("merge", [B, S, C]),
              _const("scale", np.float32(D ** -0.5)), _const("two", np.float32(2.0)),
              _const("eps", np.float32(1e-5)), _const("ax", [-1])]
    n = helper.make_node
    nodes = [n("LayerNormalization", ["x", "ln_w", "ln_b"], ["h"], axis=-1, epsilon=1e-5)]
    for p in "qkv":
        nodes += [n("MatMul", ["h", f"w{p}"], [f"{p}0"]), n("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                  n("Reshape", [f"{p}1", "split"], [f"{p}2"])]
    nodes += [
        n("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v2"], ["v"], perm=[0, 2, 1, 3]),
        n("MatMul", ["q", "kt"], ["s0"]), n("Mul", ["s0", "scale"], ["s1"]),
        n("Add", ["s1", "mask"], ["s2"]), n("Softmax", ["s2"], ["p"], axis=-1),
        n("MatMul", ["p", "v"], ["o0"]), n("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
        n("Reshape", ["o1", "merge"], ["o2"]), n("MatMul", ["o2", "wo"], ["o3"]),
        n("Add", ["bo", "o3"], ["o4"]), n("Add", ["x", "o4"], ["r1"]),
        # RMSNorm as Llama/T5 export it
        n("Pow", ["r1", "two"], ["sq"]), n("ReduceMean", ["sq", "ax"], ["ms"], keepdims=1),
        n("Add", ["ms", "eps"], ["ms1"]), n("Sqrt", ["ms1"], ["rms"]),
        n("Div", ["r1", "rms"], ["nr"]), n("Mul", ["rms_w", "nr"], ["h2"]),
        n("MatMul", ["h2", "w1"], ["f0"]), n("Add", ["f0", "b1"], ["f1"]),
        n("Gelu", ["f1"], ["f2"]), n("MatMul", ["f2", "w2"], ["f3"]),
        n("Add", ["r1", "f3"], ["y"]),
    ]
    inputs = [vinfo("x", [B, S, C]), vinfo("mask", [B, 1, 1, S])]
    return model(nodes, inputs, [vinfo("y", [B, S, C])], inits, opset=20)


def _feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    mask = np.zeros((B, 1, 1, S), np.float32)
    mask[-1, ..., S - 2:] = -1e4  # one padded sequence
    return {"x": rng.standard_normal((B, S, C)).astype(np.float32), "mask": mask}


def test_encoder_block_stays_in_the_ane_layout() -> None:
    rng = np.random.default_rng(0)
    m = _block(rng)
    conv, report = convert(m, "conv", layout="ane")
    counts = op_counts(conv)
    assert counts["Conv"] == 6 and counts["MatMul"] == 0 and counts["Einsum"] == 2
    assert all(len(node.input) < 2 or "ane" not in node.name or node.op_type != "Conv"
               or len(numpy_helper.to_array(next(
                   t for t in conv.graph.initializer if t.name == node.input[1])).shape) == 4
               for node in conv.graph.node)
    assert counts["Transpose"] == 2, report.layout_changes  # one move in, one out
    assert report.transposes_before == 4 and report.transposes_after == 2
    assert len(report.layout_changes) == 2 and "reads input x" in report.layout_changes[0]
    assert {e.detail for e in report.converted} >= {"Conv2d 1x1 12->12 on (B, C, 1, S) + bias"}
    onnx.checker.check_model(conv, full_check=True)
    for seed in (1, 2):
        assert_matches_reference(m, conv, _feeds(np.random.default_rng(seed)), depth=4 * F)


def test_default_layout_is_unchanged_and_ane_is_opt_in() -> None:
    m = _block(np.random.default_rng(0))
    default = to_conv(m)
    assert op_counts(default)["Einsum"] == 0  # Conv1d on (B, C, S) between Transposes
    with pytest.raises(Fc2ConvError, match="layout must be one of"):
        to_conv(m, layout="nchw")
    with pytest.raises(Fc2ConvError, match="conv direction"):
        convert(m, "linear", layout="ane")


def test_a_foreign_reader_gets_the_layout_back() -> None:
    """An op outside the table (TopK) reads an activation: it gets it in (B, S, C), moved back
    once, and the rest still runs in the conv layout."""
    rng = np.random.default_rng(3)
    inits = [init(rng, "w", C, C), init(rng, "w2", C, C), _const("k", [2])]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w"], ["a"]), n("Relu", ["a"], ["b"]),
             n("TopK", ["b", "k"], ["top", "idx"], axis=-1), n("MatMul", ["b", "w2"], ["y"])]
    m = model(nodes, [vinfo("x", [B, S, C])],
              [vinfo("y", [B, S, C]), vinfo("top", [B, S, 2])], inits, opset=17)
    conv, report = convert(m, "conv", layout="ane")
    assert op_counts(conv)["Transpose"] == 3, report.layout_changes  # in; out to TopK and y
    assert any("TopK" in c for c in report.layout_changes)
    assert_matches_reference(m, conv, {"x": rng.standard_normal((B, S, C)).astype(np.float32)},
                             depth=2 * C)


@pytest.mark.parametrize("layout", ["channels_first", "ane"])
def test_a_models_own_transposes_cancel_against_the_convs_moves(layout: str) -> None:
    """NCHW -> NHWC, a pointwise MatMul + bias, NHWC -> NCHW (a channels-last dense layer in
    an NCHW model): the Conv reads the NCHW input directly, no Transpose is left."""
    rng = np.random.default_rng(5)
    n = helper.make_node
    nodes = [n("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]), n("MatMul", ["t", "w"], ["a"]),
             n("Add", ["a", "b"], ["c"]), n("Transpose", ["c"], ["y"], perm=[0, 3, 1, 2])]
    m = model(nodes, [vinfo("x", [2, 6, 5, 4])], [vinfo("y", [2, 3, 5, 4])],
              [init(rng, "w", 6, 3), init(rng, "b", 3)])
    conv, report = convert(m, "conv", layout=layout)
    assert op_counts(conv) == {"Conv": 1}, report.layout_changes
    assert report.layout_changes == []
    for seed in (6, 7):
        x = np.random.default_rng(seed).standard_normal((2, 6, 5, 4)).astype(np.float32)
        assert_matches_reference(m, conv, {"x": x}, depth=6)


def test_to_linear_undoes_the_ane_layout() -> None:
    """``to_linear`` of the ane block: every 1x1 Conv on (B, C, 1, S) is a MatMul on (B, S, C)
    again and both attention Einsums are MatMuls, with no more Transposes or Reshapes than the
    block had (before: 4 -> 12 Transposes), matching the float64 reference of the block."""
    m = _block(np.random.default_rng(0))
    conv = to_conv(m, layout="ane", verify=False)
    back, report = convert(conv, "linear", verify=False)
    before, after = op_counts(m), op_counts(back)
    assert after["Conv"] == 0 and after["Einsum"] == 0 and after["MatMul"] == before["MatMul"]
    for op in ("Transpose", "Reshape", "Flatten"):
        assert after[op] <= before[op], (op, report.layout_changes)
    assert len(report.converted) == 6 and all("(B, S, C)" in e.detail for e in report.converted)
    assert [o.name for o in back.graph.output] == ["y"]
    onnx.checker.check_model(back, full_check=True)
    for seed in (3, 4):
        assert_matches_reference(m, back, _feeds(np.random.default_rng(seed)), depth=4 * F)
