"""ONNX conversions check themselves (fc2conv.onnx.selfcheck): a planted wrong weight in a
rewrite rule is caught on a fresh draw and the error names the node; correct conversions
pass; ``verify=False`` skips the check."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _onnx_helpers import assert_matches_reference, init, model, vinfo
from onnx import helper

import fc2conv.onnx
from fc2conv import Fc2ConvError
from fc2conv.onnx.rules import gemm_to_conv


def _mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    return model(nodes, [vinfo("x", [3, 8])], [vinfo("y", [3, 4])],
                 [init(rng, "w1", 16, 8), init(rng, "b1", 16), init(rng, "w2", 4, 16),
                  init(rng, "b2", 4)])


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemm_to_conv writes fc2's weight with one entry off by 5%: a plausible rule bug."""
    right = gemm_to_conv.linear_weight

    def wrong(m: gemm_to_conv.GemmMatch) -> np.ndarray:
        w = right(m).copy()
        if m.node.name == "fc2":
            w[1, 3] *= 1.05
        return w

    monkeypatch.setattr(gemm_to_conv, "linear_weight", wrong)


def test_correct_conversion_passes_and_matches_float64() -> None:
    m = _mlp()
    out = fc2conv.onnx.to_conv(m)
    assert [n.op_type for n in out.graph.node].count("Conv") == 2
    rng = np.random.default_rng(1)
    assert_matches_reference(m, out, {"x": rng.standard_normal((3, 8)).astype(np.float32)}, 16)


@pytest.mark.usefixtures("planted")
def test_planted_wrong_weight_is_named_for_proto_ir_and_path(tmp_path) -> None:
    m = _mlp()
    for given in (m, ir.serde.deserialize_model(m)):
        with pytest.raises(Fc2ConvError, match=r"another function.*first diverging at node "
                                               r"'fc2"):
            fc2conv.onnx.to_conv(given)
    src = tmp_path / "mlp.onnx"
    onnx.save(m, src)
    with pytest.raises(Fc2ConvError, match="first diverging at node 'fc2"):
        fc2conv.onnx.to_conv(src, tmp_path / "conv.onnx")
    with pytest.raises(Fc2ConvError, match="first diverging at node 'fc2"):
        fc2conv.onnx.convert(m, "conv")


@pytest.mark.usefixtures("planted")
def test_verify_false_skips_and_inplace_checks_against_the_original() -> None:
    m = _mlp()
    out = fc2conv.onnx.to_conv(m, verify=False)  # the planted bug goes through unchecked
    assert [n.op_type for n in out.graph.node].count("Conv") == 2
    inplace = _mlp()
    with pytest.raises(Fc2ConvError, match="'fc2"):
        fc2conv.onnx.to_conv(inplace, inplace=True)


def test_to_linear_checks_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = fc2conv.onnx.to_conv(_mlp())
    back = fc2conv.onnx.to_linear(conv)
    rng = np.random.default_rng(2)
    assert_matches_reference(_mlp(), back, {"x": rng.standard_normal((3, 8)).astype(np.float32)},
                             16)
    from fc2conv.onnx.rules import conv_to_matmul

    right = conv_to_matmul.conv_kernel_to_linear

    def wrong(kernel: np.ndarray, groups: int) -> np.ndarray:
        w = right(kernel, groups).copy()
        if w.shape[0] == 4:  # fc2's kernel (4 outputs): flip one sign
            w[2, 5] = -w[2, 5]
        return w

    monkeypatch.setattr(conv_to_matmul, "conv_kernel_to_linear", wrong)
    with pytest.raises(Fc2ConvError, match="first diverging at node '[^']*fc2"):
        fc2conv.onnx.to_linear(conv)


def test_a_conversion_onnxruntime_cannot_load_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that writes a graph onnxruntime refuses (here fc2's kernel in float64 beside a
    float32 input) is a broken conversion, not a model compare cannot draw inputs for."""
    right = gemm_to_conv.linear_weight

    def wrong(m: gemm_to_conv.GemmMatch) -> np.ndarray:
        w = right(m)
        return w.astype(np.float64) if m.node.name == "fc2" else w

    monkeypatch.setattr(gemm_to_conv, "linear_weight", wrong)
    with pytest.raises(Fc2ConvError, match="onnxruntime loads the original but not the model"):
        fc2conv.onnx.to_conv(_mlp())
