"""A weight stored transposed and read through a Transpose (``MatMul(x, Transpose(W))``, as
some exporters write a Dense layer) is a constant: to_conv folds it into the conv's weight and
drops the Transpose no one reads any more; one still read elsewhere stays."""

from __future__ import annotations

import numpy as np
from _onnx_helpers import run_ort
from onnx import TensorProto, helper, numpy_helper

from fc2conv.onnx import to_conv, to_linear


def _graph(shared: bool, perm: list[int] | None, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, 7)).astype(np.float32)  # stored (out, in): x @ Wᵀ
    b = rng.standard_normal(5).astype(np.float32)
    attrs = {"perm": perm} if perm is not None else {}
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], **attrs),
             helper.make_node("MatMul", ["x", "Wt"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])]
    if shared:  # the transposed weight is also an output: the Transpose must stay
        outputs.append(helper.make_tensor_value_info("Wt", TensorProto.FLOAT, [7, 5]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7])], outputs,
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, w.astype(np.float64), b.astype(np.float64)


def test_matmul_of_a_transposed_constant_becomes_one_conv_and_the_transpose_goes():
    for seed, perm in ((0, [1, 0]), (1, None)):  # explicit perm and the default (reverse)
        m, w, b = _graph(False, perm, seed)
        conv = to_conv(m)
        ops = [n.op_type for n in conv.graph.node]
        assert "MatMul" not in ops and "Transpose" not in ops, ops
        assert ops.count("Conv") == 1, ops
        x = np.random.default_rng(100 + seed).standard_normal((3, 7)).astype(np.float32)
        want = np.einsum("ni,oi->no", x.astype(np.float64), w) + b  # float64, by hand
        tol = 8 * np.finfo(np.float32).eps * 7 * max(1.0, float(np.abs(want).max()))
        for model in (conv, to_linear(conv)):
            got = run_ort(model, {"x": x})[0].astype(np.float64)
            assert np.abs(got - want).max() <= tol


def test_a_transpose_still_read_elsewhere_stays():
    m, _, _ = _graph(True, [1, 0], 2)
    conv = to_conv(m)
    assert [n.op_type for n in conv.graph.node].count("Transpose") == 1
    assert {o.name for o in conv.graph.output} == {"y", "Wt"}
