"""Shared helpers of the ONNX tests: graph building and an independent float64 reference.

The reference runs the ORIGINAL model, with every float tensor promoted to float64, in
``onnx.reference.ReferenceEvaluator`` (pure numpy) — independent of fc2conv and of onnxruntime.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

F32_EPS = float(np.finfo(np.float32).eps)


def init(rng: np.random.Generator, name: str, *shape: int, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def vinfo(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def op_counts(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def to_float64(m: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``m`` computing in float64 (initializers, inputs, outputs, Cast targets)."""
    m64 = onnx.ModelProto()
    m64.CopyFrom(m)
    g = m64.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t).astype(np.float64)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return m64


def reference64(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    feeds64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return ReferenceEvaluator(to_float64(m)).run(None, feeds64)


def run_ort(m: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = m if isinstance(m, str) else m.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_matches_reference(
    original: onnx.ModelProto,
    converted: onnx.ModelProto | str,
    feeds: dict[str, np.ndarray],
    depth: int,
) -> None:
    """ORT output of ``converted`` == float64 reference of ``original`` within the float32
    rounding bound of a ``depth``-term dot product (relative to the output scale).

    The bound is also checked on the original model in ORT, so it is not loose by accident.
    """
    refs = reference64(original, feeds)
    for model_ in (original, converted):
        outs = run_ort(model_, feeds)
        assert len(outs) == len(refs)
        for out, ref in zip(outs, refs, strict=True):
            out = np.asarray(out).reshape(ref.shape) if out.size == ref.size else out
            assert out.shape == ref.shape
            scale = max(1.0, float(np.abs(ref).max()))
            tol = 8 * F32_EPS * depth * scale
            err = float(np.abs(out.astype(np.float64) - ref).max())
            assert err <= tol, f"max error {err:.3g} > {tol:.3g}"
