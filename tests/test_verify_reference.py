"""compare's float64 reference for ONNX models: a reference for every graph onnxruntime runs.

Each engine (onnxruntime in float64, onnx's reference evaluator with GatherElements and Conv
replaced, onnxruntime with float32 islands) is checked against a float64 result computed
independently here: python loops, numpy einsum, or onnx's own evaluator where it is right.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _onnx_helpers import init, model, reference64, vinfo
from onnx import TensorProto, helper

from fc2conv.onnx import to_conv
from fc2conv.verify import compare
from fc2conv.verify.onnx_backend import run

F64_EPS = float(np.finfo(np.float64).eps)
F32_EPS = float(np.finfo(np.float32).eps)


def _token_type_graph(seed: int) -> onnx.ModelProto:
    """BERT's token-type lookup in small: ``GatherElements(table (1, 16), ids (1, 8), axis=1)``
    added to ``x`` and fed to a dense layer — onnx's evaluator fails on this GatherElements."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("GatherElements", ["table", "ids"], ["tt"], axis=1),
        helper.make_node("Add", ["x", "tt"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["y"]),
    ]
    return model(nodes, [vinfo("x", [1, 8]), vinfo("ids", [1, 8], TensorProto.INT64)],
                 [vinfo("y", [1, 5])], [init(rng, "table", 1, 16), init(rng, "W", 8, 5)])


