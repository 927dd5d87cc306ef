"""ONNX round trips are clean: ``to_linear(to_conv(m))`` has no more Transpose, Reshape or
Flatten nodes than ``m`` (the Gemm's ``Reshape -> Conv -> Flatten`` and ``to_linear``'s
``Transpose -> MatMul -> Transpose`` collapse back to ``MatMul`` on ``(N, C)``), and is exact
against the float64 reference of ``m``; exporters' files in tests/zoo/foreign too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_matches_reference, init, model, op_counts, vinfo
from onnx import helper

from fc2conv.onnx import to_conv, to_linear

LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")
FOREIGN = sorted((Path(__file__).parent / "zoo" / "foreign").glob("*.onnx"))


def _layout_ops(m: onnx.ModelProto) -> dict[str, int]:
    counts = op_counts(m)
    return {k: counts[k] for k in LAYOUT_OPS}


def _gemm_mlp(rng: np.random.Generator, widths: tuple[int, ...], trans_b: bool) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        shape = (b, a) if trans_b else (a, b)
        inits += [init(rng, f"w{i}", *shape), init(rng, f"b{i}", b)]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"],
                                      transB=int(trans_b), alpha=0.5))
        x = f"g{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return model(nodes, [vinfo("x", ["n", widths[0]])], [vinfo("y", ["n", widths[-1]])], inits)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("widths", [(5, 3), (6, 9, 4), (4, 7, 7, 3)])
def test_gemm_round_trip_has_no_extra_layout_ops(widths: tuple[int, ...], trans_b: bool) -> None:
    rng = np.random.default_rng(len(widths) * 10 + trans_b)
    m = _gemm_mlp(rng, widths, trans_b)
    conv = to_conv(m)
    assert op_counts(conv)["Conv"] == len(widths) - 1  # it did go through convs
    back = to_linear(conv)
    assert _layout_ops(back) == _layout_ops(m), _layout_ops(back)
    feeds = {"x": rng.standard_normal((3, widths[0])).astype(np.float32)}
    assert_matches_reference(m, back, feeds, depth=max(widths) * len(widths))


@pytest.mark.parametrize("layout", ["channels_first", "ane"])
@pytest.mark.parametrize("path", FOREIGN, ids=[p.stem for p in FOREIGN])
def test_foreign_round_trip_has_no_extra_layout_ops(path: Path, layout: str) -> None:
    m = onnx.load(path)
    back = to_linear(to_conv(m, layout=layout))
    before, after = _layout_ops(m), _layout_ops(back)
    assert all(after[k] <= before[k] for k in LAYOUT_OPS), (before, after)
    data = path.with_suffix(".npz")
    if data.exists():
        with np.load(data, allow_pickle=False) as npz:
            names = [i.name for i in m.graph.input
                     if i.name not in {t.name for t in m.graph.initializer}]
            feeds = {n: npz[n] for n in names if n in npz.files}
        if len(feeds) == len(names):
            assert_matches_reference(m, back, feeds, depth=4096)
