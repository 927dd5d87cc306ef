"""The pieces the float64 engines of :mod:`fc2conv.verify.onnx_float64` and
:mod:`fc2conv.verify.onnx_segments` share: an onnxruntime CPU session with weights fed or handed
over (:func:`ort_session`), and float64 kernels for onnx's reference evaluator
(:func:`replaced_ops`): ``GatherElements`` by ``np.take_along_axis``, ``Conv``, ``MatMul``,
``Gemm``, ``Erf`` and ``MaxPool`` by torch's float64 ones (the same sums,
``y[n,o] = b[o] + sum_{c,k} W[o,c,k] x[n,c,s*i+d*k-p]`` for Conv; a max rounds nothing)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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
    as constant initializers (it copies and packs them: the deployed model). Sessions run
    ``torch.get_num_threads()`` intra-op threads."""
    import onnxruntime as ort
    import torch

    from fc2conv.verify.onnx_weights import as_inputs

    opts = ort.SessionOptions()
    # as many threads as torch uses (both default to the physical cores), so that
    # torch.set_num_threads(1) pins every session compare builds too
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1  # sequential execution: no inter-op pool is used
    # errors only when deployed-like (its warnings would add lines to our one); none for the
    # float64 engines, whose failures are tried past, not shown
    opts.log_severity_level = 3 if optimize else 4
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    # no arena for the float64 engines: their graphs cast weights as they run (see
    # onnx_weights.read_through), and an arena would keep those buffers, each session its own
    opts.enable_cpu_mem_arena = optimize
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


def replaced_ops() -> list[type]:
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
