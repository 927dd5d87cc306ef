"""--to linear: 1x1 Conv (any groups) -> MatMul(+Add) on a channels-last view, and round trips."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_matches_reference, init, model, op_counts, vinfo
from onnx import helper

import fc2conv.onnx as fo


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_grouped_1x1_conv_to_matmul(groups: int, bias: bool, spatial: int) -> None:
    rng = np.random.default_rng()
    c_in, c_out = 8, 12
    inputs = ["x", "W"] + (["B"] if bias else [])
    inits = [init(rng, "W", c_out, c_in // groups, *([1] * spatial))]
    if bias:
        inits.append(init(rng, "B", c_out))
    node = helper.make_node(
        "Conv", inputs, ["y"], name="pw", group=groups, kernel_shape=[1] * spatial
    )
    sp = ["H", "W", "D"][:spatial]
    m = model([node], [vinfo("x", ["N", c_in, *sp])], [vinfo("y", ["N", c_out, *sp])], inits)
    converted, report = fo.convert(m, "linear")
    onnx.checker.check_model(converted, full_check=True)
    expected = {"Transpose": 2, "MatMul": 1} | ({"Add": 1} if bias else {})
    assert op_counts(converted) == expected
    w = next(i for i in converted.graph.initializer if i.name == "W_linear")
    dense = onnx.numpy_helper.to_array(w)
    assert dense.shape == (c_in, c_out)
    assert np.count_nonzero(dense) == c_in * c_out // groups  # block-diagonal, exact zeros
    shape = [int(s) for s in rng.integers(1, 4, spatial)]
    x = rng.standard_normal((2, c_in, *shape)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=c_in + 1)
    assert report.converted[0].detail.startswith("MatMul 8->12")


@pytest.mark.parametrize(
    "attrs,why",
    [
        ({"kernel_shape": [3, 3]}, "3x3 kernel"),
        ({"kernel_shape": [1, 1], "strides": [2, 2]}, "stride"),
        ({"kernel_shape": [1, 1], "pads": [1, 1, 1, 1]}, "padding"),
    ],
)
def test_convs_that_are_not_per_position_are_left_with_a_reason(attrs, why) -> None:
    rng = np.random.default_rng()
    k = attrs["kernel_shape"]
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c", **attrs)
    m = model(
        [node],
        [vinfo("x", [1, 4, 6, 6])],
        [vinfo("y", [1, 4, "h", "w"])],
        [init(rng, "W", 4, 4, *k)],
    )
    converted, report = fo.convert(m, "linear")
    assert op_counts(converted) == {"Conv": 1}
    assert report.left[0].node == "c" and why in report.left[0].detail


def test_stack_of_pointwise_convs_shares_transposes_and_round_trips() -> None:
    rng = np.random.default_rng()
    nodes = [
        helper.make_node("Conv", ["x", "W0", "B0"], ["c0"], name="pw0", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Mul", ["r0", "scale"], ["m0"]),
        helper.make_node("Conv", ["m0", "W1"], ["c1"], name="pw1", kernel_shape=[1, 1], group=2),
        helper.make_node("Tanh", ["c1"], ["y"]),
    ]
    inits = [
        init(rng, "W0", 6, 4, 1, 1),
        init(rng, "B0", 6),
        init(rng, "scale", 6, 1, 1),
        init(rng, "W1", 6, 3, 1, 1),
    ]
    m = model(nodes, [vinfo("x", ["N", 4, "H", "W"])], [vinfo("y", ["N", 6, "H", "W"])], inits)
    linear, _ = fo.convert(m, "linear")
    onnx.checker.check_model(linear, full_check=True)
    assert "scale_linear" in {i.name for i in linear.graph.initializer}  # moved to channels-last
    assert op_counts(linear) == {
        "Transpose": 2,
        "MatMul": 2,
        "Add": 1,
        "Relu": 1,
        "Mul": 1,
        "Tanh": 1,
    }
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    assert_matches_reference(m, linear, {"x": x}, depth=12)
    back, _ = fo.convert(linear, "conv")
    onnx.checker.check_model(back, full_check=True)
    assert op_counts(back) == {"Conv": 2, "Relu": 1, "Mul": 1, "Tanh": 1}  # no Transpose left
    assert_matches_reference(m, back, {"x": x}, depth=12)


def test_float16_model_keeps_its_dtype() -> None:
    rng = np.random.default_rng()
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="pw", kernel_shape=[1, 1])
    m = model(
        [node],
        [vinfo("x", ["N", 8, 2, 2], onnx.TensorProto.FLOAT16)],
        [vinfo("y", ["N", 4, 2, 2], onnx.TensorProto.FLOAT16)],
        [init(rng, "W", 4, 8, 1, 1, dtype=np.float16), init(rng, "B", 4, dtype=np.float16)],
    )
    converted = fo.to_linear(m)
    onnx.checker.check_model(converted, full_check=True)
    assert {i.data_type for i in converted.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x = rng.standard_normal((3, 8, 2, 2)).astype(np.float16)
    from _onnx_helpers import reference64, run_ort

    ref = reference64(m, {"x": x.astype(np.float32)})[0]
    (got,) = run_ort(converted, {"x": x})
    assert got.dtype == np.float16
    tol = 4 * float(np.finfo(np.float16).eps) * 9 * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got.astype(np.float64) - ref).max()) <= tol


def test_dynamic_spatial_is_refused_for_to_linear() -> None:
    rng = np.random.default_rng()
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[1, 1])
    m = model(
        [node], [vinfo("x", [1, 2, 3, 3])], [vinfo("y", [1, 2, 3, 3])], [init(rng, "W", 2, 2, 1, 1)]
    )
    with pytest.raises(ValueError, match="dynamic_spatial applies to --to conv"):
        fo.convert(m, "linear", dynamic_spatial=True)
