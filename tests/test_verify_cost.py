"""compare's per-draw cost: what runs once per compare, and what each draw costs.

Behaviour only (no timings; the speed lives in ``bench/verdicts_scale.py``): the float64 twins
are built once per compare however many draws; a CNN's float64 reference runs in onnxruntime
(Conv rewritten as a MatMul over patches, checked here against torch's float64 convolution);
the magnitude twin runs in float32 where that still bounds the float64 one from above.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from fc2conv.verify.onnx_float64 import Float64Runner
from fc2conv.verify.onnx_lower import convs_as_matmuls


def _conv_model(nd: int, cin: int, cout: int, kernel: tuple[int, ...], group: int,
                strides: list[int], dil: list[int], pads: list[int], bias: bool,
                rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w = rng.standard_normal((cout, cin // group, *kernel))
    b = rng.standard_normal(cout)
    inits = [numpy_helper.from_array(w, "W")] + ([numpy_helper.from_array(b, "B")] if bias
                                                 else [])
    node = helper.make_node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["y"],
                            group=group, strides=strides, dilations=dil, pads=pads,
                            kernel_shape=list(kernel))
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w, b


@pytest.mark.parametrize("case", range(12))
def test_conv_lowered_to_matmul_is_torch_float64_conv(case: int) -> None:
    rng = np.random.default_rng(case)
    nd = 1 + case % 3
    group = (1, 2, 3)[case % 3] if case % 4 else 1
    cin, cout = group * int(rng.integers(1, 4)), group * int(rng.integers(1, 4))
    kernel = tuple(int(k) for k in rng.integers(1, 4, nd))
    strides = [int(s) for s in rng.integers(1, 3, nd)]
    dil = [int(d) for d in rng.integers(1, 3, nd)]
    pads = [int(p) for p in rng.integers(0, 3, 2 * nd)]
    bias = bool(case % 2)
    model, w, b = _conv_model(nd, cin, cout, kernel, group, strides, dil, pads, bias, rng)
    lowered, count = convs_as_matmuls(model)
    assert count == 1 and "Conv" not in {n.op_type for n in lowered.graph.node}
    size = [int(s) for s in rng.integers(6, 11, nd)]
    x = rng.standard_normal((2, cin, *size))
    runner = Float64Runner(model, ["y"])
    got = runner.run({"x": x})[0]
    assert runner.engine == "onnxruntime (float64)"
    xt = torch.from_numpy(x)
    pad = []
    for i in reversed(range(nd)):
        pad += [pads[i], pads[i + nd]]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    want = conv(F.pad(xt, pad), torch.from_numpy(w), torch.from_numpy(b) if bias else None,
                stride=strides, dilation=dil, groups=group).numpy()
    assert got.shape == want.shape
    # float64 sums in another order: within a few float64 roundings of the sum of |terms|
    mag = conv(F.pad(xt.abs(), pad), torch.from_numpy(np.abs(w)),
               torch.from_numpy(np.abs(b)) if bias else None, stride=strides, dilation=dil,
               groups=group).numpy()
    n = w[0].size + 1
    assert np.all(np.abs(got - want) <= 2 * n * np.finfo(np.float64).eps * mag + 1e-300)


def _cnn(rng: np.random.Generator, extra: list | None = None) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> MaxPool -> Flatten -> Gemm -> Relu -> Gemm, float32."""
    def f32(name: str, *shape: int, positive: bool = False) -> onnx.TensorProto:
        v = rng.standard_normal(shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(v) + 0.5 if positive else v, name)

    nodes = [helper.make_node("Conv", ["x", "K", "kb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "W2", "b2"], ["y"], transB=1)] + (extra or [])
    out = nodes[-1].output[0]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [f32("K", 4, 3, 3, 3), f32("kb", 4), f32("g", 4), f32("be", 4), f32("mu", 4),
         f32("var", 4, positive=True), f32("W1", 6, 64), f32("b1", 6), f32("W2", 5, 6),
         f32("b2", 5)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _magnitudes(proto: onnx.ModelProto, x: torch.Tensor, single: bool) -> tuple[list, object]:
    from fc2conv.verify.models import load

    m = load(proto, "A")
    if not single:
        m.cache["single"] = None  # the float64 magnitude twin
    run = m.run((x,), "magnitude", capture=True)
    return [run.outputs[0], *(layer.output for layer in run.layers)], m.cache.get("single")


def test_float32_magnitude_twin_bounds_the_float64_one_from_above() -> None:
    """The magnitude twin in float32, raised by its factor, is >= the float64 magnitude twin
    everywhere (outputs and every captured layer), and looser by no more than the factor."""
    rng = np.random.default_rng(3)
    proto = _cnn(rng)
    x = torch.from_numpy(rng.standard_normal((2, 3, 8, 8)).astype(np.float32)) * 30
    m32, single = _magnitudes(proto, x, True)
    m64, _ = _magnitudes(proto, x, False)
    assert single is not None, "a Conv/BN/ReLU/pool/Gemm graph's magnitude twin runs in float32"
    factor, floor = single
    assert 1 < factor < 1.01
    assert len(m32) == len(m64) > 3
    for a, b in zip(m32, m64, strict=True):
        assert a.dtype == torch.float64
        assert bool((b <= a).all()), float((b - a).max())
        assert bool((a <= b * factor * (1 + 1e-6) + floor + 1e-30).all())


def test_magnitude_twin_stays_float64_where_float32_would_not_bound_it() -> None:
    """A graph with a subtraction or a LayerNorm (not sums of non-negative terms) keeps its
    float64 magnitude twin: the float32 one could differ by more than its factor."""
    from fc2conv.verify.models import load

    rng = np.random.default_rng(4)
    for extra in ([helper.make_node("Sub", ["y", "b2"], ["z"])],
                  [helper.make_node("Softmax", ["y"], ["z"])]):
        m = load(_cnn(rng, extra), "A")
        run = m.run((torch.randn(2, 3, 8, 8),), "magnitude")
        assert m.cache["single"] is None
        assert run.outputs[0].dtype == torch.float64


def test_float32_overflow_falls_back_to_the_float64_magnitude_twin() -> None:
    """A draw whose magnitudes overflow float32 (finite in float64) is bounded by the float64
    twin, not by infinities."""
    from fc2conv.verify.models import load

    rng = np.random.default_rng(5)
    m = load(_cnn(rng), "A")
    x = torch.full((2, 3, 8, 8), 3e37)
    got = m.run((x,), "magnitude").outputs[0]
    assert bool(torch.isfinite(got).all()) and float(got.max()) > 3.4e38
    assert m.cache["single"] is None


def test_twins_and_sessions_are_built_once_per_compare_not_per_draw(monkeypatch) -> None:
    """More draws cost runs, not new twins or sessions: compare(samples=6) builds exactly the
    onnxruntime sessions and float64/magnitude weights compare(samples=2) builds."""
    import onnxruntime

    from fc2conv.onnx import to_conv
    from fc2conv.verify import compare
    from fc2conv.verify import onnx_weights as ow

    rng = np.random.default_rng(6)
    a = _cnn(rng)
    b = to_conv(a)
    counts = {"sessions": 0, "twins": 0}
    real_session, real_weights = onnxruntime.InferenceSession, ow.float64_weights

    def session(*args, **kwargs):  # type: ignore[no-untyped-def]
        counts["sessions"] += 1
        return real_session(*args, **kwargs)

    def weights(*args, **kwargs):  # type: ignore[no-untyped-def]
        counts["twins"] += 1
        return real_weights(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(ow, "float64_weights", weights)
    seen = []
    for samples in (2, 6):
        counts.update(sessions=0, twins=0)
        rep = compare(a, b, samples=samples, layers=False, seed=1)
        assert rep.verdict in ("identical", "equivalent"), rep
        seen.append(dict(counts))
    assert seen[0] == seen[1], seen
    assert seen[0]["twins"] <= 2  # A's float64 twin and its magnitude twin, once each


def test_erf_between_onnxruntime_segments_is_float64() -> None:
    """A GELU MLP (MatMul -> Erf -> MatMul): onnxruntime has no float64 Erf, so it runs the
    MatMuls in segments and the evaluator the Erf between them, all in float64: equal to an
    independent float64 computation with math.erf to float64 rounding."""
    import math

    rng = np.random.default_rng(7)
    w1, w2 = rng.standard_normal((16, 32)), rng.standard_normal((32, 8))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Erf", ["h"], ["e"]),
             helper.make_node("Mul", ["h", "e"], ["g"]),
             helper.make_node("MatMul", ["g", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((4, 16))
    runner = Float64Runner(model, ["y", "e"])
    y, e = runner.run({"x": x})
    assert runner.engine == "onnxruntime (float64; Erf by onnx's evaluator)"
    h = np.einsum("ij,jk->ik", x, w1)
    want_e = np.vectorize(math.erf, otypes=[np.float64])(h)
    want = np.einsum("ij,jk->ik", h * want_e, w2)
    np.testing.assert_allclose(e, want_e, rtol=0, atol=4 * np.finfo(np.float64).eps)
    mag = np.einsum("ij,jk->ik", np.abs(h * want_e), np.abs(w2))
    assert np.all(np.abs(y - want) <= 64 * np.finfo(np.float64).eps * (mag + 1))
