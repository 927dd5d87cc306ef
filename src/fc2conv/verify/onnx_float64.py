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
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

Engine = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]
_MISSING_KERNEL = re.compile(r"implementation for (\w+)\(\d+\) node with name '([^']*)'")
MAX_FLOAT32_WRAPS = 16


class Session:
    """An onnxruntime session whose stubbed weights are either fed on every run (``fed``: the
    caller's arrays, not copied) or handed over once as external initializers (onnxruntime
    copies them, and treats them as constants, as a deployed model)."""

    def __init__(self, sess: Any, fed: dict[str, np.ndarray]) -> None:
        self.sess, self.fed = sess, fed

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.sess.run(names, {**feeds, **self.fed}))


def ort_session(model: Any, weights: dict[str, np.ndarray] | None = None, *,
                optimize: bool = False, fed: bool = True) -> Session:
    """An onnxruntime CPU session on ``model`` (a ModelProto, or a skeleton whose stubs are
    filled from ``weights``); all graph optimizations with ``optimize`` (as users deploy), else
    the basic ones (fusions into float32-only kernels would refuse a float64 graph).
    ``fed=True`` feeds the weights as inputs on every run (no copy: for float64 twins and side
    runs, whose results do not depend on weights being constants), else onnxruntime gets them
    as constant initializers (it copies and packs them: the deployed model)."""
    import onnxruntime as ort

    from fc2conv.verify.onnx_weights import as_inputs

    opts = ort.SessionOptions()
    # errors only when deployed-like (its warnings would add lines to our one); none for the
    # float64 engines, whose failures are tried past, not shown
    opts.log_severity_level = 3 if optimize else 4
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    weights = weights or {}
    if weights and fed:
        model = as_inputs(model)
    elif weights:
        names = list(weights)
        opts.add_external_initializers(
            names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return Session(sess, weights if fed else {})


class Float64Runner:
    """Runs a float64 ONNX graph with the first engine that can (see module docstring);
    ``engine`` names the one in use. Sessions are built once and reused across draws."""

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
    def _prepared(self) -> Any:
        from fc2conv.verify.onnx_lower import convs_as_matmuls

        model = _with_outputs(self.model, self.outputs)
        if any(n.op_type == "Conv" for n in model.graph.node):
            model, _ = convs_as_matmuls(model)  # no float64 Conv kernel in onnxruntime
        return model

    def _ort(self) -> tuple[Engine, str]:
        sess = ort_session(self._prepared(), self.weights)
        return sess.run, "onnxruntime (float64)"

    def _segmented(self) -> tuple[Engine, str]:
        from fc2conv.verify.onnx_segments import Segmented, missing_ops

        model = self._prepared()
        islands = missing_ops(model, self.weights)
        if not islands:
            raise RuntimeError("onnxruntime runs the whole graph")
        seg = Segmented(model, self.weights, islands)
        return seg.run, f"onnxruntime (float64; {', '.join(sorted(islands))} by onnx's evaluator)"

    def _evaluator(self) -> tuple[Engine, str]:
        from onnx.reference import ReferenceEvaluator

        from fc2conv.verify.onnx_weights import as_inputs

        ev = ReferenceEvaluator(as_inputs(self.model), new_ops=_replaced_ops())
        weights = self.weights

        def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            with np.errstate(all="ignore"):  # inf - inf in a magnitude twin is not news
                return list(ev.run(names, {**feeds, **weights}))

        return run, "onnx reference evaluator"

    def _ort_mixed(self) -> tuple[Engine, str]:
        model = _with_outputs(self.model, self.outputs)
        wrapped: list[str] = []
        for _ in range(MAX_FLOAT32_WRAPS):
            try:
                sess = ort_session(model, self.weights)
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


def _replaced_ops() -> list[type]:
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):  # type: ignore[misc]
        """``out[i][j][k] = data[index[i][j][k]][j][k]`` (axis 0), negative indices wrap."""

        def _run(self, data: np.ndarray, indices: np.ndarray,
                 axis: int | None = None) -> tuple[np.ndarray]:
            ax = int(axis or 0) % max(data.ndim, 1)
            idx = indices.astype(np.int64)
            idx = np.where(idx < 0, idx + data.shape[ax], idx)
            return (np.take_along_axis(data, idx, axis=ax),)

    class Conv(OpRun):  # type: ignore[misc]
        """ONNX Conv through torch's convolution, in the inputs' dtype (float64 here)."""

        def _run(self, X: np.ndarray, W: np.ndarray, B: np.ndarray | None = None,
                 auto_pad: str | None = None, dilations: Any = None, group: int | None = None,
                 kernel_shape: Any = None, pads: Any = None,
                 strides: Any = None) -> tuple[np.ndarray]:
            return (_torch_conv(X, W, B, auto_pad, dilations, group, pads, strides),)

    class MatMul(OpRun):  # type: ignore[misc]
        """``A @ B`` (numpy broadcasting) through torch: numpy's stacked matmul skips BLAS."""

        def _run(self, A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray]:
            if A.dtype != B.dtype or A.dtype.kind != "f":
                return (np.matmul(A, B),)
            return (torch_op("matmul", A, B),)

    class Erf(OpRun):  # type: ignore[misc]
        """``erf(x)`` through torch (the evaluator vectorizes ``math.erf`` in Python)."""

        def _run(self, x: np.ndarray) -> tuple[np.ndarray]:
            if x.dtype.kind != "f":
                return (np.vectorize(math.erf)(x).astype(x.dtype),)
            return (torch_op("erf", x),)

    class Gemm(OpRun):  # type: ignore[misc]
        """``alpha A' B' + beta C`` with the product through torch."""

        def _run(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None,
                 alpha: float | None = None, beta: float | None = None,
                 transA: int | None = None, transB: int | None = None) -> tuple[np.ndarray]:
            a2, b2 = (a.T if transA else a), (b.T if transB else b)
            out = torch_op("matmul", a2, b2) if a2.dtype == b2.dtype and a2.dtype.kind == "f" \
                else np.dot(a2, b2)
            out = out * (1.0 if alpha is None else alpha)
            if c is not None and beta != 0:
                out = out + c * (1.0 if beta is None else beta)
            return (out.astype(a.dtype),)

    from onnx.reference.ops.op_max_pool import MaxPool as _MaxPool

    class MaxPool(_MaxPool):  # type: ignore[misc]
        """Max pooling through torch (exact: a max rounds nothing); the evaluator's own Python
        loops for what torch does not do the same way (indices, ceil mode, auto_pad)."""

        def _run(self, x: np.ndarray, auto_pad: Any = None,  # type: ignore[override]
                 ceil_mode: Any = None,
                 dilations: Any = None, kernel_shape: Any = None, pads: Any = None,
                 storage_order: Any = None, strides: Any = None) -> Any:
            ap = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
            nd = x.ndim - 2
            if (len(self.onnx_node.output) > 1 or ceil_mode or ap not in ("NOTSET", "VALID")
                    or nd not in (1, 2, 3) or x.dtype.kind != "f"):
                return super()._run(x, auto_pad, ceil_mode, dilations, kernel_shape, pads,
                                    storage_order, strides)
            return (_torch_max_pool(x, list(kernel_shape), list(strides or [1] * nd),
                                    list(dilations or [1] * nd),
                                    list(pads or [0] * (2 * nd)) if ap == "NOTSET"
                                    else [0] * (2 * nd)),)

    return [GatherElements, Conv, MatMul, Erf, Gemm, MaxPool]


