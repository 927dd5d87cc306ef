"""``to_linear``: a norm written out over the last axis becomes ``LayerNormalization`` again.

The ane layout writes ``LayerNormalization`` over channels as ReduceMean-based ops (ONNX's op
normalizes over all trailing axes, and the channels are axis 1 there); once ``to_linear`` has
put the channels last again the same ops read::

    m = ReduceMean(x, [-1]);  d = x - m;  v = ReduceMean(d * d, [-1])
    y = d / Sqrt(v + eps) * w + b

which is ``LayerNormalization(x, w, b, axis=-1, epsilon=eps)`` term for term, so from opset 17
(where the op exists) they are fused back: the same epsilon (read from the constant), ``w``
and ``b`` the constants flattened to ``(C,)`` (ones and none when absent: the ane layout
folds a pre-norm's weight and bias into the layers that read it, whose ``(C, O)`` weight then
gives ``C`` where the shapes do not). A match is refused when any intermediate value
has another reader, or ``w`` / ``b`` vary along any axis but the last.

The ane layout's other form of the variance, ``v = ReduceSumSquare(d, [-1])`` with the
epsilon and weight scaled to ``C eps`` and ``sqrt(C) w`` (:mod:`~fc2conv.onnx.rules.ane_norm`),
is fused with ``epsilon = (C eps) / C`` and ``w = (sqrt(C) w) / sqrt(C)`` (float64, rounded
once).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.ane_twin import _const_array
from fc2conv.onnx.rules.base import Context

LAYER_NORM_OPSET = 17


def _only(value: ir.Value | None, op: str) -> ir.Node | None:
    """The one node reading ``value``, when it is an ``op`` (the value is not an output)."""
    if value is None or value.is_graph_output():
        return None
    readers = {u.node for u in value.uses()}
    if len(readers) != 1:
        return None
    node = next(iter(readers))
    return node if node.op_type == op and node.domain == "" else None


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain == "" else None


def _last_axis_mean(node: ir.Node | None, x: ir.Value | None, op: str = "ReduceMean") -> bool:
    """Whether ``node`` is ``op(x, [-1], keepdims=1)`` (axes as attribute or input)."""
    if node is None or node.op_type != op or node.inputs[0] is not x or x is None:
        return False
    keep = node.attributes.get("keepdims")
    if keep is not None and int(keep.value) != 1:
        return False
    if "axes" in node.attributes:
        axes = [int(a) for a in node.attributes["axes"].value]
    else:
        arr = _const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if arr is None:
            return False
        axes = [int(a) for a in arr.reshape(-1)]
    rank = x.shape.rank() if x.shape is not None else None
    return axes == [-1] or (rank is not None and axes == [rank - 1])


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def _channel_vector(value: ir.Value | None) -> np.ndarray | None:
    """A constant varying along its last axis only, as ``(C,)``."""
    arr = _const_array(value)
    if arr is None or arr.ndim == 0 or int(np.prod(arr.shape[:-1])) != 1:
        return None
    return arr.reshape(-1)


def fuse_layer_norms(ctx: Context) -> int:
    """Fuse every matching norm in ``ctx.graph`` (see the module docstring); return how many."""
    if ctx.opset < LAYER_NORM_OPSET:
        return 0
    fused = 0
    for div in [n for n in ctx.graph if n.op_type == "Div" and n.domain == ""]:
        if div.graph is not ctx.graph:
            continue
        found = _match(div)
        if found is None:
            continue
        x, eps, w, b, out, dead = found
        dtype = w.dtype if w is not None else np.float32
        scale = w if w is not None else np.ones(1, dtype)
        base = div.name or "layernorm"
        inputs = [x, _initializer(ctx, scale.astype(dtype), f"{base}_scale")]
        if b is not None:
            inputs.append(_initializer(ctx, b.astype(dtype), f"{base}_bias"))
        node = ir.node("LayerNormalization", inputs, {"axis": -1, "epsilon": float(eps)},
                       name=ctx.unique(f"{base}_LayerNormalization"))
        ctx.graph.insert_before(div, node)
        y = node.outputs[0]
        y.name = ctx.unique(f"{base}_layernorm_out")
        y.type, y.shape = out.type, out.shape
        ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
        if out.is_graph_output():
            name = out.name
            out.name, y.name = ctx.unique(f"{name}_unfused"), name
        read = {v for n in dead for v in n.inputs if v is not None}
        ctx.graph.remove(dead, safe=True)
        for v in read:
            if v.name in ctx.graph.initializers and not v.uses() and not v.is_graph_input():
                del ctx.graph.initializers[v.name]
        fused += 1
    return fused


def _match(div: ir.Node) -> tuple | None:
    """``(x, eps, w, b, out, nodes)`` of a norm ending in ``div`` (``w``/``b`` None: absent)."""
    d, std = div.inputs[0], div.inputs[1]
    sub, sqrt = _producer(d, "Sub"), _producer(std, "Sqrt")
    if sub is None or sqrt is None or d is None:
        return None
    x, mean = sub.inputs[0], sub.inputs[1]
    if not _last_axis_mean(_producer(mean, "ReduceMean"), x) or _only(mean, "Sub") is not sub:
        return None
    add = _producer(sqrt.inputs[0], "Add")
    if add is None or _only(sqrt.outputs[0], "Div") is not div \
            or _only(add.outputs[0], "Sqrt") is not sqrt:
        return None
    var = next((v for v in add.inputs if v is not None and (
        _producer(v, "ReduceMean") or _producer(v, "ReduceSumSquare"))), None)
    eps_value = _other(add, var) if var is not None else None
    eps = _const_array(eps_value)
    if var is None or eps is None or eps.size != 1 or _only(var, "Add") is not add:
        return None
    sum_sq = _producer(var, "ReduceSumSquare")  # the ane layout's form (ane_norm.py)
    if sum_sq is not None:
        if not _last_axis_mean(sum_sq, d, "ReduceSumSquare") \
                or {u.node for u in d.uses()} != {sum_sq, div} or d.is_graph_output():
            return None
        nodes = [div, sqrt, add, sum_sq, sub, _producer(mean, "ReduceMean")]
    else:
        mean_var = _producer(var, "ReduceMean")
        square = _producer(mean_var.inputs[0] if mean_var else None, "Mul")
        if square is None or square.inputs[0] is not d or square.inputs[1] is not d \
                or not _last_axis_mean(mean_var, square.outputs[0]) \
                or _only(square.outputs[0], "ReduceMean") is not mean_var \
                or {u.node for u in d.uses()} != {square, div} or d.is_graph_output():
            return None
        nodes = [div, sqrt, add, mean_var, square, sub, _producer(mean, "ReduceMean")]
    out, w, b = div.outputs[0], None, None
    mul = _only(out, "Mul")
    if mul is not None and (w := _channel_vector(_other(mul, out))) is not None:
        nodes.append(mul)
        out = mul.outputs[0]
        shift = _only(out, "Add")
        if shift is not None and (b := _channel_vector(_other(shift, out))) is not None:
            nodes.append(shift)
            out = shift.outputs[0]
    channels = x.shape[-1] if x is not None and x.shape is not None else None
    if not isinstance(channels, int):  # a value the linear pass made: read the weights
        channels = max((v.size for v in (w, b) if v is not None), default=None)
    if channels is None:  # no weight left (to_conv folded it into the layers that read it)
        channels = _rows_read(out)
    if x is None or not isinstance(channels, int) or channels < 2 \
            or any(v is not None and v.size not in (1, channels) for v in (w, b)):
        return None
    if w is None:  # LayerNormalization's scale has the normalized shape (ORT checks it)
        dtype = x.dtype.numpy() if x.dtype is not None else (
            b.dtype if b is not None else np.float32)
        w = np.ones(channels, dtype)
    w = np.broadcast_to(w, (channels,))
    b = None if b is None else np.broadcast_to(b, (channels,))
    epsilon = float(eps.reshape(-1)[0])
    if sum_sq is not None:  # d / sqrt(sum d^2 + C eps) * w = d / sqrt(mean d^2 + eps) * w/sqrt(C)
        epsilon /= channels
        w = (w.astype(np.float64) / np.sqrt(channels)).astype(w.dtype)
    return x, epsilon, w, b, out, nodes


def _rows_read(value: ir.Value) -> int | None:
    """The input width of the ``MatMul`` by a constant ``(C, O)`` weight that reads ``value``."""
    for use in value.uses():
        node = use.node
        if node.op_type == "MatMul" and node.domain == "" and use.idx == 0:
            weight = _const_array(node.inputs[1])
            if weight is not None and weight.ndim == 2:
                return int(weight.shape[0])
    return None


def _initializer(ctx: Context, array: np.ndarray, name: str) -> ir.Value:
    arr = np.ascontiguousarray(array)
    value = ir.Value(name=ctx.unique(name), shape=ir.Shape(arr.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr))
    ctx.graph.register_initializer(value)
    return value
