"""``layout="ane"``: a channel norm's variance as one ``ReduceSumSquare``, not a square and a mean.

In ``(B, C, 1, S)`` a LayerNorm or RMSNorm over the channels is written out op by op (no ONNX
op or onnxruntime kernel normalizes axis 1 without moving data), and at small widths each op
costs onnxruntime about a microsecond whatever its size. The mean of squares takes two of them,
``ReduceMean(Mul(d, d), [1])`` (or ``Pow(d, 2)``); ``ReduceSumSquare(d, [1])`` is one. The
``1/C`` it leaves out goes into two constants the norm already has, its epsilon and its weight::

    y = d / sqrt(sum_c d[c]^2 / C + eps) * w
      = d / sqrt(sum_c d[c]^2 + C eps) * (sqrt(C) w)

(``d = x - mean(x)`` for a LayerNorm, ``d = x`` for an RMSNorm). ``C eps`` and ``sqrt(C) w``
are computed in float64 and rounded once to the norm's dtype; the sum of squares itself loses
a division by ``C``. So each value differs from the unrewritten graph's by a few units of
roundoff: compare says equivalent, not identical.

Matched, on ``(B, C, 1, S)`` values with a static ``C``: the square (``Mul(d, d)`` or
``Pow(d, 2)``) read only by ``ReduceMean`` over axis 1 (keepdims), read only by ``Add`` of a
one-element constant, read only by ``Sqrt``, read only by ``Div(d, s)``, or by ``Div(1, s)``
or ``Reciprocal(s)`` whose only reader is ``Mul(d, r)``; the result read (through ``Cast``\\ s
that keep its dtype) only by a ``Mul`` by a constant that broadcasts along axis 1 (the norm's
weight). A norm without such a weight keeps its form: ``sqrt(C)`` would need an op of its own.
So does a norm of the value just moved into the layout (``d`` a Transpose's output, through
Casts): onnxruntime's transpose optimizer pushes that Transpose through a ``ReduceSumSquare``
(not through the square and mean) and then runs one Transpose more.
This runs before :mod:`~fc2conv.onnx.rules.ane_fold`, which then gives ``sqrt(C) w`` (and a
bias) to the Convs that read a pre-norm. ``to_linear`` reads the form back
(:mod:`~fc2conv.onnx.rules.ane_back` maps the axis, :mod:`~fc2conv.onnx.rules.norm_back`
fuses it into ``LayerNormalization`` with ``eps = (C eps) / C`` and ``w = (sqrt(C) w) /
sqrt(C)``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.ane_fold import _channel_vector
from fc2conv.onnx.rules.ane_twin import _axes, _const_array
from fc2conv.onnx.rules.base import FLOAT_TYPES, Context, drop_if_unused, int64_constant
from fc2conv.onnx.rules.norm_back import _initializer, _only, _other

log = logging.getLogger(__name__)


def _squared(node: ir.Node | None) -> ir.Value | None:
    """``d`` when ``node`` is ``Mul(d, d)`` or ``Pow(d, 2)``."""
    if node is None or node.domain != "" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Mul" and a is not None and a is b:
        return a
    if node.op_type == "Pow" and a is not None:
        e = _const_array(b)
        if e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 2.0:
            return a
    return None


def _entered(value: ir.Value) -> bool:
    """Whether ``value`` is (through Casts) a Transpose's output: the move into the layout."""
    node = value.producer()
    while node is not None and node.op_type == "Cast" and node.domain == "" \
            and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node is not None and node.op_type == "Transpose" and node.domain == ""


def _weight_mul(value: ir.Value) -> tuple[ir.Node, int] | None:
    """The ``Mul`` by a constant that reads ``value`` (through dtype-keeping Casts), and the
    constant's input index."""
    while True:
        if value.is_graph_output():
            return None
        readers = {u.node for u in value.uses()}
        if len(readers) != 1:
            return None
        node = next(iter(readers))
        if node.domain != "":
            return None
        if node.op_type == "Cast" and node.outputs[0].dtype == value.dtype \
                and value.dtype is not None:
            value = node.outputs[0]
            continue
        if node.op_type != "Mul" or len(node.inputs) != 2:
            return None
        other = _other(node, value)
        if other is None or other is value or _const_array(other) is None:
            return None
        return node, 1 if node.inputs[1] is other else 0