def _torch_max_pool(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
                    pads: list[int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    nd = len(kernel)
    t = torch.from_numpy(np.require(x, requirements=["C", "W"]))
    pad = []
    for i in reversed(range(nd)):
        pad += [int(pads[i]), int(pads[i + nd])]
    if any(pad):
        t = F.pad(t, pad, value=-math.inf)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return pool(t, kernel, stride=strides, dilation=dilations).numpy()  # type: ignore[no-any-return]


def torch_op(name: str, *arrays: np.ndarray) -> np.ndarray:
    """``torch.<name>(*arrays)`` on numpy arrays, in their dtype (float64 here)."""
    import torch

    tensors = [torch.from_numpy(np.require(a, requirements=["C", "W"])) for a in arrays]
    return getattr(torch, name)(*tensors).numpy()  # type: ignore[no-any-return]


def _torch_conv(X: np.ndarray, W: np.ndarray, B: np.ndarray | None, auto_pad: Any,
                dilations: Any, group: Any, pads: Any, strides: Any) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    nd = W.ndim - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"Conv with {nd} spatial dimensions")
    dil = list(dilations or [1] * nd)
    st = list(strides or [1] * nd)
    ap = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    if ap in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(nd):
            size = X.shape[2 + i]
            out = -(-size // st[i])
            total = max(0, (out - 1) * st[i] + (W.shape[2 + i] - 1) * dil[i] + 1 - size)
            pads.append(total // 2 if ap == "SAME_UPPER" else total - total // 2)
        pads = pads + [
            (max(0, (-(-X.shape[2 + i] // st[i]) - 1) * st[i] + (W.shape[2 + i] - 1) * dil[i]
                 + 1 - X.shape[2 + i])) - pads[i] for i in range(nd)]
    elif ap == "VALID" or pads is None:
        pads = [0] * (2 * nd)
    x = torch.from_numpy(np.require(X, requirements=['C', 'W']))
    pad = []
    for i in reversed(range(nd)):  # F.pad: last dimension first, (begin, end)
        pad += [int(pads[i]), int(pads[i + nd])]
    if any(pad):
        x = F.pad(x, pad)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    w = torch.from_numpy(np.require(W, requirements=['C', 'W']))
    b = None if B is None else torch.from_numpy(np.require(B, requirements=['C', 'W']))
    y = conv(x, w, b, stride=st, dilation=dil, groups=int(group or 1))
    return y.numpy()
