"""``fc2conv.onnx.to_conv(layout="ane")`` on the zoo's transformers exported with
``torch.onnx.export``: the Transposes left in the converted graph (the count and the places the
report names), and the converted graph against the float64 reference of the original; the way
back, ``to_linear`` of that graph, has no more Transpose, Reshape or Flatten nodes than the
export and is equivalent to it."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import zoo_models
from _onnx_helpers import F32_EPS, run_ort

import fc2conv
from fc2conv.onnx import convert

# family -> most Transposes left, and why above one in + one out
BOUNDS = {
    "bert": 2,
    "distilbert": 2,
    "roberta": 2,
    "vit": 1,  # the patch conv's (B, C, N) is taken as it is: no move in at all
    "whisper_encoder": 1,  # as ViT: the conv front end's own permute is undone
    "t5_encoder": 3,  # + T5's relative position bias permute (a bias table, not an activation)
    "llama": 2,  # rotary cos/sin applied along C, grouped K/V expanded in the conv layout
}


@functools.cache
def _export(name: str) -> tuple[onnx.ModelProto, list[str]]:
    return zoo_models.export_onnx(name, "legacy")


def _check_equivalent(m: onnx.ModelProto, conv: onnx.ModelProto, name: str,
                      names: list[str]) -> None:
    """ORT's output of the converted graph against the float64 PyTorch model (an independent
    reference: onnx's reference evaluator cannot run these exports), within the float32
    rounding bound of the deepest dot products; the original graph meets the same bound."""
    zoo = zoo_models.ZOO[name]
    model = zoo_models.Logits(zoo.build(), names).double()
    for seed in (1, 2):
        draw = zoo.draw(seed)
        with torch.no_grad():
            ref = model(*(v.double() if v.is_floating_point() else v
                          for v in draw.values())).numpy()
        feeds = {k: v.numpy() for k, v in draw.items()}
        depth = 4 * 37 * 2  # hidden width 32, MLP 37, two layers
        tol = 8 * F32_EPS * depth * max(1.0, float(np.abs(ref).max()))
        for graph in (m, conv):
            out = run_ort(graph, feeds)[0].astype(np.float64)
            assert out.shape == ref.shape
            assert float(np.abs(out - ref).max()) <= tol


_OLD_EXPORTER = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)
_PARAMS = [pytest.param(name, marks=pytest.mark.xfail(
    _OLD_EXPORTER, strict=False,
    reason="torch < 2.13's exporter computes Llama's rotary tables at run time (a Cast "
           "read by an Unsqueeze the pass does not carry), which leaves 4 more moves "
           "(measured with torch 2.11: 6 Transposes)")) if name == "llama" else name
    for name in sorted(BOUNDS)]


@pytest.mark.parametrize("name", _PARAMS)
def test_transposes_left_and_equivalence(name: str) -> None:
    m, names = _export(name)
    conv, report = convert(m, "conv", layout="ane")
    transposes = sum(n.op_type == "Transpose" for n in conv.graph.node)
    assert transposes == report.transposes_after == len(report.layout_changes)
    assert transposes <= BOUNDS[name] < report.transposes_before, "\n".join(report.layout_changes)
    assert not any(n.op_type == "MatMul" and n.input[1] in {t.name for t in conv.graph.initializer}
                   for n in conv.graph.node)  # every projection is a Conv
    assert any(len(t.dims) == 4 and t.dims[2:] == [1, 1] for t in conv.graph.initializer)
    _check_equivalent(m, conv, name, names)


LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_ane_round_trip_is_clean(name: str) -> None:
    """``to_linear(to_conv(m, layout="ane"))``: the 1x1 Convs on (B, C, 1, S) are MatMuls on
    (B, S, C) again, the attention Einsums MatMuls, and no layout op kind outnumbers the
    export's (before: BERT 8 -> 19 Transposes, Llama 10 -> 30)."""
    m, names = _export(name)
    conv, _ = convert(m, "conv", layout="ane", verify=False)
    back, report = convert(conv, "linear", verify=False)
    before, after = Counter(n.op_type for n in m.graph.node), \
        Counter(n.op_type for n in back.graph.node)
    assert all(after[k] <= before[k] for k in LAYOUT_OPS), (before, after, report.layout_changes)
    assert after["Einsum"] == 0 and after["Conv"] == before["Conv"]  # the model's own convs
    assert after["MatMul"] >= before["MatMul"]
    _check_equivalent(m, back, name, names)
    if name == "bert":  # compare's own verdict, on one family (it takes seconds)
        assert fc2conv.compare(m, back).verdict in ("identical", "equivalent")
