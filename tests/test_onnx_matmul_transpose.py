"""The attention product computed transposed where a Conv reads it so,
``Transpose(P @ V) -> V^T @ P^T`` (:mod:`fc2conv.onnx.rules.matmul_transpose`): on hand-built
products against numpy's float64 product, on an encoder block converted with the default layout
against its float64 reference (onnx's reference evaluator), and back with ``to_linear``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _onnx_helpers import F32_EPS, assert_matches_reference, model, op_counts, run_ort, vinfo
from onnx import helper, numpy_helper
from test_onnx_layout_ane import B, C, D, F, H, S, _block, _feeds

from fc2conv.onnx import convert
from fc2conv.onnx.rules.base import LAYOUT_KEY, Context
from fc2conv.onnx.rules.matmul_transpose import fold_transposed_products


def _product(p_shape: list[int], vt_shape: list[int], moved_v: bool, weight: bool
             ) -> onnx.ModelProto:
    """``-Transpose(P @ V)`` with ``V = Transpose(Vt)`` (or ``Vt`` itself, or a weight)."""
    n = helper.make_node
    swap = [*range(len(vt_shape) - 2), len(vt_shape) - 1, len(vt_shape) - 2]
    nodes, inits, inputs = [], [], [vinfo("p", p_shape)]
    if weight:
        rng = np.random.default_rng(7)
        inits.append(numpy_helper.from_array(
            rng.standard_normal(vt_shape[-2:][::-1]).astype(np.float32), "v"))
    elif moved_v:
        inputs.append(vinfo("vt", vt_shape))
        nodes.append(n("Transpose", ["vt"], ["v"], perm=swap))
    else:
        inputs.append(vinfo("v", [*vt_shape[:-2], vt_shape[-1], vt_shape[-2]]))
    rank = max(len(p_shape), len(vt_shape))
    nodes += [n("MatMul", ["p", "v"], ["y"]),
              n("Transpose", ["y"], ["z"], perm=[*range(rank - 2), rank - 1, rank - 2]),
              n("Neg", ["z"], ["o"])]  # a reader: a graph output's move is left as it is
    out = [*np.broadcast_shapes(tuple(p_shape[:-2]), tuple(vt_shape[:-2])), vt_shape[-2],
           p_shape[-2]]
    return model(nodes, inputs, [vinfo("o", out)], inits)


def _fold(m: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    irm = ir.serde.deserialize_model(m)
    ir.passes.common.ShapeInferencePass()(irm)
    move = [node for node in irm.graph if node.op_type == "Transpose"][-1]
    move.metadata_props[LAYOUT_KEY] = "exit:t4"  # as if a converted layer had added it
    folded = fold_transposed_products(Context(irm.graph, 17))
    irm.graph.sort()
    return ir.serde.serialize_model(irm), folded


@pytest.mark.parametrize(("p_shape", "vt_shape"), [
    ([2, 3, 5, 7], [2, 3, 4, 7]),  # (B, H, S, S) @ (B, H, S, D), V^T given
    ([6, 5], [4, 5]),  # rank 2
    ([2, 3, 5, 7], [3, 4, 7]),  # V broadcast over the batch
])
def test_product_computed_transposed_matches_numpy(p_shape: list[int], vt_shape: list[int]
                                                   ) -> None:
    m = _product(p_shape, vt_shape, moved_v=True, weight=False)
    out, folded = _fold(m)
    onnx.checker.check_model(out, full_check=True)
    assert folded == 1
    # V's move cancels, the product's move goes; P^T is one move onnxruntime fuses into its
    # MatMul (transB), so the graph has no more Transposes than before: 2 -> 1
    assert op_counts(out)["Transpose"] == 1 and op_counts(out)["MatMul"] == 1
    rng = np.random.default_rng(len(p_shape) + len(vt_shape))
    p = rng.standard_normal(p_shape).astype(np.float32)
    vt = rng.standard_normal(vt_shape).astype(np.float32)
    want = -np.swapaxes(p.astype(np.float64) @ np.swapaxes(vt.astype(np.float64), -1, -2), -1, -2)
    got = run_ort(out, {"p": p, "vt": vt})[0]
    k = p_shape[-1]
    bound = 1.01 * k * F32_EPS / (1 - k * F32_EPS) * (np.abs(p).astype(np.float64) @ np.abs(
        np.swapaxes(vt.astype(np.float64), -1, -2)))
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= np.swapaxes(bound, -1, -2))


@pytest.mark.parametrize(("moved_v", "weight"), [(False, False), (False, True)])
def test_products_left_alone(moved_v: bool, weight: bool) -> None:
    """No operand's move to cancel (two new moves for one: refused), or a weight (a layer)."""
    m = _product([2, 3, 5, 7], [2, 3, 4, 7], moved_v=moved_v, weight=weight)
    out, folded = _fold(m)
    assert folded == 0 and op_counts(out) == op_counts(m)


