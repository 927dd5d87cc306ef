"""A float64 graph run by onnxruntime in segments, with the few ops it has no float64 kernel
for (``Erf``: every BERT's GELU) computed between them by onnx's evaluator ops (through torch's
float64 kernels, :func:`fc2conv.verify.onnx_kernels.replaced_ops`).

Running the whole graph in onnx's evaluator for one missing kernel made each BERT draw one
numpy/torch call per node; here onnxruntime runs every maximal run of consecutive nodes it
can (the node list is topologically sorted, so a run's inputs are graph inputs, weights or
values computed before it), and each missing op runs alone. Every value is float64 (exact up
to float64 rounding, as the evaluator). Sessions are built at the first run, from the value
types the draw has, and reused.

Graphs with subgraphs (``If``, ``Loop``, ``Scan``: their bodies read outer values by name)
are not split; the next engine runs them.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
from onnx import helper

_MISSING_KERNEL = re.compile(r"implementation for (\w+)\(\d+\) node with name '([^']*)'")
MAX_ISLAND_OPS = 8


def missing_ops(model: Any, weights: dict[str, np.ndarray]) -> set[str]:
    """The op types onnxruntime has no float64 kernel for in ``model`` (found by building
    sessions with those ops cut out, at most :data:`MAX_ISLAND_OPS`)."""
    from fc2conv.verify.onnx_kernels import ort_session

    missing: set[str] = set()
    for _ in range(MAX_ISLAND_OPS + 1):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        keep = [n for n in probe.graph.node if n.op_type not in missing]
        cut = {o for n in probe.graph.node if n.op_type in missing for o in n.output}
        del probe.graph.node[:]
        probe.graph.node.extend(keep)
        for name in sorted(cut):  # the islands' outputs become inputs of the probe
            probe.graph.input.append(helper.ValueInfoProto(name=name))
            probe.graph.input[-1].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        outs = [o for o in probe.graph.output if o.name not in cut]
        del probe.graph.output[:]
        probe.graph.output.extend(outs)
        if not keep or not outs:
            return missing  # nothing left for onnxruntime to refuse
        try:
            ort_session(probe, weights)
            return missing
        except Exception as err:
            found = _MISSING_KERNEL.search(str(err))
            if not found or found.group(1) in missing:
                raise
            missing.add(found.group(1))
    raise RuntimeError(f"more than {MAX_ISLAND_OPS} op types lack a float64 kernel")


class Segmented:
    """Runs ``model`` (a float64 graph whose stubbed weights are ``weights``) as onnxruntime
    segments around the nodes whose op is in ``islands``."""

    def __init__(self, model: Any, weights: dict[str, np.ndarray], islands: set[str]) -> None:
        g = model.graph
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in g.node for a in n.attribute):
            raise RuntimeError("the graph has subgraphs")
        self.model, self.weights = model, weights
        self.inline = {t.name: t for t in g.initializer
                       if t.data_location != onnx.TensorProto.EXTERNAL}
        self.parts: list[tuple[bool, list[Any]]] = []
        for node in g.node:
            island = node.op_type in islands
            if island or not self.parts or self.parts[-1][0]:
                self.parts.append((island, [node]))
            else:
                self.parts[-1][1].append(node)
        self._runners: list[Any] = [None] * len(self.parts)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        env: dict[str, np.ndarray] = {**feeds, **self.weights}
        wanted = set(names)
        for k, (island, nodes) in enumerate(self.parts):
            later = wanted | {i for _, ns in self.parts[k + 1:] for n in ns for i in n.input}
            made = {o for n in nodes for o in n.output if o}
            needs = [i for i in dict.fromkeys(i for n in nodes for i in n.input if i)
                     if i not in made and i not in self.inline]
            outs = [o for o in dict.fromkeys(o for n in nodes for o in n.output if o)
                    if o in later]
            if self._runners[k] is None:
                self._runners[k] = self._build(island, nodes, needs, outs, env)
            values = self._runners[k](outs, {i: env[i] for i in needs})
            env.update(zip(outs, values, strict=True))
        return [env[n] for n in names]

    def _build(self, island: bool, nodes: list[Any], needs: list[str], outs: list[str],
               env: dict[str, np.ndarray]) -> Any:
        consts = [self.inline[i] for i in dict.fromkeys(i for n in nodes for i in n.input)
                  if i in self.inline]
        inputs = [helper.make_tensor_value_info(
            i, helper.np_dtype_to_tensor_dtype(np.asarray(env[i]).dtype), None) for i in needs]
        graph = helper.make_graph(nodes, "segment", inputs,
                                  [helper.ValueInfoProto(name=o) for o in outs], consts)
        part = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                 ir_version=self.model.ir_version)
        if island:
            from onnx.reference import ReferenceEvaluator

            from fc2conv.verify.onnx_kernels import replaced_ops

            ev = ReferenceEvaluator(part, new_ops=replaced_ops())

            def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                with np.errstate(all="ignore"):
                    return list(ev.run(names, feeds))

            return run
        from fc2conv.verify.onnx_kernels import ort_session

        sess = ort_session(part)
        return sess.run
