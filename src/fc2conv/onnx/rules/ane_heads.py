"""``layout="ane"`` on head views: attention computed on permuted twins, no activation moved.

A value split into heads ``v[b, s, h, d]`` has the twin ``v'[b, h, d, s]`` (``perm = (0, 3, 1,
2)``); a ``Transpose(v, q)`` only composes ``perm[q[i]]``; ``MatMul(a, b)`` of permuted twins
is one ``Einsum`` on the twins (``scores[b,h,q,k] = sum_d Q'[b,h,d,q] K'[b,h,d,k]``,
``out'[b,h,d,q] = sum_k P[b,h,q,k] V'[b,h,d,k]``); Softmax, Gather, Slice and Concat map
their axis by ``perm``.

Operand order: onnxruntime's CPU Einsum computes a two-operand contraction as one batched
MatMul of ``left[batch, free_left, summed]`` and ``right[batch, summed, free_right]`` into
``[batch, free_left, free_right]``, transposing an operand or the product (a copy each) where
it is stored otherwise. The equation is therefore written with the operand whose free label
comes first in the output on the left: ``out'[b,h,d,q] = sum_k V'[b,h,d,k] P[b,h,q,k]`` is
``Einsum("zhjk,zhik->zhji", V', P)``, which needs one copy (of ``P``), where ``(P, V')``
needs two (of ``V'`` and of the product). The terms and their order of summation are the
same either way.
"""

from __future__ import annotations

import onnx_ir as ir

from fc2conv.onnx.rules.ane_moves import AneBase
from fc2conv.onnx.rules.ane_twin import IDENTITY, STREAM, Twin, _compose, _const_array, _shape


class HeadRewrites(AneBase):
    """Batched MatMuls, Softmax, Transpose, Gather, Concat and Slice on twins."""

    #: write an Einsum's operands in the order onnxruntime multiplies them without moving the
    #: product (False: the original MatMul's order; ``bench/ane_folds.py`` times both)
    LEADING_OPERAND_FIRST = True

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
        left, right = "".join(phys_a), "".join(phys_b)
        if swapped and self.LEADING_OPERAND_FIRST:  # see the module docstring
            va, vb, left, right = vb, va, right, left
        equation = f"{left},{right}->{out_labels}"
        y = self._add("Einsum", [va, vb], {"equation": equation}, node.name or "attn")
        if out_perm == IDENTITY:
            ir.convenience.replace_all_uses_with(node.outputs[0], y, replace_graph_outputs=False)
            if node.outputs[0].is_graph_output():
                self._set(node, Twin(y, IDENTITY))
            else:
                self.done.append(node)
        else:
            self._set(node, Twin(y, out_perm))

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

