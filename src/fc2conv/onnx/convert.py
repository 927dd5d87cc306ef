"""Run the rewrite rules over an ONNX graph (onnx-ir) and report what happened to each layer.

``convert_model(model, to="conv"|"linear")`` edits an ``onnx_ir.Model`` in place: shape
inference, every rule on every candidate node of the main graph, layout sharing, then shape
inference again. New weights are lazy tensors computed when the model is saved, so a model with
external data is never fully in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common

from fc2conv.errors import Fc2ConvError
from fc2conv.onnx.rules import TO_CONV, TO_LINEAR
from fc2conv.onnx.rules.ane import ane_layout
from fc2conv.onnx.rules.ane_back import linear_layout
from fc2conv.onnx.rules.ane_fold import (
    fold_affine_into_convs,
    fold_shifts_into_residuals,
    move_scales_onto_convs,
)
from fc2conv.onnx.rules.ane_norm import square_sums
from fc2conv.onnx.rules.base import LAYOUT_KEY, Context, Refused, drop_dead_constant_moves
from fc2conv.onnx.rules.layout import (
    collapse_flat_round_trips,
    fold_transpose_pairs,
    merge_duplicate_moves,
    share_layout_changes,
)
from fc2conv.onnx.rules.matmul_transpose import (
    fold_transposed_products,
    unfold_transposed_products,
)
from fc2conv.onnx.rules.swap_sink import lift_swaps, sink_swaps
from fc2conv.onnx.rules.transpose_reshape import fold_transposes_through_reshapes

log = logging.getLogger(__name__)

DIRECTIONS = ("conv", "linear")
LAYOUTS = ("channels_first", "ane")


@dataclass
class Entry:
    """One candidate layer: ``status`` is ``"converted"`` or ``"left"``; ``detail`` says into
    what, or why not."""

    node: str
    op: str
    status: str
    detail: str


@dataclass
class ConversionReport:
    direction: str
    entries: list[Entry] = field(default_factory=list)
    layout_changes_shared: int = 0
    transposes_before: int = 0
    transposes_after: int = 0
    layout: str = "channels_first"
    # every Transpose of the converted graph: "name: what it reads -> what reads it"
    layout_changes: list[str] = field(default_factory=list)
    context: Context | None = field(default=None, repr=False)

    @property
    def converted(self) -> list[Entry]:
        return [e for e in self.entries if e.status == "converted"]

    @property
    def left(self) -> list[Entry]:
        return [e for e in self.entries if e.status == "left"]


def _infer_shapes(model: ir.Model) -> None:
    try:
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    except Exception as exc:  # noqa: BLE001 - inference is a help, never a requirement
        log.warning("shape inference failed (%s); rules needing shapes will refuse", exc)


def _count(graph: ir.Graph, op: str) -> int:
    return sum(1 for n in graph if n.op_type == op)


_SEE_THROUGH = ("Squeeze", "Unsqueeze")  # rank-only companions of a layout change


def _where(value: ir.Value | None) -> str:
    if value is None:
        return "?"
    producer = value.producer()
    if producer is not None and producer.op_type in _SEE_THROUGH:
        return _where(producer.inputs[0])
    if producer is None:
        return f"input {value.name}"
    return f"{producer.op_type} {producer.name or value.name}"


def _readers(value: ir.Value) -> list[str]:
    out = []
    for use in value.uses():
        if use.node.op_type in _SEE_THROUGH and use.idx == 0:
            out += _readers(use.node.outputs[0])
        else:
            out.append(f"{use.node.op_type} {use.node.name}")
    if value.is_graph_output():
        out.append(f"output {value.name}")
    return out


def _constants_read(graph: ir.Graph) -> list[ir.Value]:
    """The initializers and Constant-node outputs something in ``graph`` reads."""
    values = [*graph.initializers.values(),
              *(n.outputs[0] for n in graph if n.op_type == "Constant" and n.domain == "")]
    return [v for v in values if v.uses() or v.is_graph_output()]


def drop_orphaned_constants(graph: ir.Graph, read_before: list[ir.Value]) -> int:
    """Remove the constants of ``read_before`` (initializers, Constant nodes) that nothing
    reads any more: the shapes, axes and weights of the nodes a conversion replaced. A
    constant the input model already left unread, or a graph input's default, stays."""
    dropped = 0
    for value in read_before:
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if value.name and graph.initializers.get(value.name) is value:
            del graph.initializers[value.name]
            dropped += 1
        elif producer is not None and producer.graph is graph:
            graph.remove(producer, safe=True)
            dropped += 1
    return dropped


