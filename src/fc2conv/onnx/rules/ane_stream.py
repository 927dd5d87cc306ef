"""``layout="ane"`` on the residual stream: per-position ops of a ``(B, C, 1, S)`` twin.

* ``CHANNEL_MIX`` -- ``MatMul(x, B) (+ c)``: ``Conv(x', K, c)``, ``K[o, c, 0, 0] = B[c, o]``;
* ``ELEMENTWISE`` -- the same op on the twins; a constant operand ``c`` (broadcast to rank 3) is
  moved once: ``c'[i, k, 0, j] = c[i, j, k]``; for a permuted twin ``c' = c.transpose(p^-1)``;
* ``CHANNEL_REDUCE`` -- ``ReduceMean(x, [-1], keepdims)``: ``ReduceMean(x', [1])``;
* ``CHANNEL_NORM`` -- ``LayerNormalization`` over the last axis: over axis 1,
  ``y' = (x' - mean_1 x') / sqrt(var_1 x' + eps) * w' + b'`` (ReduceMean-based, since ONNX's
  LayerNormalization normalizes over all trailing axes).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.ane_moves import AneBase
from fc2conv.onnx.rules.ane_twin import Twin, _const_array, _shape
from fc2conv.onnx.rules.base import (
    FLOAT_TYPES,
    Refused,
    constant,
    dims,
    new_initializer,
    provenance,
)
from fc2conv.onnx.weights import linear_to_conv_kernel


class StreamRewrites(AneBase):
    """Linear layers, elementwise ops, channel means and LayerNorms on twins."""

    def _on_matmul(self, node: ir.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        assert x is not None
        try:
            weight = constant(w, "MatMul weight")
        except Refused:
            weight = None
        if weight is None or len(weight.shape) != 2:
            return self._on_batched_matmul(node)
        if self.wanted is not None and not ({node.name, node.outputs[0].name} & self.wanted):
            return None
        tx = self._twin(x)
        if tx is None and (x.shape is None or x.shape.rank() != 3):
            return None
        if tx is not None and tx.perm is not None:
            return None
        if x.dtype is not None and x.dtype not in FLOAT_TYPES:
            return None
        from fc2conv.onnx.rules.matmul_to_conv import _bias_of
        in_f, out_f = dims(weight)
        found = _bias_of(node, out_f, 3)
        add, bias_value, bias = found if found is not None else (None, None, None)
        xin = tx.value if tx is not None else self.enter(x)
        if xin is None:
            return None
        assert w is not None
        kernel = new_initializer(self.ctx, f"{w.name}_conv",
                                 lambda: linear_to_conv_kernel(weight.numpy().T, 2),
                                 weight.dtype, (out_f, in_f, 1, 1), [weight],
                                 recipe=("matmul", 2))
        inputs = [xin, kernel]
        if bias is not None:
            dtype = weight.dtype.numpy()
            b = bias
            inputs.append(new_initializer(
                self.ctx, f"{bias_value.name if bias_value else 'bias'}_conv",
                lambda: np.broadcast_to(b.numpy().reshape(-1), (out_f,)).astype(dtype),
                weight.dtype, (out_f,), [b], recipe=("bias", out_f)))
        base = node.name or node.outputs[0].name or "matmul"
        y = self._add("Conv", inputs, {"kernel_shape": [1, 1]}, base)
        producer = y.producer()
        assert producer is not None
        self.convs.add(producer)
        provenance(producer, node.name or base, f"MatMul {in_f}->{out_f}"
                   + (" + Add" if add is not None else ""))
        if add is not None:
            self.done.append(node)
            self._set(add, Twin(y))
        else:
            self._set(node, Twin(y))
        self.result.converted.append(
            (node, f"Conv2d 1x1 {in_f}->{out_f} on (B, C, 1, S)" + (" + bias" if add else "")))
        return None

    def _on_unary(self, node: ir.Node) -> None:
        t = self._twin(node.inputs[0])
        if t is None or len(node.outputs) != 1:
            return
        attrs = {k: a.value for k, a in node.attributes.items()}
        y = self._add(node.op_type, [t.value, *node.inputs[1:]], attrs, node.name or "op")
        self._set(node, Twin(y, t.perm))

    def _on_binary(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        ta, tb = self._twin(a), self._twin(b)
        if ta is None and tb is None:
            return
        perm = (ta or tb).perm  # type: ignore[union-attr]
        ins: list[ir.Value] = []
        for v, t in ((a, ta), (b, tb)):
            assert v is not None
            if t is not None:
                if t.perm != perm:
                    return
                ins.append(t.value)
                continue
            c = _const_array(v)
            if c is not None:
                moved = self._moved_constant(c, perm) if c.ndim > 0 else c
                if moved is None:
                    return
                ins.append(v if c.ndim == 0 else self._const(moved, v, f"{v.name}_ane"))
                continue
            shape = _shape(v)
            rank = self.ACT_RANK if perm is None else len(perm)
            if shape is None or len(shape) != rank:
                return
            entered = self.enter(v, perm)
            if entered is None:
                return
            ins.append(entered)
        y = self._add(node.op_type, ins, {}, node.name or "op")
        self._set(node, Twin(y, perm))

    def _on_ReduceMean(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        if t is None or t.perm is not None:
            return
        keep = node.attributes.get("keepdims")
        if keep is not None and int(keep.value) != 1:
            return
        axes_attr = node.attributes.get("axes")
        if axes_attr is not None:
            axes = [int(a) for a in axes_attr.value]
        else:
            arr = _const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if arr is None:
                return
            axes = [int(a) for a in arr.reshape(-1)]
        if axes not in ([-1], [2]):
            return
        y = self._axes_op("ReduceMean", t.value, [1], node.name or "mean", keepdims=1)
        self._set(node, Twin(y))

    def _on_LayerNormalization(self, node: ir.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        t = self._twin(x)
        if t is None or t.perm is not None or any(o.uses() for o in node.outputs[1:]):
            return
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else -1
        if axis not in (-1, 2):
            return
        scale = _const_array(node.inputs[1])
        bias = _const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if scale is None or scale.ndim != 1 or (bias is not None and bias.ndim != 1) \
                or (len(node.inputs) > 2 and node.inputs[2] is not None and bias is None):
            return
        eps = float(node.attributes["epsilon"].value) if "epsilon" in node.attributes else 1e-5
        assert x is not None
        base = node.name or "layernorm"
        mean = self._axes_op("ReduceMean", t.value, [1], base, keepdims=1)
        d = self._add("Sub", [t.value, mean], {}, base)
        var = self._axes_op("ReduceMean", self._add("Mul", [d, d], {}, base), [1], base,
                            keepdims=1)
        dtype = scale.dtype
        std = self._add("Sqrt", [self._add("Add", [var, self._const(
            np.asarray(eps, dtype=dtype), x, f"{base}_eps")], {}, base)], {}, base)
        y = self._add("Mul", [self._add("Div", [d, std], {}, base),
                              self._const(scale.reshape(1, -1, 1, 1), x, f"{base}_w")], {}, base)
        if bias is not None:
            y = self._add("Add", [y, self._const(bias.reshape(1, -1, 1, 1), x, f"{base}_b")], {},
                          base)
        self._set(node, Twin(y))

