"""The layout changes of ``layout="ane"``: entering the conv layout once per value, carrying
a move up to where it is free or shared, and leaving it once.

:class:`AneBase` holds the walk's state (the twins made so far) and its building blocks; the
rewrites of each op family (:mod:`~fc2conv.onnx.rules.ane_stream`,
:mod:`~fc2conv.onnx.rules.ane_heads`, :mod:`~fc2conv.onnx.rules.ane_shapes`) build on it and
:class:`fc2conv.onnx.rules.ane.AnePass` puts them together.

* enter: ``(B, S, C) -> (B, C, 1, S)`` is ``Transpose(Unsqueeze(x, 1), (0, 3, 1, 2))``, a
  Reshape when ``S == 1``, or nothing when ``x = Transpose(u, (0, 2, 1))`` (``Unsqueeze(u, 2)``
  instead); a rank-4 value wanted as ``Transpose(x, perm^-1)`` is carried up (:meth:`_carry`);
* leave: ``Squeeze(Transpose(x', (0, 2, 3, 1)), 1)``, or ``Transpose(x', perm)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.ane_twin import (
    BINARY,
    NORM,
    REDUCE,
    UNARY,
    AneResult,
    Twin,
    _const_array,
    _inverse,
    _shape,
)
from fc2conv.onnx.rules.base import LAYOUT_KEY, Context
from fc2conv.onnx.rules.shape_axes import ACT, axes_of, logical_order
from fc2conv.onnx.rules.shape_probe import Probe


class AneBase:
    """The walk's state and building blocks (see the module docstring)."""

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
        self.convs: set[ir.Node] = set()  # the 1x1 Convs made for MatMuls


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
        """Squeeze / Unsqueeze / ReduceMean / ReduceSumSquare with ``axes`` as attribute or
        input by opset."""
        as_input = self.ctx.opset >= (18 if op.startswith("Reduce") else 13)
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

    def _twin(self, v: ir.Value | None) -> Twin | None:
        return None if v is None else self.twins.get(v)

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


    def _axis_map(self, t: Twin) -> tuple[int | None, ...]:
        return axes_of(t.perm, self.ACT_AXES)

    def _logical_rank_order(self, t: Twin) -> list[int | None]:
        rank = self.ACT_RANK if t.perm is None else len(t.perm)
        return logical_order(self._axis_map(t), rank)

    # -- rewrites defined by the op families' classes, declared for the others -------------
    def _on_unary(self, node: ir.Node) -> None:
        raise NotImplementedError

    def _on_binary(self, node: ir.Node) -> None:
        raise NotImplementedError

    def _on_batched_matmul(self, node: ir.Node) -> None:
        raise NotImplementedError

    def _same_size(self, a: ir.Value, b: ir.Value, axis: int) -> bool:
        raise NotImplementedError