def layout_changes(graph: ir.Graph) -> list[str]:
    """Each Transpose of ``graph``, where it sits: ``"name [perm]: reads <op name> -> <op names
    reading it>"`` (graph inputs and outputs named as such; a Squeeze/Unsqueeze next to it is
    looked through)."""
    out = []
    for node in graph:
        if node.op_type != "Transpose":
            continue
        perm = node.attributes.get("perm")
        readers = _readers(node.outputs[0])
        out.append(f"{node.name or node.outputs[0].name} "
                   f"{list(perm.value) if perm is not None else 'reverse'}: "
                   f"reads {_where(node.inputs[0])} -> {', '.join(readers) or 'nothing'}")
    return out


def convert_model(
    model: ir.Model,
    to: str,
    *,
    only: Collection[str] | None = None,
    dynamic_spatial: bool = False,
    on_node: Callable[[int, int], None] | None = None,
    layout: str = "channels_first",
) -> ConversionReport:
    """Rewrite ``model`` in place toward ``to`` ("conv" or "linear"); return the report.

    ``only``: node names (or output names) to convert; others are left and listed.
    ``dynamic_spatial`` (``to="conv"``): make the image dims symbolic and keep the score map.
    ``on_node(done, total)``: progress callback.
    ``layout`` (``to="conv"``): ``"channels_first"`` turns a rank-3 MatMul into a Conv1d on
    ``(B, C, S)`` with a Transpose on each side (shared between neighbours);
    ``"ane"`` into a Conv2d on ``(B, C, 1, S)`` and keeps activations in that layout across
    residuals, norms and attention (:mod:`fc2conv.onnx.rules.ane`).
    """
    if to not in DIRECTIONS:
        raise Fc2ConvError(f"unknown direction {to!r}; use 'conv' or 'linear'")
    if layout not in LAYOUTS:
        raise Fc2ConvError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "ane" and to != "conv":
        raise Fc2ConvError("layout='ane' applies to the conv direction only")
    if dynamic_spatial and to != "conv":
        raise Fc2ConvError("dynamic_spatial applies to --to conv (Flatten+Gemm -> Conv) only")
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset and opset < 11:
        raise Fc2ConvError(
            f"the model uses ONNX opset {opset}; fc2conv rewrites opset 11 and newer "
            f"(upgrade it with onnx.version_converter)"
        )
    _infer_shapes(model)
    read_before = _constants_read(graph)
    ctx = Context(graph, opset, dynamic_spatial=dynamic_spatial)
    if to == "linear" and unfold_transposed_products(ctx) + lift_swaps(ctx):
        _infer_shapes(model)
    report = ConversionReport(to, transposes_before=_count(graph, "Transpose"), context=ctx,
                              layout=layout)
    rules = TO_CONV if to == "conv" else TO_LINEAR
    anchors = {op for r in rules for op in r.op_types}
    wanted = set(only) if only else None
    seen: set[str] = set()
    ane_convs: set[ir.Node] = set()
    if layout == "ane" or to == "linear":
        walk = ane_layout if to == "conv" else linear_layout
        walked = walk(ctx, wanted)
        ane_convs = walked.convs
        for node, detail in walked.converted:
            label = node.name or node.outputs[0].name or node.op_type
            seen.update({label, node.outputs[0].name or ""} & (wanted or set()))
            report.entries.append(Entry(label, node.op_type, "converted", detail))
            log.info("%s (%s) -> %s", label, node.op_type, detail)
    candidates = [n for n in graph if n.op_type in anchors and n.domain == ""]
    for i, node in enumerate(candidates):
        if on_node is not None:
            on_node(i, len(candidates))
        if node.graph is not graph:  # consumed by an earlier rewrite
            continue
        label = node.name or (node.outputs[0].name or f"{node.op_type}#{i}")
        if wanted is not None and not ({label, node.outputs[0].name} & wanted):
            report.entries.append(Entry(label, node.op_type, "left", "not named by --only"))
            continue
        if wanted is not None:
            seen.update({label, node.outputs[0].name or ""} & wanted)
        reasons = []
        for rule in rules:
            if node.op_type not in rule.op_types:
                continue
            try:
                match = rule.check(node, ctx)
            except Refused as exc:
                reasons.append(str(exc))
                continue
            detail = rule.rewrite(match, ctx)
            report.entries.append(Entry(label, node.op_type, "converted", detail))
            log.info("%s (%s) -> %s", label, node.op_type, detail)
            break
        else:
            report.entries.append(Entry(label, node.op_type, "left", reasons[-1]))
            log.info("left %s (%s): %s", label, node.op_type, reasons[-1])
    if wanted is not None and wanted - seen:
        missing = ", ".join(sorted(wanted - seen))
        raise Fc2ConvError(f"--only names no {'/'.join(sorted(anchors))} node called {missing}")
    report.layout_changes_shared = share_layout_changes(ctx) + collapse_flat_round_trips(ctx)
    report.layout_changes_shared += fold_transpose_pairs(ctx)
    if fold_transposes_through_reshapes(ctx):
        report.layout_changes_shared += fold_transpose_pairs(ctx)
    report.layout_changes_shared += merge_duplicate_moves(ctx)
    products = fold_transposed_products(ctx)
    if products:  # to_linear: the head split's move may now meet a layer's move
        report.layout_changes_shared += products + fold_transposes_through_reshapes(ctx)
        report.layout_changes_shared += fold_transpose_pairs(ctx)
    if to == "conv" and layout == "channels_first":
        report.layout_changes_shared += sink_swaps(ctx)
    drop_dead_constant_moves(graph)
    for value in ctx.shape_constants.values():
        if not value.uses() and value.name and value.name in graph.initializers:
            del graph.initializers[value.name]
    drop_orphaned_constants(graph, read_before)
    if dynamic_spatial:
        _make_spatial_dynamic(ctx)
    graph.sort()
    _infer_shapes(model)
    if to == "conv" and layout == "ane":
        square_sums(ctx)  # before the folds: they give the norm's sqrt(C) w to the Convs
    if ane_convs and fold_affine_into_convs(ctx, ane_convs) + move_scales_onto_convs(ctx) \
            + fold_shifts_into_residuals(ctx, ane_convs):
        graph.sort()  # the folds read the shapes just inferred (a constant must not broadcast)
        _infer_shapes(model)
    report.transposes_after = _count(graph, "Transpose")
    report.layout_changes = layout_changes(graph)
    if on_node is not None:
        on_node(len(candidates), len(candidates))
    return report


def _make_spatial_dynamic(ctx: Context) -> None:
    """Symbolic image dims on rank 3-5 inputs; graph outputs keep the conv's score map."""
    graph = ctx.graph
    for value in graph.inputs:
        if value.shape is not None and 3 <= value.shape.rank() <= 5:
            rank = value.shape.rank()
            value.shape = ir.Shape(
                [*value.shape[:2], *(f"{value.name}_dim{i}" for i in range(2, rank))]
            )
    for i, out in enumerate(list(graph.outputs)):
        producer = out.producer()
        if producer is None or producer.metadata_props.get(LAYOUT_KEY) != "exit:flat":
            continue
        score_map = producer.inputs[0]
        assert score_map is not None
        graph.outputs[i] = score_map
        graph.remove(producer, safe=False)
        score_map.name = out.name
        score_map.type = out.type
        lead = (
            [None, None]
            if out.shape is None
            else [d if isinstance(d, int) else d.value for d in out.shape[:2]]
        )
        score_map.shape = ir.Shape([*lead, f"{out.name}_h", f"{out.name}_w"])
    for node in graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
