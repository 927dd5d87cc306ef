"""``to_linear`` of a ``(B, C, 1, S)`` graph: the ane layout undone, activations in ``(B, S, C)``.

The mirror of :mod:`fc2conv.onnx.rules.ane`, as one walk over the graph with the same *twins*,
read the other way: a value ``x'[b, c, 0, s]`` of the conv layout gets the twin
``x[b, s, c] = x'[b, c, 0, s]`` (the *act* relation), a rank-4 value ``v'`` (heads) a twin ``v``
with ``v' = Transpose(v, p)`` for a recorded permutation ``p``. Each op whose inputs have twins
gets a twin op:

* ``Conv`` 1x1, stride 1, no padding, ``g`` groups on ``(B, C, 1, S)``: ``MatMul(x, W^T) (+ b)``
  with ``W`` the ``(O, C)`` block-diagonal matrix of the kernel
  (:func:`fc2conv.onnx.weights.conv_kernel_to_linear`);
* elementwise ops: the same op on the twins; a constant ``c'`` (broadcast to rank 4) moves back
  once, ``c[i, j, k] = c'[i, k, 0, j]`` (``c = c'.transpose(p^-1)`` for a permuted twin);
* ``ReduceMean`` and ``ReduceSumSquare`` over axis 1: over the last axis; ``Softmax``,
  ``Slice``, ``Concat``: their axes mapped (``0, 1, 3 -> 0, 2, 1``, or by ``p``);
* the head split ``Reshape(x', [B, H, D, S])``: ``Reshape(x, [B, S, H, D])`` with
  ``p = (0, 2, 3, 1)``; the head merge ``Reshape(o', [B, C, 1, S])``: ``Reshape(o, [B, S, C])``
  of ``o`` stored as ``(B, S, H, D)`` (one Transpose when it is stored otherwise);
* ``Einsum`` (and a batched ``MatMul``) of two operands with one contracted label and one free
  label each -- attention's ``scores[b,h,q,k] = sum_d Q'[b,h,d,q] K'[b,h,d,k]`` and
  ``out'[b,h,d,q] = sum_k P[b,h,q,k] V'[b,h,d,k]``: ``MatMul(A, B)`` of the twins arranged as
  ``A[batch, i, k]`` and ``B[batch, k, j]`` (a Transpose only where a twin is stored otherwise,
  one per value and order); the product ``[batch, i, j]`` is the result's twin, its permutation
  read off the equation's output labels;
* the layout changes themselves: ``Transpose(Unsqueeze(x, 1), (0, 3, 1, 2))`` (or
  ``Unsqueeze(x, 2)`` of a ``(B, C, S)`` value, whose twin is ``Transpose(x, (0, 2, 1))``) has
  the twin ``x``; ``Squeeze(Transpose(x', (0, 2, 3, 1)), 1)`` *is* the twin; a class token
  ``Squeeze(Gather(x', i, axis=3), 2)`` is ``Gather(x, i, axis=1)``.

Where an op outside these reads a twinned value, the value goes back to the conv layout once
(``Transpose(Unsqueeze(x, 1))``); the nodes left without readers are removed. Every step is a
relabelling of the same numbers, except the MatMuls, whose sums run over the same terms.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.ane import AnePass
from fc2conv.onnx.rules.ane_twin import (
    AneResult,
    Twin,
    _axes,
    _const_array,
    _inverse,
    _same_dim,
    _shape,
)
from fc2conv.onnx.rules.base import (
    FLOAT_TYPES,
    LAYOUT_KEY,
    Context,
    constant,
    dims,
    new_initializer,
    provenance,
    transpose_perm,
)
from fc2conv.onnx.rules.norm_back import fuse_layer_norms
from fc2conv.onnx.weights import conv_kernel_to_linear

log = logging.getLogger(__name__)

_ACT_AXIS = {0: 0, 1: 2, 3: 1}  # (B, C, 1, S) axis -> (B, S, C) axis
_BY_HEADS = (0, 2, 3, 1)  # v'[b, h, d, s] = v[b, s, h, d]


class LinearPass(AnePass):
    """One walk over ``ctx.graph`` (see the module docstring); the permuted twins' handlers
    (Unsqueeze, Expand, axis merges, Transpose, unary and binary ops) are the ane pass's own."""

    ACT_RANK = 4
    ACT_AXES = (0, 3, 1)  # x[b, s, c] = x'[b, c, 0, s]: the unit axis 2 is not stored

    def __init__(self, ctx: Context, wanted: set[str] | None = None) -> None:
        super().__init__(ctx, wanted)
        self.arranged: dict[tuple[ir.Value, tuple[int, ...]], ir.Value] = {}

    # -- the act relation both ways ---------------------------------------------------------
    def enter(self, x: ir.Value, perm: tuple[int, ...] | None = None) -> ir.Value | None:
        """The twin of a value with none (``perm`` None: ``(B, C, 1, S)`` -> ``(B, S, C)``)."""
        if perm is not None:
            return super().enter(x, perm)
        key = (x, None)
        if key in self.entered:
            return self.entered[key]
        shape = _shape(x)
        if shape is None or len(shape) != 4 or shape[2] != 1:
            return None
        source = self._entered_from(x)
        if source is not None:
            out = source
        else:
            producer = x.producer()
            if producer is not None and producer.op_type == "Unsqueeze" and _axes(producer) == [2] \
                    and _shape(producer.inputs[0]) is not None \
                    and len(_shape(producer.inputs[0]) or ()) == 3:
                src = producer.inputs[0]
                assert src is not None  # (B, C, S) with a unit axis: x[b, s, c] = src[b, c, s]
                out = self._add("Transpose", [src], {"perm": [0, 2, 1]}, f"{src.name}_to_linear",
                                "enter:linear")
            else:
                moved = self._add("Transpose", [x], {"perm": [0, 2, 3, 1]},
                                  f"{x.name}_to_linear", "enter:linear")
                out = self._axes_op("Squeeze", moved, [1], f"{x.name}_to_linear")
        self.entered[key] = out
        if x not in self.twins:
            self.twins[x] = Twin(out, None, entered=True)
        return out

    @staticmethod
    def _entered_from(x: ir.Value) -> ir.Value | None:
        """``y`` when ``x = Transpose(Unsqueeze(y, 1), (0, 3, 1, 2))`` of a rank-3 ``y``."""
        producer = x.producer()
        if transpose_perm(producer) != [0, 3, 1, 2]:
            return None
        assert producer is not None
        inner = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        if inner is None or inner.op_type != "Unsqueeze" or inner.domain != "" \
                or _axes(inner) != [1]:
            return None
        y = inner.inputs[0]
        shape = _shape(y)
        return y if shape is not None and len(shape) == 3 else None

    def leave(self, twin: Twin, like: ir.Value) -> ir.Value:
        if twin.perm is not None:
            return super().leave(twin, like)
        base = like.name or "y"
        unsq = self._axes_op("Unsqueeze", twin.value, [1], f"{base}_from_linear")
        return self._add("Transpose", [unsq], {"perm": [0, 3, 1, 2]}, f"{base}_from_linear",
                         "exit:linear")

    def _moved_constant(self, c: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray | None:
        if perm is not None:
            return super()._moved_constant(c, perm)
        if c.ndim > 4:
            return None
        c = c.reshape((1,) * (4 - c.ndim) + c.shape)
        if c.shape[2] != 1:
            return None
        return np.ascontiguousarray(c[:, :, 0, :].transpose(0, 2, 1))

    def _arrange(self, value: ir.Value, order: Sequence[int], name: str) -> ir.Value:
        """``Transpose(value, order)``, once per value and order (none for the identity)."""
        key = (value, tuple(order))
        if list(order) == sorted(order):
            return value
        if key not in self.arranged:
            self.arranged[key] = self._add("Transpose", [value], {"perm": list(order)}, name,
                                           "heads:linear")
        return self.arranged[key]

    def _replace(self, old: ir.Value, new: ir.Value) -> None:
        """Every reader of ``old`` reads ``new``; a graph output keeps its name."""
        if old.is_graph_output():
            if new.is_graph_input() or new.is_graph_output() or new.producer() is None:
                new = self._add("Identity", [new], {}, old.name or "out")
            name = old.name
            old.name = self.ctx.unique(f"{name}_conv")
            new.name = name
            new.type, new.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)

    # -- the walk ---------------------------------------------------------------------------
    def _on_matmul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        ta, tb = self._twin(a), self._twin(b)
        sa, sb = _shape(a), _shape(b)
        if (ta is None and tb is None) or sa is None or sb is None or len(sa) != 4 \
                or len(sb) != 4:
            return
        self._contract(node, "zhik", "zhkj", "zhij")

    def _on_Einsum(self, node: ir.Node) -> None:  # noqa: N802
        equation = node.attributes["equation"].value
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        if len(node.inputs) != 2 or "->" not in equation or "." in equation:
            return
        ins, out = equation.replace(" ", "").split("->")
        subs = ins.split(",")
        if len(subs) != 2:
            return
        self._contract(node, subs[0], subs[1], out)

    def _contract(self, node: ir.Node, sa: str, sb: str, out: str) -> None:
        """``node`` computes ``out`` from ``sa, sb`` (einsum labels of the original operands):
        a MatMul of the twins when one label is summed and each operand has one free label."""
        values = [node.inputs[0], node.inputs[1]]
        twins = [self._twin(v) for v in values]
        if all(t is None for t in twins) or any(t is not None and t.perm is None for t in twins) \
                or any(v is None for v in values):
            return
        stored: list[tuple[ir.Value, str]] = []
        for v, t, s in zip(values, twins, (sa, sb), strict=True):
            assert v is not None
            if t is None:
                stored.append((v, s))
                continue
            assert t.perm is not None
            if len(t.perm) != len(s):
                return
            labels = ["?"] * len(s)
            for i, q in enumerate(t.perm):
                labels[q] = s[i]
            stored.append((t.value, "".join(labels)))
        la, lb = set(sa), set(sb)
        summed = (la & lb) - set(out)
        free_a, free_b = la - lb, lb - la
        batch = [c for c in out if c in la and c in lb]
        if len(summed) != 1 or len(free_a) != 1 or len(free_b) != 1 or len(set(sa)) != len(sa) \
                or len(set(sb)) != len(sb) or set(out) != set(batch) | free_a | free_b \
                or len(out) != len(set(out)):
            return
        k, fa, fb = next(iter(summed)), next(iter(free_a)), next(iter(free_b))
        base = node.name or "attn"

        def orders(first: int) -> tuple[list[int], list[int]]:
            (xa, fx), (xb, fy) = ((stored[0], fa), (stored[1], fb))[::1 if first == 0 else -1]
            return ([xa[1].index(c) for c in [*batch, fx, k]],
                    [xb[1].index(c) for c in [*batch, k, fy]])

        def moves(first: int) -> int:
            return sum(o != sorted(o) for o in orders(first))

        first = 1 if moves(1) < moves(0) else 0  # either product; the one with fewer moves
        if first == 1:
            stored.reverse()
            fa, fb = fb, fa
        oa, ob = orders(0)
        va = self._arrange(stored[0][0], oa, base)
        vb = self._arrange(stored[1][0], ob, base)
        y = self._add("MatMul", [va, vb], {}, base)
        product = [*batch, fa, fb]
        perm = tuple(product.index(c) for c in out)
        if list(perm) == sorted(perm):
            self._replace(node.outputs[0], y)
            self.done.append(node)
        else:
            self._set(node, Twin(y, perm))

    def _on_Conv(self, node: ir.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        t = self._twin(x)
        if x is None or (t is not None and t.perm is not None) or len(node.outputs) != 1:
            return
        shape = _shape(x)
        if shape is None or len(shape) != 4 or shape[2] != 1:
            return
        if t is None and (shape[3] == 1 or (x.producer() is not None and str(
                x.producer().metadata_props.get(LAYOUT_KEY, "")).endswith("flat"))):  # type: ignore[union-attr]
            return  # (B, C, 1, 1): a Gemm's conv, left to the rules
        if self.wanted is not None and not ({node.name, node.outputs[0].name} & self.wanted):
            return
        weight = constant(node.inputs[1], "Conv weight 'W'")
        kernel = dims(weight)
        attr = {k: [int(v) for v in a.value] for k, a in node.attributes.items()
                if k in ("strides", "pads", "dilations")}
        auto_pad = node.attributes.get("auto_pad")
        if len(kernel) != 4 or kernel[2:] != (1, 1) \
                or any(s != 1 for s in attr.get("strides", [])) \
                or any(p != 0 for p in attr.get("pads", [])) \
                or (auto_pad is not None and auto_pad.value not in ("NOTSET", "VALID")):
            return
        if x.dtype is not None and x.dtype not in FLOAT_TYPES:
            return
        groups = int(node.attributes["group"].value) if "group" in node.attributes else 1
        out_ch, in_ch = kernel[0], kernel[1] * groups
        xin = t.value if t is not None else self.enter(x)
        if xin is None:
            return
        w_value = node.inputs[1]
        assert w_value is not None
        matrix = new_initializer(self.ctx, f"{w_value.name}_linear",
                                 lambda: conv_kernel_to_linear(weight.numpy(), groups).T,
                                 weight.dtype, (in_ch, out_ch), [weight],
                                 recipe=("conv_to_matmul", groups))
        base = node.name or node.outputs[0].name or "conv"
        y = self._add("MatMul", [xin, matrix], {}, base)
        origin = f"Conv 1x1 {in_ch}->{out_ch} on (B, C, 1, S)"
        producer = y.producer()
        assert producer is not None
        provenance(producer, node.name or base, origin)
        b_value = node.inputs[2] if len(node.inputs) > 2 else None
        if b_value is not None:
            bias = constant(b_value, "Conv bias 'B'")
            vec = new_initializer(self.ctx, f"{b_value.name}_linear", bias.numpy, bias.dtype,
                                  (out_ch,), [bias], recipe=("bias",))
            y = self._add("Add", [y, vec], {}, base)
        self._set(node, Twin(y))
        self.result.converted.append(
            (node, f"MatMul {in_ch}->{out_ch} on (B, S, C)" + (" + Add" if b_value else "")
             + (" (block-diagonal)" if groups > 1 else "")))

    def _on_Transpose(self, node: ir.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        t = self._twin(x)
        q = transpose_perm(node)
        if x is None or q is None:
            return
        if t is None:
            source = self._entered_from(node.outputs[0])
            if source is not None:  # the ane pass's move in: its source is the twin
                self._set(node, Twin(source))
            return
        if t.perm is not None:
            super()._on_Transpose(node)
            return
        if q != [0, 2, 3, 1]:
            return
        # the move out: Squeeze(Transpose(x', (0, 2, 3, 1)), 1) is x itself
        for use in list(node.outputs[0].uses()):
            squeeze = use.node
            if squeeze.op_type == "Squeeze" and squeeze.domain == "" and use.idx == 0 \
                    and _axes(squeeze) == [1]:
                self._replace(squeeze.outputs[0], t.value)
                self.done.append(squeeze)
        self._done_when_unread(node)

    def _on_Unsqueeze(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        if t is not None:
            if t.perm is not None:
                super()._on_Unsqueeze(node)
            return
        x = node.inputs[0]
        shape = _shape(x)
        out = _shape(node.outputs[0])
        if x is None or shape is None or len(shape) != 3 or _axes(node) != [2] \
                or x.dtype not in FLOAT_TYPES \
                or out is None or len(out) != 4:
            return
        if not any(u.node.op_type in {"Conv", "Add", "Mul"} for u in node.outputs[0].uses()):
            return
        twin = self._add("Transpose", [x], {"perm": [0, 2, 1]}, f"{x.name}_to_linear",
                         "enter:linear")
        self._set(node, Twin(twin))

    def _on_Reshape(self, node: ir.Node) -> None:  # noqa: N802
        self._reshape_static(node, self._twin(node.inputs[0]))
        t = self._twin(node.inputs[0])
        if t is not None and node not in self.done:
            self._reshape_by_axes(node, t)

    def _reshape_static(self, node: ir.Node, t: Twin | None) -> None:  # type: ignore[override]
        x, out = node.inputs[0], node.outputs[0]
        sx, so = _shape(x), _shape(out)
        if sx is None or so is None:
            return
        if t is None:
            if len(sx) == 3 and len(so) == 4 and sx[1] == 1 and isinstance(sx[2], int) \
                    and so[1] == sx[2] and so[2] == 1 and so[3] == 1:
                assert x is not None  # (B, 1, C) -> (B, C, 1, 1): the twin is x
                self._set(node, Twin(x))
            return
        if len(sx) == len(so) and all(_same_dim(a, b) for a, b in zip(sx, so, strict=True)):
            self._set(node, t)
        elif t.perm is None and len(sx) == 4 and len(so) == 4:  # head split
            h, d = so[1], so[2]
            if not (_same_dim(sx[0], so[0]) and _same_dim(sx[3], so[3])) \
                    or not isinstance(h, int) or not isinstance(d, int) or sx[1] != h * d:
                return
            y = self._add("Reshape", [t.value, self._ints([0, 0, h, d], "fc2conv_shape")], {},
                          node.name or "split")
            self._set(node, Twin(y, _BY_HEADS))
        elif t.perm is not None and len(sx) == 4 and len(so) == 4 and so[2] == 1 \
                and isinstance(so[1], int) and isinstance(sx[1], int) \
                and isinstance(sx[2], int) and so[1] == sx[1] * sx[2] \
                and _same_dim(sx[0], so[0]) and _same_dim(sx[3], so[3]):  # head merge
            target_inv = _inverse(_BY_HEADS)
            order = [t.perm[target_inv[j]] for j in range(4)]
            stored = self._arrange(t.value, order, node.name or "merge")
            y = self._add("Reshape", [stored, self._ints([0, 0, so[1]], "fc2conv_shape")], {},
                          node.name or "merge")
            self._set(node, Twin(y))
        elif t.perm is not None:
            self._merge(node, t, sx, so)

    def _on_Gather(self, node: ir.Node) -> None:  # noqa: N802
        """``Squeeze(Gather(x', i, axis=3), 2)`` of a class token: ``Gather(x, i, axis=1)``."""
        t = self._twin(node.inputs[0])
        idx = _const_array(node.inputs[1])
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 0
        if t is None or t.perm is not None or idx is None or idx.ndim != 0 or axis not in (3, -1):
            return
        gathered = None
        for use in list(node.outputs[0].uses()):
            squeeze = use.node
            if squeeze.op_type == "Squeeze" and squeeze.domain == "" and _axes(squeeze) == [2]:
                if gathered is None:
                    gathered = self._add("Gather", [t.value, node.inputs[1]], {"axis": 1},
                                         node.name or "gather")
                self._replace(squeeze.outputs[0], gathered)
                self.done.append(squeeze)
        self._done_when_unread(node)

    def _done_when_unread(self, node: ir.Node) -> None:
        """``node`` is replaced once only replaced nodes read it."""
        if not node.outputs[0].is_graph_output() and all(
                u.node in self.done for u in node.outputs[0].uses()):
            self.done.append(node)

    def _on_ReduceMean(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        if t is None or t.perm is not None:
            return
        keep = node.attributes.get("keepdims")
        axes = _axes(node)
        if (keep is not None and int(keep.value) != 1) or axes is None \
                or [a % 4 for a in axes] != [1]:
            return
        y = self._axes_op(node.op_type, t.value, [-1], node.name or "mean", keepdims=1)
        self._set(node, Twin(y))

    _on_ReduceSumSquare = _on_ReduceMean  # noqa: N815 (a channel norm's sum of squares)

    def _on_LayerNormalization(self, node: ir.Node) -> None:  # noqa: N802
        return  # over (B, C, 1, S)'s last axis: positions, not channels; it stays

    def _on_Softmax(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        if t is None or t.perm is not None:
            super()._on_Softmax(node)
            return
        axis = int(node.attributes["axis"].value) % 4 if "axis" in node.attributes else 3
        if self.ctx.opset < 13 or axis not in _ACT_AXIS:
            return
        y = self._add("Softmax", [t.value], {"axis": _ACT_AXIS[axis]}, node.name or "softmax")
        self._set(node, Twin(y))

    def _axis(self, t: Twin | None, perm: tuple[int, ...] | None, axis: int) -> int | None:
        if perm is None:
            return _ACT_AXIS.get(axis % 4)
        return perm[axis % len(perm)]

    def _on_Concat(self, node: ir.Node) -> None:  # noqa: N802
        twins = [self._twin(v) for v in node.inputs]
        if all(t is None for t in twins):
            return
        perm = next(t for t in twins if t is not None).perm
        axis = self._axis(None, perm, int(node.attributes["axis"].value))
        if axis is None:
            return
        ins = []
        for v, t in zip(node.inputs, twins, strict=True):
            if t is not None and t.perm != perm:
                return
            value = t.value if t is not None else (None if v is None else self.enter(v, perm))
            if value is None:
                return
            ins.append(value)
        y = self._add("Concat", ins, {"axis": axis}, node.name or "concat")
        self._set(node, Twin(y, perm))

    def _on_Slice(self, node: ir.Node) -> None:  # noqa: N802
        t = self._twin(node.inputs[0])
        if t is None or len(node.inputs) < 4:
            return  # the bounds may be computed: they are per axis, only the axes move
        axes = _const_array(node.inputs[3])
        if axes is None:
            return
        new_axes = [self._axis(t, t.perm, int(a)) for a in axes.reshape(-1)]
        if any(a is None for a in new_axes):
            return
        y = self._add("Slice", [t.value, node.inputs[1], node.inputs[2],
                                self._ints([int(a) for a in new_axes if a is not None],
                                           "fc2conv_axes"), *node.inputs[4:]], {},
                      node.name or "slice")
        self._set(node, Twin(y, t.perm))

def linear_layout(ctx: Context, wanted: set[str] | None = None) -> AneResult:
    """Run :class:`LinearPass` on ``ctx.graph``; return the Convs it turned into MatMuls."""
    result = LinearPass(ctx, wanted).run()
    fused = fuse_layer_norms(ctx)
    if fused:
        log.debug("linear layout: %d norms fused back into LayerNormalization", fused)
    log.debug("linear layout: %d convs on (B, C, 1, S) -> MatMul on (B, S, C)",
              len(result.converted))
    return result
