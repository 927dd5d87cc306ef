"""Concrete sizes for a graph whose sizes are computed at run time (``Shape -> Gather ->
Concat -> Reshape``): shape inference where symbolic sizes lose track of each other.

The graph is *probed*: ONNX shape inference (data propagation on) runs on a weight-free copy with
each dynamic input size set to a concrete number; the small integer tensors the sizes flow
through (``Shape``, ``Gather``, ``Slice``, ``Concat``, ``Unsqueeze``, ``Cast``, ``Equal``,
``Where``, arithmetic, ...) are evaluated here with numpy, and a Reshape or Expand target that
inference could not read is set to its value before inference runs again. It is done twice with
different numbers; a size is trusted only as far as both probes agree (a size that equals
another by chance in one probe does not in the other).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from fc2conv.onnx.rules.shape_axes import groups

log = logging.getLogger(__name__)

# dynamic sizes in the two probes: distinct within a probe, each differs between probes
PROBES = ((7, 11, 13, 17, 19, 23, 29, 31, 37, 41), (5, 13, 17, 19, 23, 29, 31, 37, 41, 43))
SMALL = 1 << 12  # initializers up to this many elements keep their values in the probe
VECTOR = 64  # integer tensors up to this many elements are evaluated
ROUNDS = 3  # inference runs per probe at most


class Probe:
    """Concrete shapes of a graph's values under two assignments of its dynamic input sizes."""

    def __init__(self, graph: ir.Graph) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        found = [_infer(graph, sizes) for sizes in PROBES]
        for name, first in found[0].items():
            rest = [f.get(name) for f in found[1:]]
            if all(r is not None and len(r) == len(first) for r in rest):
                self.shapes[name] = (first, *rest)  # type: ignore[arg-type]

    def units(self, v: ir.Value) -> set[int]:
        """The axes of ``v`` of size 1 in every probe."""
        found = self.shapes.get(v.name or "")
        if found is None:
            return set()
        return {i for i in range(len(found[0])) if all(f[i] == 1 for f in found)}

    def runs(self, x: ir.Value, y: ir.Value) -> list[tuple[list[int], list[int]]] | None:
        """The grouping of the Reshape ``x -> y``, the same in every probe, or ``None``."""
        sx, sy = self.shapes.get(x.name or ""), self.shapes.get(y.name or "")
        if sx is None or sy is None:
            return None
        found = [groups(a, b) for a, b in zip(sx, sy, strict=True)]
        if found[0] is None or any(f != found[0] for f in found[1:]):
            return None
        return found[0]


def _infer(graph: ir.Graph, sizes: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Concrete value shapes of ``graph`` with its dynamic input sizes taken from ``sizes``."""
    try:
        model, n_inputs = _probe_model(graph, sizes)
        shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(ROUNDS):
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
            shapes = _shapes(inferred, n_inputs)
            if not _pin_targets(model, shapes):
                break
    except Exception as exc:  # noqa: BLE001 - a probe is a help, never a requirement
        log.info("ane: shape probe failed (%s); computed Reshape targets stay", exc)
        return {}
    return shapes


def _probe_model(graph: ir.Graph, sizes: Sequence[int]) -> tuple[onnx.ModelProto, int]:
    """A weight-free copy of ``graph`` (large initializers become inputs) whose inputs' dynamic
    sizes are ``sizes``, one number per size name."""
    given: dict[str, int] = {}

    def info(v: ir.Value, concrete: bool) -> onnx.ValueInfoProto:
        proto = ir.serde.serialize_value(v)
        if concrete:
            for d in proto.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    key = d.dim_param or f"?{len(given)}"
                    if key not in given:
                        given[key] = sizes[len(given) % len(sizes)]
                    d.Clear()
                    d.dim_value = given[key]
        return proto

    inputs = [info(v, True) for v in graph.inputs]
    inits = []
    for name, v in graph.initializers.items():
        if v.const_value is not None and v.const_value.size <= SMALL:
            inits.append(ir.serde.serialize_tensor(v.const_value))
            inits[-1].name = name
        elif v not in graph.inputs:
            inputs.append(info(v, False))
    nodes = [ir.serde.serialize_node(n) for n in graph]
    opsets = [onnx.helper.make_opsetid(d, int(v)) for d, v in graph.opset_imports.items()]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "probe", inputs, [], inits), opset_imports=opsets)
    model.ir_version = 10
    return model, len(graph.inputs)


def _shapes(model: onnx.ModelProto, n_inputs: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for vi in [*model.graph.input[:n_inputs], *model.graph.value_info]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    return out


def _pin_targets(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Evaluate the small integer tensors; give each Reshape / Expand whose result inference
    could not size its target as a constant. Whether any was given."""
    values: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        if init.data_type in _INTS and int(np.prod(init.dims)) <= VECTOR:
            values[init.name] = numpy_helper.to_array(init)
    pinned = False
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        if node.op_type in ("Reshape", "Expand") and node.output[0] not in shapes \
                and len(node.input) > 1 and node.input[1] in values \
                and node.input[1] not in {i.name for i in model.graph.initializer}:
            name = f"{node.input[1]}__probe"
            model.graph.initializer.append(numpy_helper.from_array(
                values[node.input[1]].astype(np.int64), name))
            node.input[1] = name
            pinned = True
        try:
            result = _evaluate(node, [values.get(i) if i else None for i in node.input], shapes)
        except Exception:  # noqa: BLE001 - an op this evaluator does not read stays unknown
            result = None
        if result is not None and result.size <= VECTOR and result.dtype.kind in "iub":
            values[node.output[0]] = result
    return pinned


_INTS = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}
_BINARY: dict[str, Any] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide,
    "Equal": np.equal, "Less": np.less, "Greater": np.greater, "Max": np.maximum,
    "Min": np.minimum, "And": np.logical_and, "Or": np.logical_or}


