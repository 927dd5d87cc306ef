"""The graph structure of an ONNX model's captured layers, for pairing layers by provenance.

A captured ONNX layer is a run of nodes (one user module, see
:mod:`fc2conv.verify.onnx_backend`) whose last node's first output is the layer's output (an
embedding lookup is a run of one ``Gather`` over an initializer). For
pairing, each layer is described by:

- ``values``: the names of its output value and of every value that carries the same numbers
  in another layout (following single consumers through ``Transpose``/``Reshape``/``Squeeze``/
  ``Unsqueeze``/``Flatten``/``Identity``). fc2conv's rewrites keep the names of the values they
  replace (``MatMul -> Transpose, Conv, Transpose`` ends in the MatMul's output name; a Conv that
  absorbed a bias ``Add`` ends in the Add's), so a value name shared by both graphs is the same
  quantity in both;
- ``nodes``: the names of the nodes of its run, and ``sources``: the ``fc2conv.source`` each of
  them records (the node of the original graph it replaces);
- ``inputs``: for each input of the run from outside it, traced back through layout-only nodes,
  the index of the layer producing it (or ``"input:<name>"`` for a graph input), so two layers
  can be paired because their inputs are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fc2conv.core.provenance import SOURCE_KEY

# ops that move values without computing: the same numbers in another layout
_RELAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


@dataclass
class LayerNode:
    """Structure of one captured layer (see the module docstring)."""

    value: str
    values: set[str] = field(default_factory=set)
    nodes: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    inputs: list[int | str] = field(default_factory=list)


def describe_layers(proto: Any, captured: list[tuple[str, str, str]],
                    layout_ops: set[str]) -> list[LayerNode]:
    """One :class:`LayerNode` per captured layer ``(user name, op, output value)``, in order.

    ``captured`` lists the layers as the ONNX backend captures them; a layer's run is the nodes
    from just after the previous layer's last node up to its own last node, without the
    ``layout_ops`` the backend does not capture."""
    nodes = list(proto.graph.node)
    producer = {out: k for k, n in enumerate(nodes) for out in n.output if out}
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for name in n.input:
            if name:
                consumers.setdefault(name, []).append(k)
    graph_inputs = {v.name for v in proto.graph.input}
    constants = {i.name for i in proto.graph.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}

    ends = [producer.get(value, -1) for _, _, value in captured]
    layer_of_node: dict[int, int] = {}
    runs: list[list[int]] = []
    start = 0
    for i, end in enumerate(ends):
        run = [k for k in range(start, end + 1)
               if nodes[k].op_type not in layout_ops or k == end]  # a lookup's Gather
        runs.append(run or ([end] if end >= 0 else []))
        for k in runs[-1]:
            layer_of_node[k] = i
        start = max(start, end + 1)

    out: list[LayerNode] = []
    for i, (_, _, value) in enumerate(captured):
        info = LayerNode(value=value, values=_aliases(value, nodes, consumers))
        members = set(runs[i])
        for k in runs[i]:
            n = nodes[k]
            info.nodes.append(n.name)
            meta = {p.key: p.value for p in n.metadata_props}
            if meta.get(SOURCE_KEY):
                info.sources.add(meta[SOURCE_KEY])
            for name in n.input:
                if not name or name in constants or producer.get(name) in members:
                    continue
                origin = _trace_back(name, nodes, producer)
                if origin in graph_inputs:
                    info.inputs.append(f"input:{origin}")
                elif producer.get(origin) in layer_of_node:
                    info.inputs.append(layer_of_node[producer[origin]])
        out.append(info)
    return out


def _aliases(value: str, nodes: list[Any], consumers: dict[str, list[int]]) -> set[str]:
    """``value`` and the values that hold its numbers in another layout (single consumers)."""
    seen = {value}
    current = value
    while True:
        users = consumers.get(current, [])
        if len(users) != 1 or nodes[users[0]].op_type not in _RELAYOUT:
            return seen
        nxt = nodes[users[0]].output[0]
        if not nxt or nxt in seen:
            return seen
        seen.add(nxt)
        current = nxt


def _trace_back(value: str, nodes: list[Any], producer: dict[str, int]) -> str:
    """The value ``value`` is a relayout of: back through layout-only nodes' data inputs."""
    seen = set()
    while value in producer and value not in seen:
        seen.add(value)
        n = nodes[producer[value]]
        if n.op_type not in _RELAYOUT or not n.input or not n.input[0]:
            break
        value = n.input[0]
    return value


def initializer_readers(proto: Any, name_of: Any, is_layer: Any) -> dict[str, list[str]]:
    """For each initializer of ``proto``, the user names (``name_of(node)``) of the layer nodes
    (``is_layer(node)``) that read it, directly or through layout-only nodes (a tied weight:
    ``Gather(wte, ids)`` and ``MatMul(x, Transpose(wte))`` both read ``wte``), in graph order."""
    nodes = list(proto.graph.node)
    producer = {out: k for k, n in enumerate(nodes) for out in n.output if out}
    inits = {i.name for i in proto.graph.initializer}
    out: dict[str, list[str]] = {}
    for n in nodes:
        if not is_layer(n):
            continue
        for name in n.input:
            origin = _trace_back(name, nodes, producer) if name else ""
            if origin in inits:
                users = out.setdefault(origin, [])
                if name_of(n) not in users:
                    users.append(name_of(n))
    return out