def _block_with_head_reshape(rng: np.random.Generator) -> onnx.ModelProto:
    """The block with the exporters' ``Reshape(P @ V, (B, -1, S, D))`` before the head merge,
    a Reshape that keeps the last two axes."""
    m = _block(rng)
    nodes = list(m.graph.node)
    at = next(i for i, node in enumerate(nodes) if node.output[0] == "o0")
    nodes[at + 1].input[0] = "o0r"
    nodes.insert(at + 1, helper.make_node("Reshape", ["o0", "keep"], ["o0r"]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.append(numpy_helper.from_array(np.asarray([B, -1, S, D], np.int64),
                                                       "keep"))
    onnx.checker.check_model(m, full_check=True)
    return m


def _block_grouped_v(rng: np.random.Generator) -> onnx.ModelProto:
    """The block with one K/V head shared by the ``H`` query heads, V expanded as Llama's
    export does: ``Reshape(Expand(Unsqueeze(Transpose(v), 2), (B, 1, H, S, D)), (B, H, S, D))``
    (three ops that keep the last two axes between the head split's move and ``P @ V``)."""
    m = _block(rng)
    n = helper.make_node
    inits = {t.name: t for t in m.graph.initializer}
    inits["wv"] = numpy_helper.from_array(rng.standard_normal((C, D)).astype(np.float32), "wv")
    inits["bv"] = numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "bv")
    for name, values in (("split_kv", [B, S, 1, D]), ("two_axis", [2]),
                         ("rep", [B, 1, H, S, D]), ("heads", [B, H, S, D])):
        inits[name] = numpy_helper.from_array(np.asarray(values, np.int64), name)
    nodes = []
    for node in m.graph.node:
        if node.output[0] == "v2":
            node.input[1] = "split_kv"
        if node.output[0] == "v":
            node.output[0] = "vh"
            nodes += [node, n("Unsqueeze", ["vh", "two_axis"], ["vu"]),
                      n("Expand", ["vu", "rep"], ["ve"]), n("Reshape", ["ve", "heads"], ["v"])]
            continue
        nodes.append(node)
    out = model(nodes, list(m.graph.input), list(m.graph.output), list(inits.values()), opset=20)
    return out


@pytest.mark.parametrize("build", [_block, _block_with_head_reshape, _block_grouped_v])
def test_encoder_block_product_needs_no_move(build) -> None:
    """Default layout: the head merge before the output projection's Conv needs no Transpose
    (before: one ``(0, 1, 3, 2)`` move of ``P @ V``); the product reads ``V^T`` as the V Conv's
    Reshape wrote it; equal to the float64 reference on fresh inputs; ``to_linear`` gives the
    model's own Transposes and Reshapes back (no more of them)."""
    rng = np.random.default_rng(3)
    m = build(rng)
    assert H * D == C
    conv, report = convert(m, "conv")
    producer = {o: node for node in conv.graph.node for o in node.output}
    products = [node for node in conv.graph.node
                if node.op_type == "MatMul" and producer[node.input[1]].op_type == "Transpose"
                and producer[node.input[0]].op_type == "Reshape"]
    assert len(products) == 1, report.layout_changes  # V^T @ P^T, V^T read as written
    for node in conv.graph.node:
        if node.op_type == "Transpose":
            src = producer.get(node.input[0])
            if src is not None and src.op_type == "Reshape":
                src = producer.get(src.input[0])
            assert src is None or src.op_type != "MatMul", report.layout_changes
    assert op_counts(conv)["Transpose"] == 6, report.layout_changes
    for seed in (11, 12):
        assert_matches_reference(m, conv, _feeds(np.random.default_rng(seed)), depth=4 * F)
    back, _ = convert(conv, "linear")
    # the grouped block's single K/V head makes its V move a unit axis's: folded away
    assert op_counts(back)["Transpose"] <= op_counts(m)["Transpose"]
    assert op_counts(back)["Reshape"] == op_counts(m)["Reshape"]
    assert not any(node.op_type == "Conv" for node in back.graph.node)
    assert_matches_reference(m, back, _feeds(np.random.default_rng(13)), depth=4 * F)