def _match(mean: ir.Node) -> tuple | None:
    """``(d, square, add, eps index, weight Mul, weight index, C)`` of a norm whose variance
    is ``mean``, or None."""
    x = mean.inputs[0]
    square = x.producer() if x is not None else None
    d = _squared(square)
    if d is None or square is None or _only(square.outputs[0], "ReduceMean") is not mean:
        return None
    shape = d.shape
    if shape is None or shape.rank() != 4 or not isinstance(shape[1], int) \
            or d.dtype not in FLOAT_TYPES or _entered(d):
        return None
    keep = mean.attributes.get("keepdims")
    if (keep is not None and int(keep.value) != 1) or _axes(mean) not in ([1], [-3]):
        return None
    add = _only(mean.outputs[0], "Add")
    eps_value = _other(add, mean.outputs[0]) if add is not None else None
    eps = _const_array(eps_value)
    if add is None or eps is None or eps.size != 1 or eps_value is mean.outputs[0]:
        return None
    sqrt = _only(add.outputs[0], "Sqrt")
    if sqrt is None:
        return None
    std = sqrt.outputs[0]
    readers = {u.node for u in std.uses()}
    if std.is_graph_output() or len(readers) != 1:
        return None
    div = next(iter(readers))
    if div.domain != "":
        return None
    if div.op_type == "Div" and div.inputs[1] is std and div.inputs[0] is d:
        y = div.outputs[0]
    elif (div.op_type == "Div" and div.inputs[1] is std and (one := _const_array(
            div.inputs[0])) is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1.0) \
            or div.op_type == "Reciprocal":
        mul = _only(div.outputs[0], "Mul")
        if mul is None or _other(mul, div.outputs[0]) is not d:
            return None
        y = mul.outputs[0]
    else:
        return None
    found = _weight_mul(y)
    if found is None:
        return None
    weight, w_idx = found
    w = _const_array(weight.inputs[w_idx])
    channels = int(shape[1])
    if w is None or _channel_vector(w, channels) is None:  # a float weight along axis 1
        return None
    return d, square, add, 1 if add.inputs[1] is eps_value else 0, weight, w_idx, channels


def square_sums(ctx: Context) -> int:
    """Rewrite every matching channel norm of ``ctx.graph`` (see the module docstring); return
    how many."""
    done = 0
    for mean in [n for n in ctx.graph if n.op_type == "ReduceMean" and n.domain == ""]:
        found = _match(mean)
        if found is None:
            continue
        d, square, add, e_idx, weight, w_idx, channels = found
        eps = _const_array(add.inputs[e_idx])
        w = _const_array(weight.inputs[w_idx])
        assert eps is not None and w is not None
        base = mean.name or "norm"
        new_eps = (eps.astype(np.float64) * channels).astype(eps.dtype)
        new_w = (w.astype(np.float64) * np.sqrt(channels)).astype(w.dtype)
        if ctx.opset >= 18:
            node = ir.node("ReduceSumSquare", [d, int64_constant(ctx, [1], "fc2conv_axes")],
                           {"keepdims": 1}, name=ctx.unique(f"{base}_ReduceSumSquare"))
        else:
            node = ir.node("ReduceSumSquare", [d], {"axes": [1], "keepdims": 1},
                           name=ctx.unique(f"{base}_ReduceSumSquare"))
        ctx.graph.insert_before(mean, node)
        out = node.outputs[0]
        out.name = ctx.unique(f"{base}_sumsq_out")
        out.type, out.shape = mean.outputs[0].type, mean.outputs[0].shape
        old = [add.inputs[e_idx], weight.inputs[w_idx]]
        add.replace_input_with(e_idx, _initializer(ctx, new_eps, f"{base}_eps_sum"))
        weight.replace_input_with(w_idx, _initializer(ctx, new_w, f"{base}_w_sum"))
        ir.convenience.replace_all_uses_with(mean.outputs[0], out)
        old += [v for n in (mean, square) for v in n.inputs[1:]]
        ctx.graph.remove([mean, square], safe=True)
        drop_if_unused(ctx, *old)
        done += 1
    if done:
        log.info("ane: %d channel norm(s) with one ReduceSumSquare", done)
    return done
