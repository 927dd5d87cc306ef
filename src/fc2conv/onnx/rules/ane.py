"""``layout="ane"``: rank-3 MatMuls as Conv2d on ``(B, C, 1, S)``, activations kept there.

Every activation ``x[b, s, c]`` of the Linear layout has a *twin* ``x'[b, c, 0, s] = x[b, s, c]``
in the conv layout; a value split into heads ``v[b, s, h, d]`` (or any rank-4 value) has a twin
``v'`` with ``v = Transpose(v', p)`` for a recorded permutation ``p``. One walk over the graph
in topological order gives each op whose inputs have twins a twin op, reading
:data:`fc2conv.core.positionwise.OPS` (the same table as the PyTorch pass):

* ``CHANNEL_MIX`` -- ``MatMul(x, B) (+ c)``: ``Conv(x', K, c)``, ``K[o, c, 0, 0] = B[c, o]``;
* ``ELEMENTWISE`` -- the same op on the twins; a constant operand ``c`` (broadcast to rank 3) is
  moved once: ``c'[i, k, 0, j] = c[i, j, k]``; for a permuted twin ``c' = c.transpose(p^-1)``;
* ``CHANNEL_REDUCE`` -- ``ReduceMean(x, [-1], keepdims)``: ``ReduceMean(x', [1])``;
* ``CHANNEL_NORM`` -- ``LayerNormalization`` over the last axis: over axis 1,
  ``y' = (x' - mean_1 x') / sqrt(var_1 x' + eps) * w' + b'`` (ReduceMean-based, since ONNX's
  LayerNormalization normalizes over all trailing axes);
* ``ATTENTION``, as exporters write it: the head split ``Reshape(x, [B, S, H, D])`` is
  ``Reshape(x', [B, H, D, S])`` with ``p = (0, 3, 1, 2)`` (no data moves); a ``Transpose(v, q)``
  only composes ``p[q[i]]``; ``MatMul(a, b)`` of permuted twins is one ``Einsum`` on the twins
  (``scores[b,h,q,k] = sum_d Q'[b,h,d,q] K'[b,h,d,k]``, ``out'[b,h,d,q] = sum_k P[b,h,q,k]
  V'[b,h,d,k]``), and the head merge ``Reshape(o, [B, S, C])`` of ``o = Transpose(o', (0, 3,
  1, 2))`` is ``Reshape(o', [B, C, 1, S])``. Softmax, Slice and Concat map their axis by ``p``.

A value enters the conv layout once (``Unsqueeze + Transpose``, or a Reshape when ``S == 1``
or a Transpose ``(B, C, S) -> (B, S, C)`` is undone); wherever an op outside the table reads a
twinned value, or it is a graph output, the value leaves once (``Transpose + Squeeze``). The
original nodes left without readers are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from fc2conv.core.positionwise import Channel, onnx_types
from fc2conv.onnx.rules.base import (
    FLOAT_TYPES,
    LAYOUT_KEY,
    Context,
    Refused,
    constant,
    dims,
    new_initializer,
    provenance,
)
from fc2conv.onnx.rules.shape_axes import (
    ACT,
    arranged_for,
    axes_of,
    logical_order,
    perm_of,
    reshape_axes,
)
from fc2conv.onnx.rules.shape_axes import groups as regroups
from fc2conv.onnx.rules.shape_probe import Probe
from fc2conv.onnx.weights import linear_to_conv_kernel

log = logging.getLogger(__name__)

ELEMENTWISE = onnx_types(Channel.ELEMENTWISE)
BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
UNARY = ELEMENTWISE - BINARY
MIX = onnx_types(Channel.CHANNEL_MIX)
REDUCE = onnx_types(Channel.CHANNEL_REDUCE)
NORM = onnx_types(Channel.CHANNEL_NORM)
STREAM = ELEMENTWISE | MIX | REDUCE | NORM | {"Concat", "Pow"}
HEADS = (0, 3, 1, 2)  # v[b, s, h, d] = v'[b, h, d, s]
IDENTITY = (0, 1, 2, 3)


@dataclass
class Twin:
    """``value`` in the conv layout: ``act`` for ``(B, C, 1, S)`` of a ``(B, S, C)`` value,
    else a rank-4 ``value`` with ``original = Transpose(value, perm)``."""

    value: ir.Value
    perm: tuple[int, ...] | None = None  # None: the act layout
    entered: bool = False  # made by a layout change; the original stays for other readers


@dataclass
class AneResult:
    converted: list[tuple[ir.Node, str]] = field(default_factory=list)
    refused: list[tuple[ir.Node, str]] = field(default_factory=list)


def _shape(v: ir.Value | None) -> tuple[int | str | None, ...] | None:
    if v is None or v.shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value if d.value is not None else None)
                 for d in v.shape)


def _same_dim(a: int | str | None, b: int | str | None) -> bool:
    return a is not None and a == b


def _compose(p: Sequence[int], q: Sequence[int]) -> tuple[int, ...]:
    return tuple(p[i] for i in q)


def _inverse(p: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, j in enumerate(p):
        inv[j] = i
    return tuple(inv)


_FOLD: dict[str, Any] = {
    "Cos": np.cos, "Sin": np.sin, "Neg": np.negative, "Add": np.add, "Sub": np.subtract,
    "Mul": np.multiply, "Div": np.divide, "Equal": np.equal, "Where": np.where}


def _const_array(v: ir.Value | None, depth: int = 8) -> np.ndarray | None:
    """The value of ``v`` when it is a constant, or computed from constants by a few cheap ops
    (an exporter's rotary cos/sin tables of a traced length: ``Unsqueeze(Cast(Cos(c) * k))``)."""
    if v is None or v.is_graph_input():
        return None
    try:
        return constant(v, "operand").numpy()
    except Refused:
        pass
    p = v.producer()
    if depth == 0 or p is None or p.domain != "" or len(p.outputs) != 1 \
            or p.op_type not in {*_FOLD, "Cast", "Unsqueeze", "ConstantOfShape", "Where"}:
        return None
    if p.op_type == "ConstantOfShape":
        shape = _const_array(p.inputs[0], depth - 1)
        fill = p.attributes["value"].as_tensor().numpy().reshape(-1) \
            if "value" in p.attributes else np.zeros(1, np.float32)
        if shape is None or int(np.prod(shape)) > 1 << 20:
            return None
        return np.full([int(d) for d in shape.reshape(-1)], fill[0], dtype=fill.dtype)
    args = [_const_array(u, depth - 1) for u in p.inputs]
    if any(a is None for a in args) or not args or max(a.size for a in args) > 1 << 20:  # type: ignore[union-attr]
        return None
    if p.op_type == "Cast":
        return args[0].astype(ir.DataType(int(p.attributes["to"].value)).numpy())  # type: ignore[union-attr]
    if p.op_type == "Unsqueeze":
        axes = [int(a) for a in (args[1].reshape(-1) if len(args) > 1  # type: ignore[union-attr]
                                 else p.attributes["axes"].value)]
        out = args[0]
        rank = out.ndim + len(axes)  # type: ignore[union-attr]
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)  # type: ignore[arg-type]
        return out
    with np.errstate(all="ignore"):
        result = _FOLD[p.op_type](*args)
    if p.op_type == "Equal":
        return np.asarray(result)
    return np.asarray(result, dtype=np.result_type(*args[-2:]))  # Where: its two branches


