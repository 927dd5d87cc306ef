"""``to_linear`` fuses the ane layout's ReduceMean-based channel norm back into
``LayerNormalization`` (opset >= 17, the same epsilon), and leaves a norm it cannot read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _onnx_helpers import F32_EPS, init, model, op_counts, reference64, run_ort, vinfo
from onnx import helper

from fc2conv.onnx import to_conv, to_linear


def _block(rng: np.random.Generator, eps: float, bias: bool) -> onnx.ModelProto:
    """``LayerNorm(x @ W + x)`` on ``(B, S, 12)``, then another MatMul and a residual (so
    that the ane layout keeps the norm's weight and bias: they are not read by Convs only)."""
    c = 12
    inits = [init(rng, "w0", c, c), init(rng, "w1", c, c), init(rng, "g", c)]
    ln_in = ["r", "g"]
    if bias:
        inits.append(init(rng, "b", c))
        ln_in.append("b")
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]),
             helper.make_node("Add", ["a", "x"], ["r"]),
             helper.make_node("LayerNormalization", ln_in, ["n"], axis=-1, epsilon=eps),
             helper.make_node("MatMul", ["n", "w1"], ["o"]),
             helper.make_node("Add", ["o", "n"], ["y"])]
    return model(nodes, [vinfo("x", [2, 5, c])], [vinfo("y", [2, 5, c])], inits, opset=18)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_round_trip_gives_layer_normalization_back(eps: float, bias: bool) -> None:
    rng = np.random.default_rng(int(bias) + int(eps * 1e5))
    m = _block(rng, eps, bias)
    conv = to_conv(m, layout="ane")
    assert op_counts(conv)["LayerNormalization"] == 0  # written over axis 1 there
    back = to_linear(conv)
    counts = op_counts(back)
    assert counts["LayerNormalization"] == 1 and counts["ReduceMean"] == 0, counts
    norm = next(n for n in back.graph.node if n.op_type == "LayerNormalization")
    attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
    assert attrs["epsilon"] == np.float32(eps) and attrs.get("axis", -1) == -1
    # no bias: the ane layout moved it into the residual's Conv (MatMul + bias now), since
    # the residual adds a Conv's output (ane_fold.fold_shifts_into_residuals)
    assert len(norm.input) == 2
    feeds = {"x": rng.standard_normal((2, 5, 12)).astype(np.float32)}
    ref = reference64(m, feeds)[0]
    out = run_ort(back, feeds)[0]
    assert float(np.abs(out - ref).max()) <= 64 * F32_EPS * 12 * max(1.0, float(np.abs(ref).max()))


def test_a_norm_read_elsewhere_is_left() -> None:
    """The centred value also read by another op: fusing would drop that reader's input."""
    import onnx_ir as ir

    from fc2conv.onnx.rules.norm_back import _match
    c = 6
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["y0"]),
             helper.make_node("Add", ["y0", "d"], ["y"])]  # d read again
    eps = onnx.numpy_helper.from_array(np.asarray(1e-5, np.float32), "eps")
    m = model(nodes, [vinfo("x", [2, c])], [vinfo("y", [2, c])], [eps], opset=17)
    graph = ir.serde.deserialize_model(m).graph
    div = next(n for n in graph if n.op_type == "Div")
    assert _match(div) is None
