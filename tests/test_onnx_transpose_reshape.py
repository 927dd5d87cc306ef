"""``Transpose -> regrouping Reshape -> Transpose`` chains that ``to_conv`` leaves around the
attention's head split and merge become one move and one Reshape
(:mod:`fc2conv.onnx.rules.transpose_reshape`): checked on hand-built chains against numpy's own
transpose/reshape (pure data movement, so bit-equal), and on an encoder block converted with
the default layout against its float64 reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _onnx_helpers import assert_matches_reference, model, op_counts, run_ort, vinfo
from onnx import helper, numpy_helper
from test_onnx_layout_ane import C, _block, _feeds

from fc2conv.onnx import convert
from fc2conv.onnx.rules.base import LAYOUT_KEY, Context
from fc2conv.onnx.rules.transpose_reshape import fold_transposes_through_reshapes

# x shape, first perm, Reshape target, second perm, Transposes left, scale the middle by 3
CASES = [
    ((2, 12, 5), (0, 2, 1), (2, 5, 3, 4), (0, 2, 1, 3), 1, False),  # Conv out -> head split
    ((2, 12, 5), (0, 2, 1), (2, 5, 3, 4), (0, 2, 3, 1), 0, False),  # ... as K^T: no move
    ((2, 12, 5), (0, 2, 1), (2, 5, 3, 4), (0, 2, 1, 3), 1, True),  # q * scale in between
    ((2, 3, 7, 4), (0, 2, 1, 3), (2, 7, 12), (0, 2, 1), 1, False),  # head merge -> Conv in
    ((2, 3, 7, 4), (0, 2, 1, 3), (2, 7, 12), (0, 2, 1), 1, True),
    ((2, 3, 7, 4), (0, 2, 1, 3), (14, 12), (1, 0), 1, False),  # batch and length merged too
    ((2, 6, 5), (0, 2, 1), (2, 5, 2, 3, 1), (0, 3, 2, 1, 4), 1, False),  # a unit dim
    ((2, 3, 4), (0, 2, 1), (2, 12), (1, 0), 1, False),
    ((2, 3, 4), (0, 2, 1), (3, 8), (1, 0), 2, False),  # not a regrouping: left as it is
]


def _chain(shape: tuple[int, ...], p: tuple[int, ...], target: tuple[int, ...],
           q: tuple[int, ...], scaled: bool, dynamic: bool) -> onnx.ModelProto:
    n = helper.make_node
    mid = "t"
    nodes = [n("Transpose", ["x"], ["t"], perm=list(p))]
    given = (0, *target[1:]) if dynamic else target  # 0: the batch copied from the input
    inits = [numpy_helper.from_array(np.asarray(given, np.int64), "shape")]
    if scaled:
        nodes.append(n("Constant", [], ["three"], value=numpy_helper.from_array(
            np.asarray(3.0, np.float32))))
        nodes.append(n("Mul", ["three", "t"], ["m"]))
        mid = "m"
    nodes += [n("Reshape", [mid, "shape"], ["r"]), n("Transpose", ["r"], ["y"], perm=list(q))]
    dims: list[int | str] = list(shape)
    if dynamic:  # the batch symbolic where the Reshape keeps it on axis 0
        dims[0] = "batch"
    out = [target[i] for i in q]
    return model(nodes, [vinfo("x", dims)], [vinfo("y", out)], inits)


def _fold(m: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    irm = ir.serde.deserialize_model(m)
    ir.passes.common.ShapeInferencePass()(irm)
    first = next(node for node in irm.graph if node.op_type == "Transpose")
    first.metadata_props[LAYOUT_KEY] = "exit:t3"  # as if a converted layer had added it
    ctx = Context(irm.graph, 17)
    folded = fold_transposes_through_reshapes(ctx)
    irm.graph.sort()
    return ir.serde.serialize_model(irm), folded


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize(("shape", "p", "target", "q", "left", "scaled"), CASES)
def test_chain_is_one_move(shape: tuple[int, ...], p: tuple[int, ...], target: tuple[int, ...],
                           q: tuple[int, ...], left: int, scaled: bool, dynamic: bool) -> None:
    m = _chain(shape, p, target, q, scaled, dynamic and target[0] == shape[0])
    out, folded = _fold(m)
    onnx.checker.check_model(out, full_check=True)
    assert op_counts(out)["Transpose"] == left and folded == (left < 2)
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    want = np.reshape(np.transpose(x, p) * (3 if scaled else 1), target).transpose(q)
    got = run_ort(out, {"x": x})[0]
    assert got.shape == want.shape and np.array_equal(got, want)


def test_encoder_block_default_layout_keeps_one_move_per_head_transpose() -> None:
    """The default layout on the block: each of Q, K, V needs at most its own head move (K^T
    none), the head merge none (the product P @ V is computed transposed, V^T @ P^T, see
    test_onnx_matmul_transpose.py); no Transpose -> Reshape -> Transpose chain is left (before
    the folds: 11 Transposes, then 7, now 6), and the result matches the float64 reference."""
    rng = np.random.default_rng(0)
    m = _block(rng)
    conv, report = convert(m, "conv")
    counts = op_counts(conv)
    assert counts["Conv"] == 6 and counts["MatMul"] == 2
    producer = {o: node for node in conv.graph.node for o in node.output}
    for node in conv.graph.node:
        mid = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        first = producer.get(mid.input[0]) if mid is not None and mid.op_type == "Reshape" \
            else None
        assert first is None or first.op_type != "Transpose", report.layout_changes
    assert counts["Transpose"] == 6, report.layout_changes
    assert_matches_reference(m, conv, _feeds(rng), depth=4 * C)
    back, _ = convert(conv, "linear")
    assert op_counts(back)["Transpose"] == op_counts(m)["Transpose"]  # the model's own back
    assert op_counts(back)["Reshape"] == op_counts(m)["Reshape"]
    assert_matches_reference(m, back, _feeds(rng), depth=4 * C)



def test_allowzero_without_a_zero_folds() -> None:
    """torch.export writes head splits as ``Reshape(allowzero=1)``; with no 0 in the target
    that is the same Reshape, and the chain folds (before: left, two moves)."""
    shape, p, target, q = (2, 12, 5), (0, 2, 1), (2, 5, 3, 4), (0, 2, 1, 3)
    m = _chain(shape, p, target, q, scaled=False, dynamic=False)
    next(n for n in m.graph.node if n.op_type == "Reshape").attribute.append(
        helper.make_attribute("allowzero", 1))
    out, folded = _fold(m)
    assert folded == 1 and op_counts(out)["Transpose"] == 1
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert np.array_equal(run_ort(out, {"x": x})[0], np.reshape(np.transpose(x, p), target)
                          .transpose(q))


@pytest.mark.parametrize(("allowzero", "target", "same"), [
    (None, [2, 0, 4], True), (0, [2, 0, 4], True), (1, [2, 3, 4], True),
    (1, [2, 0, 4], False),  # a literal empty axis, not "copy the input's"
    (1, None, False)])  # a target computed at run time
def test_zeros_copied(allowzero: int | None, target: list[int] | None, same: bool) -> None:
    from fc2conv.onnx.rules.base import zeros_copied

    shape = ir.Value(name="s") if target is None else ir.Value(
        name="s", const_value=ir.tensor(np.asarray(target, np.int64)))
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    node = ir.node("Reshape", [ir.Value(name="x"), shape], attrs)
    assert zeros_copied(node) is same
