"""Running an ONNX graph in float64 — the engine behind ``compare``'s reference for ONNX models.

The graph given here is already a float64 copy (see :mod:`fc2conv.verify.onnx_backend`). Four
engines, tried in this order; the first that runs the graph is kept, and the report names it:

1. ``onnxruntime (float64)``: onnxruntime on the float64 copy. Its CPU kernels cover MatMul,
   Gemm, Add/Mul, LayerNormalization, Softmax, Tanh, MaxPool, ... in float64 (not Conv, Erf,
   AveragePool): fast, and it holds each weight once. ``Conv`` is rewritten as patches and a
   ``MatMul`` (:mod:`fc2conv.verify.onnx_lower`: the same float64 sums), so CNNs run here too.
2. ``onnxruntime (float64; OP by onnx's evaluator)``: onnxruntime on the runs of nodes
   between the ops it has no float64 kernel for (``Erf``), which the evaluator's kernels below
   compute in float64 (:mod:`fc2conv.verify.onnx_segments`).
3. ``onnx reference evaluator``: ``onnx.reference.ReferenceEvaluator`` (numpy, exact up to
   float64 rounding) with kernels replaced: ``MatMul``, ``Gemm``, ``Erf`` and ``MaxPool`` by
   torch's float64 ones
   (numpy's stacked matmul skips BLAS, its erf is ``math.erf`` in a Python loop: 90% of a
   BERT draw), ``GatherElements`` by ``np.take_along_axis``
   (the evaluator's own reshapes ``indices``-sized results wrongly when ``indices`` is smaller
   than ``data`` off the gather axis, as with BERT's token-type ids: "cannot reshape array of
   size 1 into shape (1,16)") and ``Conv`` by torch's float64 convolution (the same sums,
   ``y[n,o] = b[o] + sum_{c,k} W[o,c,k] x[n,c,s*i+d*k-p]``, without the evaluator's im2col).
4. ``onnxruntime (float64, OP in float32)``: onnxruntime with each op that has no float64
   kernel computed in float32 between two Casts. The reference is then exact only up to
   float32 rounding at those ops; the report says so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from fc2conv.verify.onnx_kernels import ort_session, replaced_ops

log = logging.getLogger(__name__)

Engine = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]
_MISSING_KERNEL = re.compile(r"implementation for (\w+)\(\d+\) node with name '([^']*)'")
MAX_FLOAT32_WRAPS = 16


class Float64Runner:
    """Runs a float64 ONNX graph with the first engine that can (see module docstring);
    ``engine`` names the one in use. Sessions are built once and reused across draws.
    ``weights`` fill the graph's stubs; a twin's stubs may take the model's own (narrower)
    arrays, cast as the graph runs (:func:`fc2conv.verify.onnx_weights.read_through`)."""

    def __init__(self, model: Any, outputs: list[str],
                 weights: dict[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.outputs = outputs
        self.weights = weights or {}
        self.engine = ""
        self._run: Engine | None = None
        self._tried: list[str] = []

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._run is not None:
            return self._run(self.outputs, feeds)
        errors = []
        for name, make in (("onnxruntime (float64)", self._ort),
                           ("onnxruntime in segments", self._segmented),
                           ("onnx reference evaluator", self._evaluator),
                           ("onnxruntime (float64)", self._ort_mixed)):
            try:
                run, label = make()
                values = run(self.outputs, feeds)
            except Exception as err:
                errors.append(f"{name}: {' '.join(str(err).split())[:200]}")
                log.debug("float64 engine %s failed: %s", name, err)
                continue
            self._run, self.engine = run, label
            return values
        raise RuntimeError("; ".join(errors))

    # -- engines ------------------------------------------------------------------------------
    def _prepared(self) -> tuple[Any, dict[str, np.ndarray]]:
        from fc2conv.verify.onnx_lower import convs_as_matmuls
        from fc2conv.verify.onnx_weights import read_through

        model = _with_outputs(self.model, self.outputs)
        if any(n.op_type == "Conv" for n in model.graph.node):
            model, _ = convs_as_matmuls(model)  # no float64 Conv kernel in onnxruntime
        # after lowering (it reads the weights' shapes off their stubs): a twin's weights
        # are cast from the model's own arrays as the graph runs, not held in float64
        return read_through(model, self.weights)

    def _ort(self) -> tuple[Engine, str]:
        sess = ort_session(*self._prepared())
        return sess.run, "onnxruntime (float64)"

    def _segmented(self) -> tuple[Engine, str]:
        from fc2conv.verify.onnx_segments import Segmented, missing_ops

        model, weights = self._prepared()
        islands = missing_ops(model, weights)
        if not islands:
            raise RuntimeError("onnxruntime runs the whole graph")
        seg = Segmented(model, weights, islands)
        return seg.run, f"onnxruntime (float64; {', '.join(sorted(islands))} by onnx's evaluator)"

    def _evaluator(self) -> tuple[Engine, str]:
        from onnx.reference import ReferenceEvaluator

        from fc2conv.verify.onnx_weights import as_inputs, read_through

        model, weights = read_through(self.model, self.weights)
        ev = ReferenceEvaluator(as_inputs(model), new_ops=replaced_ops())

        def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            with np.errstate(all="ignore"):  # inf - inf in a magnitude twin is not news
                return list(ev.run(names, {**feeds, **weights}))

        return run, "onnx reference evaluator"

    def _ort_mixed(self) -> tuple[Engine, str]:
        from fc2conv.verify.onnx_weights import read_through

        model, weights = read_through(_with_outputs(self.model, self.outputs), self.weights)
        wrapped: list[str] = []
        for _ in range(MAX_FLOAT32_WRAPS):
            try:
                sess = ort_session(model, weights)
                break
            except Exception as err:
                found = _MISSING_KERNEL.search(str(err))
                if not found:
                    raise
                op, node_name = found.groups()
                model, ops = _in_float32(model, node_name, op)
                if not ops:
                    raise
                wrapped += ops
        else:
            raise RuntimeError(f"more than {MAX_FLOAT32_WRAPS} ops lack a float64 kernel")
        islands = ", ".join(sorted(set(wrapped)))
        label = (f"onnxruntime (float64, {islands} in float32)" if islands
                 else "onnxruntime (float64)")
        return sess.run, label


def _with_outputs(model: Any, names: list[str]) -> Any:
    """A copy of ``model`` (a skeleton: cheap) with ``names`` among its graph outputs."""
    existing = {o.name for o in model.graph.output}
    missing = [n for n in dict.fromkeys(names) if n not in existing]
    if not missing:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in missing:
        out.graph.output.append(helper.ValueInfoProto(name=name))
    return out


def _in_float32(model: Any, node_name: str, op: str) -> tuple[Any, list[str]]:
    """Wrap the node named ``node_name`` (else every ``op`` node; else, when ``op`` came from
    expanding a custom-domain op's function body, every such op) in Casts: float64 inputs to
    float32, float32 outputs back to float64. Returns the model and the op types wrapped."""
    g = model.graph
    nodes = list(g.node)
    picks = [n for n in nodes if node_name and n.name == node_name and not _wrapped(n)]
    picks = picks or [n for n in nodes if n.op_type == op and not _wrapped(n)]
    picks = picks or [n for n in nodes if n.domain not in ("", "ai.onnx") and not _wrapped(n)]
    chosen = {id(n) for n in picks}
    del g.node[:]
    for k, node in enumerate(nodes):
        if id(node) not in chosen:
            g.node.append(node)
            continue
        tag = f"__f32_{k}"
        for i, name in enumerate(node.input):
            if name:
                cast_in = f"{name}{tag}_in{i}"
                g.node.append(helper.make_node("Cast", [name], [cast_in], to=TensorProto.FLOAT))
                node.input[i] = cast_in
        outs = list(node.output)
        for i, name in enumerate(outs):
            if name:
                node.output[i] = f"{name}{tag}_out{i}"
        g.node.append(node)
        for i, name in enumerate(outs):
            if name:
                g.node.append(helper.make_node("Cast", [node.output[i]], [name],
                                               to=TensorProto.DOUBLE))
    return model, [n.op_type for n in picks]


def _wrapped(node: Any) -> bool:
    return any("__f32_" in o for o in node.output)
