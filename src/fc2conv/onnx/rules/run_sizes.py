"""Sizes an exported graph computes at run time, for the default layout's folds.

An export with a dynamic batch and length computes its head split's target as
``Concat(Shape(x)[0], Shape(x)[1], [H, D])``, its grouped-query Expand shapes and its rotary
tables' slices from ``Shape`` too, so shape inference leaves those sizes symbolic and unrelated.
The folds (:mod:`~fc2conv.onnx.rules.transpose_reshape`,
:mod:`~fc2conv.onnx.rules.matmul_transpose`, :mod:`~fc2conv.onnx.rules.swap_sink`) read them here:

* :func:`probed_sizes`: the dims of every value from two probes
  (:class:`~fc2conv.onnx.rules.shape_probe.Probe`): a size equal in both is that number, one
  that differs is the symbol ``"~a,b"`` of its two values, so two axes have the same size when
  their symbols are equal (a size equal to another by chance in one probe is not in the other);
* a new target is a constant where it can be (:func:`shape_input`: ``0`` copies a size the
  input holds on the same axis, ``-1`` stands for one other; :func:`expand_target`: ``1`` on an
  axis an Expand does not broadcast), valid at every size; else the run-time target gathered
  into the new order;
* a ``Shape`` of a value that moved reads the moved value: ``shape(Transpose(x, p))[k] =
  shape(x)[p[k]]``, so ``Shape(old)`` is ``Gather(Shape(x), p)`` (composed into the Gathers
  that read it, :func:`reread_shapes`) and the arithmetic after it is unchanged;
* the arithmetic that computed a replaced target is dropped (:func:`drop_dead`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir._core import Usage

from fc2conv.onnx.rules.ane_twin import _const_array
from fc2conv.onnx.rules.base import (
    Context,
    constant,
    int64_constant,
    is_constant,
    swap_last_two,
    transpose_perm,
)
from fc2conv.onnx.rules.shape_probe import Probe

Dim = int | str | None
Sizes = dict[ir.Value, list[Dim]]  # dims read from the probes, where inference has none


def probed_sizes(graph: ir.Graph) -> Sizes:
    """The dims of ``graph``'s values from two probes (:class:`Probe`): a size the same in both
    is that number, one that differs the symbol ``"~a,b"`` of its two sizes."""
    probe = Probe(graph)
    out: Sizes = {}
    values = [*graph.inputs, *(v for node in graph for v in node.outputs)]
    for v in values:
        found = probe.shapes.get(v.name or "")
        if found is not None:
            out[v] = [a if all(f[k] == a for f in found)
                      else "~" + ",".join(str(f[k]) for f in found)
                      for k, a in enumerate(found[0])]
    return out


def runtime_sizes(graph: ir.Graph) -> bool:
    """Whether ``graph`` computes sizes at run time: an input has a size not fixed, or a
    Reshape a target computed from values."""
    if any(v.shape is None or any(not isinstance(d, int) for d in v.shape)
           for v in graph.inputs):
        return True
    return any(node.op_type == "Reshape" and node.domain == "" and len(node.inputs) > 1
               and node.inputs[1] is not None and node.inputs[1].const_value is None
               and (node.inputs[1].producer() is None
                    or node.inputs[1].producer().op_type != "Constant")  # type: ignore[union-attr]
               for node in graph)


def dims_of(value: ir.Value | None, sizes: Sizes | None = None) -> list[Dim] | None:
    if sizes and value is not None and value in sizes:
        return sizes[value]
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def shape_input(ctx: Context, dims: Sequence[Dim], source: Sequence[Dim]) -> ir.Value | None:
    """A Reshape target for ``dims``: static sizes as they are, a symbolic one as ``0`` where
    the Reshape's input has it on the same axis, else ``-1`` (once)."""
    out: list[int] = []
    for k, d in enumerate(dims):
        if isinstance(d, int):
            if d <= 0:
                return None
            out.append(d)
        elif k < len(source) and source[k] is not None and source[k] == d:
            out.append(0)
        elif -1 not in out:
            out.append(-1)
        else:
            return None
    return int64_constant(ctx, out, "fc2conv_shape")