def _axes(node: onnx.NodeProto, ins: list[np.ndarray | None], attrs: dict) -> list[int]:
    if len(ins) > 1 and ins[1] is not None:
        return [int(a) for a in ins[1].reshape(-1)]
    return [int(a) for a in attrs.get("axes", [])]


def _evaluate(node: onnx.NodeProto, ins: list[np.ndarray | None],
              shapes: dict[str, tuple[int, ...]]) -> np.ndarray | None:
    """The value of ``node``'s output from its inputs' values, for the ops sizes flow through;
    ``None`` when an input or the op is unknown here."""
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Constant":
        value = attrs.get("value")
        if value is not None:
            return numpy_helper.to_array(value)
        if "value_ints" in attrs:
            return np.asarray(attrs["value_ints"], np.int64)
        return np.asarray(attrs["value_int"], np.int64) if "value_int" in attrs else None
    if op == "Shape":
        shape = shapes.get(node.input[0])
        return None if shape is None else np.asarray(shape, np.int64)[
            slice(attrs.get("start"), attrs.get("end"))]
    if op == "Size":
        shape = shapes.get(node.input[0])
        return None if shape is None else np.asarray(int(np.prod(shape)), np.int64)
    x = ins[0] if ins else None
    if x is None:
        return None
    if op in ("Identity", "Cast"):
        return x if op == "Identity" else x.astype(
            onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op in _BINARY and len(ins) == 2 and ins[1] is not None:
        return np.asarray(_BINARY[op](x, ins[1]))
    if op == "Not":
        return np.logical_not(x)
    if op == "Neg":
        return np.negative(x)
    if op == "Gather" and ins[1] is not None:
        return np.take(x, ins[1], axis=attrs.get("axis", 0))
    if op == "Concat" and all(i is not None for i in ins):
        return np.concatenate(ins, axis=attrs["axis"])  # type: ignore[arg-type]
    if op == "Unsqueeze":
        axes = _axes(node, ins, attrs)
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = np.expand_dims(x, a)
        return x
    if op == "Squeeze":
        axes = _axes(node, ins, attrs)
        return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)
    if op == "Slice" and ins[1] is not None and ins[2] is not None:
        axes = list(ins[3].reshape(-1)) if len(ins) > 3 and ins[3] is not None \
            else list(range(ins[1].size))
        steps = list(ins[4].reshape(-1)) if len(ins) > 4 and ins[4] is not None \
            else [1] * len(axes)
        index = [slice(None)] * x.ndim
        for a, b, e, st in zip(axes, ins[1].reshape(-1), ins[2].reshape(-1), steps,
                               strict=True):
            index[int(a)] = slice(int(b), int(e), int(st))
        return x[tuple(index)]
    if op == "Where" and ins[1] is not None and ins[2] is not None:
        return np.where(x, ins[1], ins[2])
    if op == "ConstantOfShape":
        fill = numpy_helper.to_array(attrs["value"]).reshape(-1) if "value" in attrs \
            else np.zeros(1, np.float32)
        return np.full([int(d) for d in x.reshape(-1)], fill[0], dtype=fill.dtype) \
            if int(np.prod(x)) <= VECTOR else None
    if op == "Range" and ins[1] is not None and ins[2] is not None:
        return np.arange(x.item(), ins[1].item(), ins[2].item())
    if op == "Reshape" and ins[1] is not None:
        target = [int(t) if t != 0 else x.shape[i] for i, t in enumerate(ins[1].reshape(-1))]
        return x.reshape(target)
    if op == "Expand" and ins[1] is not None:
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(ins[1].reshape(-1))))
    return None
