"""--to conv on graphs built with onnx.helper: every Gemm attribute combination, MatMul on
rank 2/3/4 (+ Add), Flatten+Gemm after a Conv (fixed and dynamic spatial), layout sharing."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_matches_reference, init, model, op_counts, run_ort, vinfo
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import fc2conv.onnx as fo
from fc2conv.core.provenance import ORIGIN_KEY, SOURCE_KEY

BIASES = ["none", "N", "1N", "scalar"]


def _gemm_model(trans_b: int, alpha: float, beta: float, bias: str, k: int = 6, n: int = 5):
    rng = np.random.default_rng()
    w = init(rng, "W", *((n, k) if trans_b else (k, n)))
    inits, inputs = [w], ["x", "W"]
    if bias != "none":
        shape = {"N": (n,), "1N": (1, n), "scalar": ()}[bias]
        inits.append(init(rng, "C", *shape))
        inputs.append("C")
    attrs = {"transB": trans_b, "alpha": alpha, "beta": beta}
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", **attrs)
    return model([node], [vinfo("x", ["batch", k])], [vinfo("y", ["batch", n])], inits)


@pytest.mark.parametrize(
    "trans_b,alpha,beta,bias", list(itertools.product([0, 1], [1.0, 0.7], [1.0, -1.5], BIASES))
)
def test_gemm_every_attribute_combination(trans_b, alpha, beta, bias) -> None:
    m = _gemm_model(trans_b, alpha, beta, bias)
    converted, report = fo.convert(m, "conv")
    onnx.checker.check_model(converted, full_check=True)
    assert op_counts(converted) == {"Reshape": 1, "Conv": 1, "Flatten": 1}
    assert [e.status for e in report.entries] == ["converted"]
    conv = next(n for n in converted.graph.node if n.op_type == "Conv")
    props = {p.key: p.value for p in conv.metadata_props}
    assert props[SOURCE_KEY] == "fc" and props[ORIGIN_KEY] == "Gemm 6->5"
    assert {i.name for i in converted.graph.initializer} >= {"W_conv"}
    assert "W" not in {i.name for i in converted.graph.initializer}  # weights exist once
    x = np.random.default_rng().standard_normal((3, 6)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=7)
    assert converted.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_gemm_refusals_say_why() -> None:
    rng = np.random.default_rng()
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["a"], name="trans_a", transA=1),
        helper.make_node("Gemm", ["a", "W2", "C"], ["b"], name="row_bias"),
        helper.make_node("Gemm", ["b", "Wdyn"], ["y"], name="dynamic_weight"),
    ]
    m = model(
        nodes,
        [vinfo("x", [4, 3]), vinfo("Wdyn", [4, 2])],
        [vinfo("y", [3, 2])],
        [init(rng, "W", 4, 4), init(rng, "W2", 4, 4), init(rng, "C", 3, 4)],
    )
    converted, report = fo.convert(m, "conv")
    why = {e.node: e.detail for e in report.left}
    assert "transA=1" in why["trans_a"]
    assert "varies per row" in why["row_bias"]
    assert "graph input" in why["dynamic_weight"]
    assert op_counts(converted) == op_counts(m)


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_any_rank_with_dynamic_dims(rank: int, bias: bool) -> None:
    rng = np.random.default_rng()
    lead = ["batch", "seq", "width"][: rank - 1]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if bias else "y"], name="proj")]
    inits = [init(rng, "W", 8, 5)]
    if bias:
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="proj_bias"))
        inits.append(init(rng, "b", 5))
    m = model(nodes, [vinfo("x", [*lead, 8])], [vinfo("y", [*lead, 5])], inits)
    converted, report = fo.convert(m, "conv")
    onnx.checker.check_model(converted, full_check=True)
    counts = op_counts(converted)
    assert counts["Conv"] == 1 and "MatMul" not in counts and "Add" not in counts
    assert counts["Transpose"] == (2 if rank > 2 else 0)
    dims = [
        d.dim_param or d.dim_value for d in converted.graph.output[0].type.tensor_type.shape.dim
    ]
    assert dims == [*lead, 5]
    shape = rng.integers(1, 5, rank - 1).tolist()
    x = rng.standard_normal((*shape, 8)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=9)


def test_consecutive_layers_share_one_layout_change() -> None:
    """4 MatMul layers with pointwise ops between -> one Transpose in, one out (not 8)."""
    rng = np.random.default_rng()
    nodes, inits, cur = [], [], "x"
    for i, act in enumerate(["Relu", "MulC", "Sigmoid", None]):
        nodes += [
            helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias"),
        ]
        inits += [init(rng, f"W{i}", 8, 8), init(rng, f"b{i}", 8)]
        cur = f"a{i}"
        if act == "MulC":  # per-channel constant scale, then a scalar add
            nodes += [
                helper.make_node("Mul", [cur, f"s{i}"], [f"s{i}o"]),
                helper.make_node("Add", [f"c{i}", f"s{i}o"], [f"c{i}o"]),
            ]
            inits += [init(rng, f"s{i}", 8), init(rng, f"c{i}", 1)]
            cur = f"c{i}o"
        elif act:
            nodes.append(helper.make_node(act, [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    m = model(nodes, [vinfo("x", ["B", "T", 8])], [vinfo("y", ["B", "T", 8])], inits)
    converted, report = fo.convert(m, "conv")
    onnx.checker.check_model(converted, full_check=True)
    counts = op_counts(converted)
    assert counts["Conv"] == 4 and counts["Transpose"] == 2, counts
    assert report.layout_changes_shared == 3 and report.transposes_after == 2
    x = rng.standard_normal((2, 7, 8)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=40)


def test_layout_not_shared_across_a_non_pointwise_op() -> None:
    rng = np.random.default_rng()
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
        helper.make_node("Softmax", ["h"], ["s"], axis=-1),
        helper.make_node("MatMul", ["s", "W1"], ["y"], name="fc1"),
    ]
    m = model(
        nodes,
        [vinfo("x", ["B", "T", 4])],
        [vinfo("y", ["B", "T", 4])],
        [init(rng, "W0", 4, 4), init(rng, "W1", 4, 4)],
    )
    converted, _ = fo.convert(m, "conv")
    assert op_counts(converted)["Transpose"] == 4  # Softmax over channels needs channels-last
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=10)


def _cnn(h: int = 8, w: int = 7, flatten: str = "Flatten"):
    rng = np.random.default_rng()
    fnode = (
        helper.make_node("Flatten", ["r"], ["f"], axis=1)
        if flatten == "Flatten"
        else helper.make_node("Reshape", ["r", "shape"], ["f"])
    )
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="features", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        fnode,
        helper.make_node("Gemm", ["f", "w1", "b1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["g1r"]),
        helper.make_node("Gemm", ["g1r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [
        init(rng, "cw", 4, 3, 3, 3),
        init(rng, "cb", 4),
        init(rng, "w1", 10, 4 * (h - 2) * (w - 2)),
        init(rng, "b1", 10),
        init(rng, "w2", 5, 10),
        init(rng, "b2", 5),
    ]
    if flatten != "Flatten":
        inits.append(onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
    return model(nodes, [vinfo("x", ["N", 3, h, w])], [vinfo("y", ["N", 5])], inits)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_flatten_gemm_after_conv_becomes_one_conv(flatten: str) -> None:
    m = _cnn(flatten=flatten)
    converted, report = fo.convert(m, "conv")
    onnx.checker.check_model(converted, full_check=True)
    assert op_counts(converted) == {"Conv": 3, "Relu": 2, "Flatten": 1}
    kernels = [list(n.attribute[0].ints) for n in converted.graph.node if n.op_type == "Conv"]
    assert kernels == [[3, 3], [6, 5], [1, 1]]
    assert [e.detail for e in report.converted] == ["Conv 6x5 4->10", "Conv 1x1 10->5"]
    x = np.random.default_rng().standard_normal((2, 3, 8, 7)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=27 + 120 + 10)


def test_dynamic_spatial_slides_over_a_larger_image() -> None:
    """At (8+3, 7+4) the score map at (i, j) equals the original model on the crop at (i, j)."""
    m = _cnn()
    converted = fo.to_conv(m, dynamic_spatial=True)
    onnx.checker.check_model(converted, full_check=True)
    x = np.random.default_rng().standard_normal((2, 3, 11, 11)).astype(np.float32)
    (score,) = run_ort(converted, {"x": x})
    assert score.shape == (2, 5, 4, 5)
    for i, j in itertools.product(range(4), range(5)):
        crop = np.ascontiguousarray(x[:, :, i : i + 8, j : j + 7])
        assert_matches_reference(m, converted, {"x": crop}, depth=160)
        (ref,) = run_ort(m, {"x": crop})
        np.testing.assert_allclose(score[:, :, i, j], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_only_converts_the_named_node_and_refuses_unknown_names() -> None:
    m = _cnn()
    converted, report = fo.convert(m, "conv", only=["fc2"])
    assert [(e.node, e.status) for e in report.entries] == [("fc1", "left"), ("fc2", "converted")]
    assert op_counts(converted)["Gemm"] == 1
    with pytest.raises(
        fo.Fc2ConvError if hasattr(fo, "Fc2ConvError") else ValueError, match="nope"
    ):
        fo.convert(m, "conv", only=["nope"])


def test_input_model_is_untouched_and_type_is_kept() -> None:
    m = _cnn()
    before = m.SerializeToString()
    out = fo.to_conv(m)
    assert isinstance(out, onnx.ModelProto) and m.SerializeToString() == before
    assert out.opset_import[0].version == 17
    same = fo.to_conv(m, inplace=True)
    assert same is m and op_counts(m)["Gemm"] == 0


def test_a_weight_shared_by_two_layers_is_transformed_once() -> None:
    rng = np.random.default_rng()
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="enc"),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "W"], ["y"], name="enc_again"),
    ]
    m = model(
        nodes, [vinfo("x", ["B", "T", 6])], [vinfo("y", ["B", "T", 6])], [init(rng, "W", 6, 6)]
    )
    converted, report = fo.convert(m, "conv")
    assert len(report.converted) == 2
    assert [i.name for i in converted.graph.initializer] == ["W_conv"]
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=14)


def test_metadata_opset_and_value_names_are_kept() -> None:
    m = _cnn()
    m.producer_name = "unit-test"
    onnx.helper.set_model_props(m, {"author": "fc2conv tests"})
    converted = fo.to_conv(m)
    assert converted.producer_name == "unit-test"
    assert {p.key: p.value for p in converted.metadata_props} == {"author": "fc2conv tests"}
    assert [o.name for o in converted.graph.output] == ["y"]
    assert [i.name for i in converted.graph.input] == ["x"]
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(converted), full_check=True)


@settings(max_examples=12, deadline=None)
@given(
    rank=st.integers(2, 5),
    c_in=st.integers(1, 9),
    c_out=st.integers(1, 9),
    bias=st.booleans(),
    data=st.data(),
)
def test_matmul_shapes_property(rank, c_in, c_out, bias, data) -> None:
    rng = np.random.default_rng()
    lead = data.draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if bias else "y"], name="p")]
    inits = [init(rng, "W", c_in, c_out)]
    if bias:
        nodes.append(helper.make_node("Add", ["b", "m"], ["y"]))
        inits.append(init(rng, "b", *([1] * data.draw(st.integers(0, rank - 1))), c_out))
    m = model(nodes, [vinfo("x", [*lead, c_in])], [vinfo("y", [*lead, c_out])], inits)
    converted = fo.to_conv(m)
    onnx.checker.check_model(converted, full_check=True)
    assert op_counts(converted)["Conv"] == 1
    x = rng.standard_normal((*lead, c_in)).astype(np.float32)
    assert_matches_reference(m, converted, {"x": x}, depth=c_in + 1)