def shape_read(use: Usage) -> bool:
    """Whether ``use`` is a ``Shape`` node of the graph that computes the value it reads (it
    reads sizes, not data; one in an If / Loop body is left as a data reader)."""
    node, value = use.node, use.node.inputs[use.idx]
    return node.op_type == "Shape" and node.domain == "" and value is not None \
        and node.graph is value.graph


def data_uses(value: ir.Value) -> list[ir.Node]:
    """The readers of ``value`` other than ``Shape`` nodes (:func:`shape_read`)."""
    return [u.node for u in value.uses() if not shape_read(u)]


def reread_shapes(ctx: Context, old: ir.Value, x: ir.Value, p: Sequence[int]) -> None:
    """Every ``Shape`` reading ``old`` (the value ``Transpose(x, p)``) reads ``x`` instead:
    ``Gather(Shape(x), p[start:end])``."""
    for use in list(old.uses()):
        shape = use.node
        if not shape_read(use) or shape.graph is not ctx.graph:
            continue
        start, end = (shape.attributes.get(k) for k in ("start", "end"))
        picked = list(p)[slice(None if start is None else int(start.value),
                         None if end is None else int(end.value))]
        name = ctx.unique(shape.name or "shape")
        whole = ir.node("Shape", [x], name=name)
        whole.outputs[0].name = ctx.unique(f"{name}_out")
        if _compose(ctx, shape, whole, picked):
            continue
        index = int64_constant(ctx, picked, "fc2conv_axes")
        gather = ir.node("Gather", [whole.outputs[0], index], {"axis": 0},
                         name=ctx.unique(f"{name}_axes"))
        gather.outputs[0].name = ctx.unique(f"{gather.name}_out")
        ctx.graph.insert_before(shape, [whole, gather])
        out = shape.outputs[0]
        ir.convenience.replace_all_uses_with(out, gather.outputs[0], replace_graph_outputs=True)
        gather.outputs[0].type, gather.outputs[0].shape = out.type, out.shape
        if gather.outputs[0].is_graph_output():
            out_name, out.name = out.name, ctx.unique(f"{out.name}_unused")
            gather.outputs[0].name = out_name
        ctx.graph.remove(shape, safe=True)


def _compose(ctx: Context, shape: ir.Node, whole: ir.Node, picked: list[int]) -> bool:
    """When only ``Gather(axis=0)`` nodes with constant indices ``I`` read ``shape``: each
    reads ``whole`` at ``picked[I]`` instead (no Gather added), and ``shape`` goes."""
    out = shape.outputs[0]
    uses = list(out.uses())
    if not uses or out.is_graph_output() or any(
            u.node.op_type != "Gather" or u.node.domain != "" or u.idx != 0
            or int(getattr(u.node.attributes.get("axis"), "value", 0) or 0) != 0
            or not is_constant(u.node.inputs[1]) for u in uses):
        return False
    ctx.graph.insert_before(shape, whole)
    for use in uses:
        indices = constant(use.node.inputs[1], "indices").numpy()
        composed = np.asarray(picked, np.int64)[indices.astype(np.int64)]
        value = ir.Value(name=ctx.unique("fc2conv_axes"), shape=ir.Shape(list(composed.shape)),
                         type=ir.TensorType(ir.DataType.INT64), const_value=ir.tensor(composed))
        ctx.graph.register_initializer(value)
        old_indices = use.node.inputs[1]
        use.node.replace_input_with(0, whole.outputs[0])
        use.node.replace_input_with(1, value)
        drop_dead(ctx, old_indices)
    ctx.graph.remove(shape, safe=True)
    return True


