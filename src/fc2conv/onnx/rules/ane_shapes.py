"""``layout="ane"`` on shape ops: Reshape, Shape, Unsqueeze and Expand of twins.

The head split ``Reshape(x, [B, S, H, D])`` is ``Reshape(x', [B, H, D, S])`` with ``perm = (0,
3, 1, 2)`` (no data moves), and the head merge ``Reshape(o, [B, S, C])`` of ``o = Transpose(o',
(0, 3, 1, 2))`` is ``Reshape(o', [B, C, 1, S])``. Targets computed at run time are gathered
into the stored order through the axis maps of :mod:`fc2conv.onnx.rules.shape_axes`, and
``Shape(x)`` of a moved value reads its twin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from fc2conv.onnx.rules.ane_moves import AneBase
from fc2conv.onnx.rules.ane_twin import HEADS, Twin, _const_array, _same_dim, _shape
from fc2conv.onnx.rules.shape_axes import (
    arranged_for,
    perm_of,
    reshape_axes,
)
from fc2conv.onnx.rules.shape_axes import groups as regroups


class ShapeRewrites(AneBase):
    """Reshape, Shape, Unsqueeze and Expand of twins."""

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