class AnePass:
    """One walk over ``ctx.graph`` (see the module docstring)."""

    ACT_RANK = 3  # the rank of an original value whose twin has the act layout
    ACT_AXES = ACT  # where its axes are stored (:mod:`fc2conv.onnx.rules.shape_axes`)

    def __init__(self, ctx: Context, wanted: set[str] | None = None) -> None:
        self.ctx = ctx
        self.wanted = wanted
        self.graph = ctx.graph
        self.twins: dict[ir.Value, Twin] = {}
        self.entered: dict[tuple[ir.Value, tuple[int, ...] | None], ir.Value] = {}
        self.carried: dict[tuple[ir.Value, tuple[int, ...]], ir.Value] = {}
        self.done: list[ir.Node] = []
        self.result = AneResult()
        self.anchor: ir.Node | None = None
        self.read: set[ir.Value] = set()
        self.probe: Probe | None = None

    # -- building blocks ------------------------------------------------------------------
    def _add(self, op: str, inputs: Sequence[ir.Value | None], attrs: dict | None = None,
             name: str = "ane", tag: str | None = None) -> ir.Value:
        node = ir.node(op, list(inputs), attrs or {}, name=self.ctx.unique(f"{name}_{op}"))
        node.outputs[0].name = self.ctx.unique(f"{name}_{op.lower()}_out")
        if tag is not None:
            node.metadata_props[LAYOUT_KEY] = tag
        if self.anchor is None:
            self.graph.append(node)  # convert_model sorts the graph at the end
        else:
            self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def _ints(self, values: Sequence[int], name: str) -> ir.Value:
        from fc2conv.onnx.rules.base import int64_constant
        return int64_constant(self.ctx, list(values), name)

    def _axes_op(self, op: str, x: ir.Value, axes: Sequence[int], name: str,
                 tag: str | None = None, keepdims: int | None = None) -> ir.Value:
        """Squeeze / Unsqueeze / ReduceMean with ``axes`` as attribute or input by opset."""
        as_input = self.ctx.opset >= (18 if op == "ReduceMean" else 13)
        attrs: dict = {} if keepdims is None else {"keepdims": keepdims}
        if as_input:
            return self._add(op, [x, self._ints(axes, "fc2conv_axes")], attrs, name, tag)
        return self._add(op, [x], {**attrs, "axes": list(axes)}, name, tag)

    def _const(self, array: np.ndarray, like: ir.Value, name: str) -> ir.Value:
        arr = np.ascontiguousarray(array)
        dtype = ir.DataType.from_numpy(arr.dtype)
        value = ir.Value(name=self.ctx.unique(name), shape=ir.Shape(arr.shape),
                         type=ir.TensorType(dtype), const_value=ir.tensor(arr))
        self.graph.register_initializer(value)
        return value

    def enter(self, x: ir.Value, perm: tuple[int, ...] | None = None) -> ir.Value | None:
        """The twin of a value with none (``perm`` None: ``(B, S, C)`` -> ``(B, C, 1, S)``)."""
        key = (x, perm)
        if key in self.entered:
            return self.entered[key]
        if perm is None and self._upstream(x):
            return self.twins[x].value
        shape = _shape(x)
        base = x.name or "x"
        if perm is not None:
            if shape is None or len(shape) != len(perm):
                return None
            out = self._carry(x, perm)
        else:
            if shape is None or len(shape) != 3:
                return None
            producer = x.producer()
            if producer is not None and producer.op_type == "Transpose" and \
                    [int(p) for p in producer.attributes["perm"].value] == [0, 2, 1]:
                src = producer.inputs[0]  # (B, C, S) made (B, S, C): undo it instead
                assert src is not None
                out = self._axes_op("Unsqueeze", src, [2], f"{base}_to_ane")
            elif shape[1] == 1 and isinstance(shape[2], int):
                out = self._add("Reshape", [x, self._ints([0, shape[2], 1, 1], "fc2conv_shape")],
                                {}, f"{base}_to_ane")
            else:
                unsq = self._axes_op("Unsqueeze", x, [1], f"{base}_to_ane")
                out = self._add("Transpose", [unsq], {"perm": [0, 3, 1, 2]}, f"{base}_to_ane",
                                "enter:ane")
        self.entered[key] = out
        if x not in self.twins:
            self.twins[x] = Twin(out, perm, entered=True)
        return out

    def _carry(self, x: ir.Value, perm: tuple[int, ...], depth: int = 24) -> ir.Value:
        """``Transpose(x, perm^-1)``, the move carried up through the ops ``x`` is computed by
        (a position table computed at run time: ``Unsqueeze(Cast(Cos(Concat(f, f))))`` of
        ``f = Transpose(MatMul(inv_freq, positions))``) to where it is free (a constant, or an
        inverse Transpose) or shared: one move per table, not one per reader.

        Each step relabels axes only: ``Transpose(op(u), p^-1) = op'(Transpose(u, q^-1))``
        for the elementwise ops (constants moved), Unsqueeze / Gather (the axis added or
        removed kept apart), Expand (its shape permuted), Slice / Concat (their axes mapped)
        and Transpose (``q`` composed)."""
        if list(perm) == sorted(perm):
            return x
        key = (x, perm)
        if key not in self.carried:
            out = self._carried(x, perm, depth) if depth > 0 else None
            self.carried[key] = out if out is not None else self._add(
                "Transpose", [x], {"perm": list(_inverse(perm))}, f"{x.name or 'x'}_to_ane",
                "enter:ane")
        return self.carried[key]

    def _carried(self, x: ir.Value, perm: tuple[int, ...], depth: int) -> ir.Value | None:
        r = len(perm)
        c = _const_array(x)
        if c is not None:
            return None if c.ndim != r else self._const(c.transpose(_inverse(perm)), x,
                                                        f"{x.name}_ane")
        p = x.producer()
        if p is None or p.domain != "" or len(p.outputs) != 1 or p.graph is not self.graph:
            return None
        op = p.op_type
        base = p.name or op
        attrs = {k: a.value for k, a in p.attributes.items()}
        u = p.inputs[0] if p.inputs else None
        su = _shape(u)
        if u is None or su is None:
            return None
        if op in UNARY and all(_const_array(v) is not None for v in p.inputs[1:] if v):
            return self._add(op, [self._carry(u, perm, depth - 1), *p.inputs[1:]], attrs, base)
        if op in BINARY | {"Where"}:
            ins: list[ir.Value | None] = []
            for v in p.inputs:
                cv = _const_array(v)
                sv = _shape(v)
                if cv is not None and cv.size == 1:
                    ins.append(v)
                elif cv is not None and cv.ndim <= r:
                    ins.append(self._const(self._moved_constant(cv, perm), x,  # type: ignore[arg-type]
                                           f"{v.name}_ane" if v is not None else "c_ane"))
                elif v is not None and sv is not None and len(sv) == r:
                    ins.append(self._carry(v, perm, depth - 1))
                else:
                    return None
            return self._add(op, ins, attrs, base)
        if op == "Transpose":
            q = attrs.get("perm")
            if q is None or len(q) != r:
                return None
            inv_q = _inverse([int(i) for i in q])
            return self._carry(u, tuple(perm[inv_q[i]] for i in range(r)), depth - 1)
        if op == "Unsqueeze":
            axes = _const_array(p.inputs[1]) if len(p.inputs) > 1 else None
            listed = axes.reshape(-1).tolist() if axes is not None else attrs.get("axes")
            if listed is None or len(su) + len(listed) != r:
                return None
            added = sorted(int(a) % r for a in listed)
            kept = [i for i in range(r) if i not in added]
            q = [kept.index(i) for i in sorted(kept, key=lambda i: perm[i])]
            moved = self._carry(u, _inverse(q), depth - 1)
            return self._axes_op("Unsqueeze", moved, sorted(perm[a] for a in added), base)
        if op == "Expand" and len(su) == r:
            shape_v = p.inputs[1]
            given = _const_array(shape_v)
            if given is not None:
                if given.size != r:
                    return None
                target = self._ints([int(given.reshape(-1)[i]) for i in _inverse(perm)],
                                    "fc2conv_shape")
            else:
                sh = _shape(shape_v)
                if shape_v is None or sh is None or sh != (r,):
                    return None
                target = self._add("Gather", [shape_v, self._ints(list(_inverse(perm)),
                                                                  "fc2conv_perm")],
                                   {"axis": 0}, base)
            return self._add("Expand", [self._carry(u, perm, depth - 1), target], {}, base)
        if op == "Slice" and len(su) == r and len(p.inputs) >= 3:
            starts = _shape(p.inputs[1])
            axes = _const_array(p.inputs[3]) if len(p.inputs) > 3 and p.inputs[3] else None
            if axes is None and (len(p.inputs) > 3 and p.inputs[3] is not None
                                 or starts is None or not isinstance(starts[0], int)):
                return None
            listed = axes.reshape(-1).tolist() if axes is not None else list(range(starts[0]))  # type: ignore[arg-type, index]
            new_axes = self._ints([perm[int(a) % r] for a in listed], "fc2conv_axes")
            return self._add("Slice", [self._carry(u, perm, depth - 1), p.inputs[1],
                                       p.inputs[2], new_axes, *p.inputs[4:]], {}, base)
        if op == "Concat":
            if any(v is None or _shape(v) is None or len(_shape(v) or ()) != r
                   for v in p.inputs):
                return None
            ins = [self._carry(v, perm, depth - 1) for v in p.inputs if v is not None]
            return self._add("Concat", ins, {"axis": perm[int(attrs["axis"]) % r]}, base)
        if op == "Gather":
            idx = _shape(p.inputs[1])
            axis = int(attrs.get("axis", 0)) % len(su)
            if idx is None or len(idx) > 1 or len(su) != r + 1 - len(idx):
                return None
            if len(idx) == 1:
                return self._add("Gather", [self._carry(u, perm, depth - 1), p.inputs[1]],
                                 {"axis": perm[axis]}, base)
            # a scalar index drops u's axis: keep it last in u's twin, gather it there
            pu = tuple(r if j == axis else perm[j - (j > axis)] for j in range(r + 1))
            return self._add("Gather", [self._carry(u, pu, depth - 1), p.inputs[1]],
                             {"axis": r}, base)
        return None

    def _roots(self, x: ir.Value, depth: int = 24) -> set[ir.Value] | None:
        """The values outside the table that ``x`` is computed from by table ops (``None``:
        too deep to tell)."""
        if x in self.twins or _const_array(x) is not None:
            return set()
        p = x.producer()
        if p is None or p.op_type not in UNARY | BINARY | NORM | REDUCE or p.domain != "" \
                or p.graph is not self.graph:
            return {x}
        if depth == 0:
            return None
        out: set[ir.Value] = set()
        for u in p.inputs[:1] if p.op_type in NORM | REDUCE else p.inputs:
            if u is None:
                continue
            r = self._roots(u, depth - 1)
            if r is None:
                return None
            out |= r
        return out

    def _upstream(self, x: ir.Value) -> bool:
        """Enter where ``x``'s table-op chain starts, when it starts from one value (a pre-LN
        block's input feeds both the norm and the residual: one move, not two)."""
        p = x.producer()
        if p is None or p in self.done or p.op_type not in UNARY | BINARY | NORM | REDUCE \
                or x.shape is None or x.shape.rank() != 3:
            return False
        roots = self._roots(x)
        if roots is None or len(roots) > 1:
            return False
        for u in p.inputs[:1] if p.op_type in NORM | REDUCE else p.inputs:
            if u is not None and u not in self.twins and _const_array(u) is None and (
                    u.shape is None or u.shape.rank() != 3 or self.enter(u) is None):
                return False
        handler = {**dict.fromkeys(UNARY, self._on_unary),
                   **dict.fromkeys(BINARY, self._on_binary)}.get(p.op_type) \
            or getattr(self, f"_on_{p.op_type}")
        handler(p)
        return x in self.twins

    def leave(self, twin: Twin, like: ir.Value) -> ir.Value:
        """The original layout back from a twin (the one move out)."""
        base = like.name or "y"
        if twin.perm is not None:
            if list(twin.perm) == sorted(twin.perm):
                return twin.value
            return self._add("Transpose", [twin.value], {"perm": list(twin.perm)},
                             f"{base}_from_ane", "exit:ane")
        t = self._add("Transpose", [twin.value], {"perm": [0, 2, 3, 1]}, f"{base}_from_ane",
                      "exit:ane")
        return self._axes_op("Squeeze", t, [1], f"{base}_from_ane")

    def _set(self, node: ir.Node, twin: Twin, out: ir.Value | None = None) -> None:
        self.twins[out if out is not None else node.outputs[0]] = twin
        self.done.append(node)

    # -- the walk -------------------------------------------------------------------------
    def run(self) -> AneResult:
        if any(n.op_type in ("Reshape", "Expand") and len(n.inputs) > 1
               and _const_array(n.inputs[1]) is None for n in self.graph):
            self.probe = Probe(self.graph)  # shapes computed at run time: read them concretely
        for node in list(self.graph):
            if node.graph is not self.graph or node.domain != "" or len(node.outputs) < 1:
                continue
            if node.outputs[0] in self.twins:
                continue
            self.anchor = node
            handler = getattr(self, f"_on_{node.op_type}", None)
            try:
                if node.op_type in MIX and node.op_type == "MatMul":
                    self._on_matmul(node)
                elif node.op_type in UNARY:
                    self._on_unary(node)
                elif node.op_type in BINARY:
                    self._on_binary(node)
                elif handler is not None:
                    handler(node)
            except Refused as exc:
                log.info("ane: %s (%s) stays: %s", node.name, node.op_type, exc)
        self._finish()
        return self.result

    def _twin(self, v: ir.Value | None) -> Twin | None:
        return None if v is None else self.twins.get(v)

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

    def _on_batched_matmul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        ta, tb = self._twin(a), self._twin(b)
        if (ta is None and tb is None) or a is None or b is None:
            return
        if (ta is not None and ta.perm is None) or (tb is not None and tb.perm is None):
            return
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or len(sa) != 4 or len(sb) != 4:
            return
        if not all(self._same_size(a, b, i) for i in (0, 1)) or self.ctx.opset < 12:
            return  # Einsum with explicit labels does not broadcast batch dims
        pa = ta.perm if ta is not None else IDENTITY
        pb = tb.perm if tb is not None else IDENTITY
        assert pa is not None and pb is not None
        va = ta.value if ta is not None else a
        vb = tb.value if tb is not None else b
        la, lb = "zhik", "zhkj"  # the logical axes of a and b
        phys_a = ["?"] * 4
        phys_b = ["?"] * 4
        for i in range(4):
            phys_a[pa[i]] = la[i]
            phys_b[pb[i]] = lb[i]
        # keep the columns' order of b: out' = (.., j, i) when b' stores j before k
        swapped = phys_b.index("j") < phys_b.index("k")
        out_perm = (0, 1, 3, 2) if swapped else IDENTITY
        out_labels = "zhji" if swapped else "zhij"
        equation = f"{''.join(phys_a)},{''.join(phys_b)}->{out_labels}"
        y = self._add("Einsum", [va, vb], {"equation": equation}, node.name or "attn")
        if out_perm == IDENTITY:
            ir.convenience.replace_all_uses_with(node.outputs[0], y, replace_graph_outputs=False)
            if node.outputs[0].is_graph_output():
                self._set(node, Twin(y, IDENTITY))
            else:
                self.done.append(node)
        else:
            self._set(node, Twin(y, out_perm))

    def _on_unary(self, node: ir.Node) -> None:
        t = self._twin(node.inputs[0])
        if t is None or len(node.outputs) != 1:
            return
        attrs = {k: a.value for k, a in node.attributes.items()}
        y = self._add(node.op_type, [t.value, *node.inputs[1:]], attrs, node.name or "op")
        self._set(node, Twin(y, t.perm))

    def _moved_constant(self, c: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray | None:
        if perm is None:
            if c.ndim > 3:
                return None
            c = c.reshape((1,) * (3 - c.ndim) + c.shape)
            return c.transpose(0, 2, 1)[:, :, None, :]
        if c.ndim > len(perm):
            return None
        c = c.reshape((1,) * (len(perm) - c.ndim) + c.shape)
        return c.transpose(_inverse(perm))

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

    def _on_Softmax(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        if t is None or self.ctx.opset < 13:
            return
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else -1
        rank = 3 if t.perm is None else len(t.perm)
        axis %= rank
        new_axis = (1 if axis == 2 else None) if t.perm is None else t.perm[axis]
        if new_axis is None:
            return
        y = self._add("Softmax", [t.value], {"axis": new_axis}, node.name or "softmax")
        self._set(node, Twin(y, t.perm))

    def _on_Reshape(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        if t is None:
            return
        self._reshape_static(node, t)
        if node not in self.done:
            self._reshape_by_axes(node, t)

    def _reshape_static(self, node: ir.Node, t: Twin) -> None:
        x, out = node.inputs[0], node.outputs[0]
        sx, so = _shape(x), _shape(out)
        if sx is None or so is None:
            return
        if len(sx) == len(so) and all(_same_dim(a, b) for a, b in zip(sx, so, strict=True)):
            self._set(node, t)  # a reshape to the same shape
        elif t.perm is None and len(so) == 4 and len(sx) == 3:  # head split (B,S,C)->(B,S,H,D)
            h, d = so[2], so[3]
            if not (_same_dim(sx[0], so[0]) and _same_dim(sx[1], so[1])) \
                    or not isinstance(h, int) or not isinstance(d, int) or sx[2] != h * d:
                return
            y = self._add("Reshape", [t.value, self._ints([0, h, d, -1], "fc2conv_shape")], {},
                          node.name or "split")
            self._set(node, Twin(y, HEADS))
        elif t.perm == HEADS and len(so) == 3 and len(sx) == 4:  # head merge
            c = so[2]
            if not (_same_dim(sx[0], so[0]) and _same_dim(sx[1], so[1])) \
                    or not isinstance(c, int) or sx[2] is None or sx[3] is None \
                    or c != sx[2] * sx[3]:  # type: ignore[operator]
                return
            y = self._add("Reshape", [t.value, self._ints([0, c, 1, -1], "fc2conv_shape")], {},
                          node.name or "merge")
            self._set(node, Twin(y))
        elif t.perm is not None:
            self._merge(node, t, sx, so)

    def _reshape_by_axes(self, node: ir.Node, t: Twin) -> None:
        """A Reshape whose sizes shape inference could not tell (a target computed from
        ``Shape(x)`` at run time): the regrouping read from the probe, the target's elements
        gathered into the stored order (:mod:`fc2conv.onnx.rules.shape_axes`)."""
        x, out, target = node.inputs[0], node.outputs[0], node.inputs[1]
        allowzero = node.attributes.get("allowzero")
        zero_is_copy = allowzero is None or int(allowzero.value) == 0
        if self.probe is None or x is None or target is None:
            return
        runs = self.probe.runs(x, out)
        if runs is None:
            return
        units = self.probe.units(out)
        axes = self._axis_map(t)
        new = reshape_axes(axes, runs, units, self.ACT_AXES)
        order = arranged_for(axes, runs, units, self.ACT_AXES) if new is None else None
        if order is not None:  # one Transpose of the twin, then the same Reshape
            moved = self._add("Transpose", [t.value], {"perm": order}, node.name or "merge",
                              "heads")
            t = Twin(moved, perm_of(tuple(axes[q] for q in order)))
            axes = self._axis_map(t)
            new = reshape_axes(axes, runs, units, self.ACT_AXES)
        if new is None:
            return
        rank_out = sum(len(outs) for _, outs in runs)
        base = node.name or "reshape"
        const = _const_array(target)
        if const is not None and not (zero_is_copy and (const == 0).any()):
            vals = [int(v) for v in const.reshape(-1)]
            shape = self._ints([1 if a is None else vals[a] for a in new], "fc2conv_shape")
        else:
            logical = target
            if zero_is_copy and self._may_be_zero(target):  # 0: the input's size there
                rank_in = len(self._logical_rank_order(t))
                if rank_out > rank_in:
                    return
                sizes = self._logical_shape(t, base, range(rank_out))
                zero = self._add("Equal", [target, self._ints([0], "fc2conv_zero")], {}, base)
                logical = self._add("Where", [zero, sizes, target], {}, base)
            if None in new:
                logical = self._add("Concat", [logical, self._ints([1], "fc2conv_one")],
                                    {"axis": 0}, base)
            shape = self._gather(logical, [rank_out if a is None else a for a in new], base)
        y = self._add("Reshape", [t.value, shape], {} if zero_is_copy else {"allowzero": 1}, base)
        self._set(node, Twin(y) if new == self.ACT_AXES else Twin(y, perm_of(new)))

    def _axis_map(self, t: Twin) -> tuple[int | None, ...]:
        return axes_of(t.perm, self.ACT_AXES)

    def _logical_rank_order(self, t: Twin) -> list[int | None]:
        rank = self.ACT_RANK if t.perm is None else len(t.perm)
        return logical_order(self._axis_map(t), rank)

    def _logical_shape(self, t: Twin, base: str, picked: Sequence[int]) -> ir.Value:
        """The original value's sizes ``picked`` read off its twin: ``Shape(x')`` gathered into
        the logical order, 1 for a unit axis the twin does not store."""
        full = self._logical_rank_order(t)
        order = [full[i] for i in picked]
        stored = self._add("Shape", [t.value], {}, base)
        n = sum(a is not None for a in self._axis_map(t))
        if None in order:
            stored = self._add("Concat", [stored, self._ints([1], "fc2conv_one")], {"axis": 0},
                               base)
        return self._gather(stored, [n if a is None else a for a in order], base)

    def _same_size(self, a: ir.Value, b: ir.Value, axis: int) -> bool:
        """Whether ``a`` and ``b`` have the same size along ``axis``: the same static or
        symbolic size, or (sizes computed at run time) the same in every probe."""
        sa, sb = _shape(a), _shape(b)
        if sa is not None and sb is not None and _same_dim(sa[axis], sb[axis]):
            return True
        found = [self.probe.shapes.get(v.name or "") for v in (a, b)] if self.probe else []
        return bool(found) and all(f is not None and len(f[0]) > axis for f in found) and all(
            x[axis] == y[axis] for x, y in zip(found[0], found[1], strict=True))  # type: ignore[arg-type]

    def _gather(self, v: ir.Value, idx: Sequence[int], base: str) -> ir.Value:
        if list(idx) == list(range(len(idx))) and _shape(v) == (len(idx),):
            return v
        return self._add("Gather", [v, self._ints(list(idx), "fc2conv_axes")], {"axis": 0},
                         base)

    def _may_be_zero(self, v: ir.Value, depth: int = 6) -> bool:
        """Whether an element of the shape vector ``v`` may be 0 (Reshape's "copy this
        size"): a constant 0, or a part computed by an op that is not a size read."""
        c = _const_array(v)
        if c is not None:
            return bool((c == 0).any())
        p = v.producer()
        if p is None or depth == 0:
            return True
        if p.op_type == "Shape":
            return False
        if p.op_type in ("Concat", "Unsqueeze", "Squeeze", "Cast", "Gather", "Slice"):
            parts = p.inputs if p.op_type == "Concat" else p.inputs[:1]
            return any(u is None or self._may_be_zero(u, depth - 1) for u in parts)
        return True

    def _on_Shape(self, node: ir.Node) -> None:  # noqa: N802
        """``Shape(x)`` of a value in the conv layout reads the twin: ``Gather(Shape(x'),
        order)``, ``order[i]`` the stored axis of ``x``'s axis ``i``; the sizes are the same."""
        t = self._twin(node.inputs[0])
        if t is None or node.outputs[0].is_graph_output():
            return
        rank = len(self._logical_rank_order(t))
        start = node.attributes.get("start")
        end = node.attributes.get("end")
        picked = list(range(rank))[slice(None if start is None else int(start.value),
                                         None if end is None else int(end.value))]
        y = self._logical_shape(t, node.name or "shape", picked)
        ir.convenience.replace_all_uses_with(node.outputs[0], y)
        self.done.append(node)

    def _on_Unsqueeze(self, node: ir.Node) -> None:  # noqa: N802
        """One new unit axis ``a`` of a permuted twin: stored right after axis ``a - 1``."""
        t = self._twin(node.inputs[0])
        if t is None or t.perm is None:
            return
        arr = _const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = arr.reshape(-1).tolist() if arr is not None else (
            node.attributes["axes"].value if "axes" in node.attributes else None)
        if axes is None or len(axes) != 1:
            return
        rank = len(t.perm) + 1
        a = int(axes[0]) % rank
        if a == 0:
            return
        ins = t.perm[a - 1] + 1
        moved = [q + (q >= ins) for q in t.perm]
        perm = (*moved[:a], ins, *moved[a:])
        y = self._axes_op("Unsqueeze", t.value, [ins], node.name or "unsqueeze")
        self._set(node, Twin(y, perm))

    def _on_Expand(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        self._expand_static(node, t)
        if t is not None and node not in self.done:
            self._expand_by_axes(node, t)

    def _expand_by_axes(self, node: ir.Node, t: Twin) -> None:
        """``Expand(x, s)`` with ``s`` computed at run time, as long as ``x``'s rank:
        broadcasting is per axis, so ``Expand(x', s')`` with ``s'`` gathered into the stored
        order (1 for a unit axis only the twin has)."""
        s = node.inputs[1]
        rank = len(self._logical_rank_order(t))
        found = self.probe.shapes.get(s.name or "") if self.probe and s is not None else None
        given = _shape(s)
        length = found[0][0] if found else (given[0] if given else None)
        if s is None or length != rank:
            return
        axes = self._axis_map(t)
        base = node.name or "expand"
        if None in axes:
            s = self._add("Concat", [s, self._ints([1], "fc2conv_one")], {"axis": 0}, base)
        phys = self._gather(s, [rank if a is None else a for a in axes], base)
        y = self._add("Expand", [t.value, phys], {}, base)
        self._set(node, Twin(y, t.perm))

    def _expand_static(self, node: ir.Node, t: Twin | None) -> None:
        out = _shape(node.outputs[0])
        if out is None or not all(isinstance(d, int) for d in out):
            given = _const_array(node.inputs[1])  # broadcasting is per axis: permute it
            out = None if given is None else tuple(int(d) for d in given.reshape(-1))
        if t is None or t.perm is None or out is None or len(out) != len(t.perm):
            return
        given_in = _shape(node.inputs[0])
        if given_in is not None and all(isinstance(d, int) for d in given_in) and (
                _shape(node.outputs[0]) is None
                or not all(isinstance(d, int) for d in _shape(node.outputs[0]) or ())):
            # what inference could not tell (the target came from a computed shape)
            node.outputs[0].shape = ir.Shape(np.broadcast_shapes(given_in, out))  # type: ignore[arg-type]
        phys = [0] * len(out)
        for i, q in enumerate(t.perm):
            phys[q] = out[i]  # type: ignore[assignment]
        y = self._add("Expand", [t.value, self._ints(phys, "fc2conv_shape")], {},
                      node.name or "expand")
        self._set(node, Twin(y, t.perm))

    def _merge(self, node: ir.Node, t: Twin, sx: tuple, so: tuple) -> bool:
        """Reshape of a permuted twin that merges logical axes ``a, a+1`` (stored next to
        each other in that order), other dims unchanged: the same merge of the stored axes."""
        assert t.perm is not None
        if len(sx) != len(so) + 1 or len(sx) != len(t.perm):
            return self._regroup(node, t, sx, so)
        for a in range(len(so)):
            if all(_same_dim(sx[i], so[i]) for i in range(a)) and all(
                    _same_dim(sx[i + 1], so[i]) for i in range(a + 1, len(so))) \
                    and isinstance(sx[a], int) and isinstance(sx[a + 1], int) \
                    and so[a] == sx[a] * sx[a + 1] and t.perm[a + 1] == t.perm[a] + 1:
                phys = [0] * len(sx)
                for i, q in enumerate(t.perm):
                    phys[q] = sx[i] if isinstance(sx[i], int) else -1
                if phys.count(-1) > 1:
                    return False
                merged = t.perm[a]
                shape = [*phys[:merged], so[a], *phys[merged + 2:]]
                perm = [q - (q > merged) for i, q in enumerate(t.perm) if i != a + 1]
                y = self._add("Reshape", [t.value, self._ints(shape, "fc2conv_shape")], {},
                              node.name or "merge")
                self._set(node, Twin(y, tuple(perm)))
                return True
        return self._regroup(node, t, sx, so)

    def _regroup(self, node: ir.Node, t: Twin, sx: tuple, so: tuple) -> bool:
        """Reshape of a permuted twin, static shapes, that splits and merges runs of logical
        axes (dynamo's grouped K/V: ``(B, Hkv, n, S, D) -> (B*H, S, D)``, then ``(B*H, D, S)
        -> (B, H, D, S)``): when every merged run is stored next to each other in order, the
        same Reshape of the stored axes, each run's new axes stored where the run was."""
        assert t.perm is not None
        if not all(isinstance(d, int) and d > 0 for d in (*sx, *so)) or len(sx) != len(t.perm):
            return False
        groups = regroups(sx, so)
        if groups is None:
            return False
        if any(t.perm[g[0][k]] != t.perm[g[0][0]] + k for g in groups for k in range(len(g[0]))):
            return False
        phys: list[int] = []
        perm = [0] * len(so)
        for _, outs in sorted(groups, key=lambda g: t.perm[g[0][0]]):  # type: ignore[index]
            for o in outs:
                perm[o] = len(phys)
                phys.append(int(so[o]))
        y = self._add("Reshape", [t.value, self._ints(phys, "fc2conv_shape")], {},
                      node.name or "reshape")
        self._set(node, Twin(y, tuple(perm)))
        return True

    def _on_Transpose(self, node: ir.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        t = self._twin(x)
        q = [int(p) for p in node.attributes["perm"].value]
        if t is None and x is not None and q == [0, 2, 1] and x.shape is not None \
                and x.shape.rank() == 3 and all(
                    u.node.op_type in STREAM for u in node.outputs[0].uses()):
            # (B, C, S) -> (B, S, C) feeding the stream (a conv front end): x' = x[:, :, None]
            self._set(node, Twin(self._axes_op("Unsqueeze", x, [2], node.name or "t")))
            return
        if t is None or t.perm is None:
            return
        self._set(node, Twin(t.value, _compose(t.perm, q)))

    def _on_Gather(self, node: ir.Node) -> None:  # noqa: N802
        """``x[:, i]`` of a ``(B, S, C)`` value (a class token): ``x'[:, :, 0, i]``."""
        t = self._twin(node.inputs[0])
        idx = _const_array(node.inputs[1])
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 0
        if t is None or t.perm is not None or idx is None or idx.ndim != 0 or axis not in (1, -2):
            return
        g = self._add("Gather", [t.value, node.inputs[1]], {"axis": 3}, node.name or "gather")
        y = self._axes_op("Squeeze", g, [2], node.name or "gather")
        ir.convenience.replace_all_uses_with(node.outputs[0], y, replace_graph_outputs=True)
        self.done.append(node)

    def _on_Concat(self, node: ir.Node) -> None:  # noqa: N802
        twins = [self._twin(v) for v in node.inputs]
        if all(t is None for t in twins):
            return
        perm = next(t for t in twins if t is not None).perm
        rank = 3 if perm is None else len(perm)
        axis = int(node.attributes["axis"].value) % rank
        ins = []
        for v, t in zip(node.inputs, twins, strict=True):
            if t is not None and t.perm != perm:
                return
            if t is None:
                if v is None:
                    return
                entered = self.enter(v, perm)
                if entered is None:
                    return
                ins.append(entered)
            else:
                ins.append(t.value)
        new_axis = ((0, 3, 1)[axis]) if perm is None else perm[axis]
        y = self._add("Concat", ins, {"axis": new_axis}, node.name or "concat")
        self._set(node, Twin(y, perm))

    def _on_Slice(self, node: ir.Node) -> None:  # noqa: N802
        """``Slice`` of a twin: its axes mapped to where they are stored; the bounds (constant
        or computed from ``Shape`` at run time) are per axis and stay as they are."""
        t = self._twin(node.inputs[0])
        if t is None or len(node.inputs) < 4:
            return
        axes = _const_array(node.inputs[3])
        if axes is None:
            return
        order = self._logical_rank_order(t)
        new_axes = [order[int(a) % len(order)] for a in axes.reshape(-1)]
        if any(a is None for a in new_axes):
            return
        y = self._add("Slice", [t.value, node.inputs[1], node.inputs[2],
                                self._ints(new_axes, "fc2conv_axes"), *node.inputs[4:]], {},  # type: ignore[arg-type]
                      node.name or "slice")
        self._set(node, Twin(y, t.perm))

    # -- leaving the layout, clean-up --------------------------------------------------------
    def _sweep(self, keep: set[ir.Value] | None = None) -> None:
        """Remove the nodes nothing reads (a per-layer Unsqueeze of a table that now reads the
        table moved once), so that no value leaves the layout for them; ``keep``: values
        whose readers are still to come."""
        changed = True
        while changed:
            changed = False
            for node in reversed(list(self.graph)):
                if node.domain == "" and not any(o.uses() or o.is_graph_output()
                                                 or o in (keep or ()) for o in node.outputs):
                    self.read.update(v for v in node.inputs if v is not None)
                    self.graph.remove(node, safe=True)
                    changed = True

    def _finish(self) -> None:
        self.read = {v for n in self.done for v in n.inputs if v is not None}
        self._sweep(keep={t.value for t in self.twins.values()})
        done = set(self.done)
        for value, twin in list(self.twins.items()):
            if twin.entered:
                continue
            for use in list(value.uses()):  # sizes read before the value moved
                if use.node.op_type == "Shape" and use.node.domain == "" \
                        and use.node not in done:
                    self.anchor = use.node
                    self._on_Shape(use.node)
            done = set(self.done)
            live = [u for u in value.uses() if u.node not in done]
            if not live and not value.is_graph_output():
                continue
            self.anchor = None
            out = self.leave(twin, value)
            name = value.name
            for use in live:
                use.node.replace_input_with(use.idx, out)
            if value.is_graph_output():
                for i, o in enumerate(self.graph.outputs):
                    if o is value:
                        self.graph.outputs[i] = out
                value.name = self.ctx.unique(f"{name}_linear")
                out.name = name
                out.type, out.shape = value.type, value.shape
        self._sweep()  # the replaced nodes, and Constants only they read
        for value in self.read:
            name = value.name
            if name and name in self.graph.initializers and not value.uses() \
                    and not value.is_graph_output() and not value.is_graph_input():
                del self.graph.initializers[name]


def ane_layout(ctx: Context, wanted: set[str] | None = None) -> AneResult:
    """Run the pass on ``ctx.graph``; return the MatMuls it converted (only those named in
    ``wanted`` when given)."""
    return AnePass(ctx, wanted).run()
