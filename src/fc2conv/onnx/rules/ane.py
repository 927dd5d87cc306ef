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
original nodes left without readers are removed. Once the graph's shapes are inferred again,
:mod:`~fc2conv.onnx.rules.ane_fold` gives the constant scalings next to the Convs made here (a
pre-norm's weight and bias, a query's scale) to those Convs (``AneResult.convs``).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from fc2conv.onnx.rules.ane_heads import HeadRewrites
from fc2conv.onnx.rules.ane_shapes import ShapeRewrites
from fc2conv.onnx.rules.ane_stream import StreamRewrites
from fc2conv.onnx.rules.ane_twin import BINARY, MIX, UNARY, AneResult, _const_array
from fc2conv.onnx.rules.base import Context, Refused
from fc2conv.onnx.rules.shape_probe import Probe

log = logging.getLogger(__name__)


class AnePass(StreamRewrites, HeadRewrites, ShapeRewrites):
    """One walk over ``ctx.graph`` (see the module docstring)."""

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
        self.result.convs = self.convs
        return self.result

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