def _loops_reference(m: onnx.ModelProto, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    inits = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    table, w = inits["table"], inits["W"]
    h = x.astype(np.float64).copy()
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            h[i, j] += table[i, ids[i, j]]
    return np.einsum("ij,jk->ik", h, w)


def test_gather_elements_smaller_than_data_has_a_reference() -> None:
    m = _token_type_graph(0)
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal((1, 8)).astype(np.float32)
        ids = rng.integers(0, 16, (1, 8))
        out = run(m, (torch.from_numpy(x), torch.from_numpy(ids)), "reference", False)
        ref = _loops_reference(m, x, ids)
        assert out.outputs[0].dtype == torch.float64
        np.testing.assert_allclose(out.outputs[0].numpy(), ref, rtol=0,
                                   atol=64 * F64_EPS * np.abs(ref).max())


def test_compare_runs_where_the_evaluator_fails() -> None:
    m = _token_type_graph(2)
    rep = compare(m, to_conv(m), samples=3, seed=3)
    assert rep.verdict in ("identical", "equivalent"), str(rep)
    assert any("float64 reference: model A run by" in n for n in rep.notes), rep.notes
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    w = onnx.numpy_helper.to_array(bad.graph.initializer[1]).copy()
    w[3, 2] += 0.5
    bad.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    assert compare(m, bad, samples=3, seed=3, layers=False).verdict == "different"


@pytest.mark.parametrize("case", [
    dict(pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2], group=2),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[1, 2], dilations=[2, 1]),
    dict(auto_pad="VALID", group=2),
])
def test_conv_and_erf_run_in_float64(case: dict) -> None:
    """Conv and Erf have no float64 kernel in onnxruntime: a Conv becomes a MatMul over
    patches (verify/onnx_lower.py) or, SAME-padded, runs in the evaluator through torch, as Erf
    does between onnxruntime's segments (verify/onnx_segments.py); checked against onnx's own
    im2col Conv in float64 and math.erf."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], **case),
             helper.make_node("Erf", ["c"], ["y"])]
    m = model(nodes, [vinfo("x", [2, 4, 9, 7])], [vinfo("y", [2, 6, None, None])],
              [init(rng, "W", 6, 4 // case.get("group", 1), 3, 2), init(rng, "b", 6)])
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    out = run(m, (torch.from_numpy(x),), "reference", False)
    islands = "Conv, Erf" if "auto_pad" in case and case["auto_pad"] != "VALID" else "Erf"
    assert out.engine == f"onnxruntime (float64; {islands} by onnx's evaluator)"
    conv_only = onnx.ModelProto()
    conv_only.CopyFrom(m)
    del conv_only.graph.node[1:]
    conv_only.graph.output[0].name = "c"
    # onnx's own Erf rounds to float32 (np.vectorize(erf, otypes=["f"])): math.erf here
    ref = np.vectorize(math.erf, otypes=[np.float64])(reference64(conv_only, {"x": x})[0])
    assert out.outputs[0].shape == ref.shape
    np.testing.assert_allclose(out.outputs[0].numpy(), ref, rtol=0, atol=256 * F64_EPS)


def test_dense_graph_runs_in_onnxruntime_float64() -> None:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    m = model(nodes, [vinfo("x", [3, 16])], [vinfo("y", [3, 7])], [init(rng, "W", 16, 7)])
    x = rng.standard_normal((3, 16)).astype(np.float32)
    out = run(m, (torch.from_numpy(x),), "reference", False)
    assert out.engine == "onnxruntime (float64)"
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    ref = np.tanh(np.einsum("ij,jk->ik", x.astype(np.float64), w))
    np.testing.assert_allclose(out.outputs[0].numpy(), ref, rtol=0, atol=64 * F64_EPS)


def test_op_without_float64_kernel_or_evaluator_runs_in_float32_island() -> None:
    """com.microsoft Gelu: onnxruntime has it in float32 only and onnx's evaluator not at all;
    the reference computes it in float32 between casts, and the report says so."""
    rng = np.random.default_rng(6)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Gelu", ["h"], ["y"], domain="com.microsoft")],
        "g", [vinfo("x", [3, 16])], [vinfo("y", [3, 7])], [init(rng, "W", 16, 7)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    x = rng.standard_normal((3, 16)).astype(np.float32)
    out = run(m, (torch.from_numpy(x),), "reference", False)
    assert "Gelu in float32" in out.engine
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    h = np.einsum("ij,jk->ik", x.astype(np.float64), w)
    ref = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(h)
    np.testing.assert_allclose(out.outputs[0].numpy(), ref, rtol=0,
                               atol=8 * F32_EPS * np.abs(ref).max())
    rep = compare(m, m, samples=2, seed=1, layers=False)
    assert rep.verdict == "identical"
    assert any("float32 rounding at those ops" in n for n in rep.notes), rep.notes


def test_convert_says_when_the_check_cannot_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """convert writes the file and exits 0 with one sentence when its check cannot run."""
    import fc2conv.verify as verify
    from fc2conv.cli.main import main
    from fc2conv.errors import Fc2ConvError

    src = tmp_path / "m.onnx"
    onnx.save(_token_type_graph(7), str(src))

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise Fc2ConvError("no float64 engine could run the model (test)")

    monkeypatch.setattr(verify, "compare", broken)
    dst = tmp_path / "m_conv.onnx"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), str(dst), "--to", "conv"])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert dst.exists() and onnx.load(str(dst)).graph.node
    line = next(ln for ln in out.splitlines() if ln.startswith("check"))
    assert re.match(r"check \(onnxruntime\): not run, so m_conv.onnx is written unchecked", line)


@pytest.mark.parametrize(("pool", "gemm"), [
    (dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1]), dict(transB=1)),
    (dict(kernel_shape=[2, 2], dilations=[2, 1]), dict(transA=1, alpha=0.5, beta=2.0)),
    (dict(kernel_shape=[2, 2], ceil_mode=1, strides=[2, 2]), dict()),
])
def test_maxpool_and_gemm_replacements_match_onnx_evaluator(pool: dict, gemm: dict,
                                                            monkeypatch) -> None:
    """The evaluator's MaxPool (Python loops) and Gemm run through torch: same float64 values as
    onnx's own kernels (a max rounds nothing; the products to float64 rounding)."""
    from fc2conv.verify.onnx_float64 import Float64Runner

    def refuse(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("onnxruntime engines off: the evaluator runs this graph")

    monkeypatch.setattr(Float64Runner, "_ort", refuse)
    monkeypatch.setattr(Float64Runner, "_segmented", refuse)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"]),
             helper.make_node("MaxPool", ["c"], ["p"], **pool),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Relu", ["f"], ["r"])]
    probe = model(nodes, [vinfo("x", [2, 3, 9, 8])], [vinfo("r", [2, None])],
                  [init(rng, "K", 4, 3, 1, 1)])
    width = reference64(probe, {"x": x})[0].shape[1]
    a_in = "rT" if gemm.get("transA") else "r"
    nodes += ([helper.make_node("Transpose", ["r"], ["rT"])] if gemm.get("transA") else [])
    w_shape = (5, width) if gemm.get("transB") else (width, 5)
    nodes.append(helper.make_node("Gemm", [a_in, "W", "bias"], ["y"], **gemm))
    m = model(nodes, [vinfo("x", [2, 3, 9, 8])], [vinfo("y", [None, 5])],
              [init(rng, "K", 4, 3, 1, 1), init(rng, "W", *w_shape), init(rng, "bias", 5)])
    out = run(m, (torch.from_numpy(x),), "reference", False)
    assert out.engine == "onnx reference evaluator"
    ref = reference64(m, {"x": x})[0]
    assert out.outputs[0].shape == ref.shape
    np.testing.assert_allclose(out.outputs[0].numpy(), ref, rtol=0,
                               atol=64 * F64_EPS * np.abs(ref).max())