def drop_dead(ctx: Context, value: ir.Value | None) -> None:
    """Remove the nodes of the main graph that computed ``value`` (a Reshape's old target) and
    nothing else that is still read, walking up; and initializers left unread."""
    shared = set(ctx.shape_constants.values())  # cached for reuse: convert_model drops them
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or v.uses() or v.is_graph_output() or v in shared:
            continue
        node = v.producer()
        if node is None:
            if v.is_initializer() and v.name in ctx.graph.initializers \
                    and not v.is_graph_input():
                del ctx.graph.initializers[v.name]  # type: ignore[arg-type]
            continue
        if node.graph is not ctx.graph or any(o.uses() or o.is_graph_output()
                                              for o in node.outputs):
            continue
        ins = list(node.inputs)
        ctx.graph.remove(node, safe=True)
        stack.extend(ins)


def size_only_move(ctx: Context, node: ir.Node) -> bool:
    """A Transpose only ``Shape`` nodes read (an exporter's size of the moved value) goes:
    they read ``Gather(Shape(x), perm)``. Whether it went."""
    p = transpose_perm(node)
    out = node.outputs[0]
    if p is None or node.inputs[0] is None or out.is_graph_output() or not out.uses() \
            or data_uses(out) or node.graph is not ctx.graph:
        return False
    reread_shapes(ctx, out, node.inputs[0], p)
    ctx.graph.remove(node, safe=True)
    return True


def expand_target(ctx: Context, node: ir.Node, sizes: Sizes | None, new: list[ir.Node]
                   ) -> ir.Value:
    """An Expand target that leaves the last two axes as they come: a constant target with
    ``1, 1`` there; a run-time one, from the probed sizes, ``1`` on each axis it does not
    broadcast and the size on one it does, or ``Concat(target[:-2], [1, 1])``."""
    arr = _const_array(node.inputs[1])
    if arr is not None:
        target = [int(v) for v in arr.reshape(-1)]
        return int64_constant(ctx, [*target[:-2], 1, 1], "fc2conv_shape")
    x, out = dims_of(node.inputs[0], sizes), dims_of(node.outputs[0], sizes)
    if x is not None and out is not None and len(x) <= len(out):
        padded: list[Dim] = [*([1] * (len(out) - len(x))), *x]
        fixed = [1 if a == b else b for a, b in zip(padded, out, strict=True)]
        ints = [d for d in fixed if isinstance(d, int)]
        if len(ints) == len(fixed):
            return int64_constant(ctx, [*ints[:-2], 1, 1], "fc2conv_shape")
    base = node.name or "expand"
    head = ir.node("Slice", [node.inputs[1], int64_constant(ctx, [0], "fc2conv_start"),
                             int64_constant(ctx, [-2], "fc2conv_end")], name=ctx.unique(base))
    tail = ir.node("Concat", [head.outputs[0], int64_constant(ctx, [1, 1], "fc2conv_ones")],
                   {"axis": 0}, name=ctx.unique(base))
    for n in (head, tail):
        n.outputs[0].name = ctx.unique(f"{n.name}_out")
        new.append(n)
    return tail.outputs[0]


def swapped_target(ctx: Context, reshape: ir.Node, target: list[int], sizes: Sizes | None,
                    new: list[ir.Node]) -> ir.Value:
    """The target of ``reshape`` (which keeps its input's last two axes) for the input with
    those axes exchanged: a constant target's last two entries swapped; a run-time one as a
    constant from the probed sizes (``0`` copies a size, ``-1`` one other), or ``Gather``-ed
    when they give none."""
    if target:
        return int64_constant(ctx, [*target[:-2], target[-1], target[-2]], "fc2conv_shape")
    out, x = dims_of(reshape.outputs[0], sizes), dims_of(reshape.inputs[0], sizes)
    assert out is not None and x is not None
    swap = swap_last_two(len(out))
    shape = shape_input(ctx, [out[i] for i in swap], [x[i] for i in swap_last_two(len(x))]) \
        if len(x) == len(out) else None
    if shape is not None:
        return shape
    gather = ir.node("Gather", [reshape.inputs[1], int64_constant(ctx, swap, "fc2conv_axes")],
                     {"axis": 0}, name=ctx.unique(f"{reshape.name or 'reshape'}_target"))
    gather.outputs[0].name = ctx.unique(f"{gather.name}_out")
    new.append(gather)
    return gather.outputs[0]
