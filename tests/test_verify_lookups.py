"""Issue 9: embedding lookups are layers, and a tied weight is named as shared.

A changed row of an embedding table first diverges at the lookup ``y[i] = T[ids[i]]``; before,
lookups had no row in the layer table (torch: a converted GraphModule reads the table with
``aten.embedding`` outside any module; ONNX: ``Gather`` was taken for a layout op), so compare
named the first layer after it. When the table is tied to another layer (GPT-2's ``lm_head``),
the report names the other reader. Each test checks the lookup row's ``max |A-B|`` against the
change computed here in float64, independently of compare.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
import torch.nn.functional as F
from _onnx_helpers import model, vinfo
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fc2conv
from fc2conv.verify.capture import run_torch

VOCAB, DIM, ROW = 20, 8, 3


def _ids(seed: int, with_row: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    ids[ids == ROW] = ROW + 1
    if with_row:
        ids[1, 2] = ROW
    return ids


def _row(report: fc2conv.Report, name: str) -> float:
    rows = [s for s in report.layers if s.a_name == name]
    assert rows, [s.a_name for s in report.layers]
    return rows[0].max_abs_error


# -- torch -------------------------------------------------------------------------------------

class Tied(nn.Module):
    """Token embedding, one Linear, and a head tied to the embedding (GPT-2's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.wte(ids))))


class Functional(nn.Module):
    """A table read with ``F.embedding`` in the user's own forward (no nn.Embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, DIM))
        self.mix = nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(F.embedding(ids, self.table))


def _planted(m: nn.Module, table: torch.Tensor) -> tuple[nn.Module, float]:
    """A copy of ``m`` with row ROW of ``table`` scaled by 1.01, and the largest change of an
    entry of that row (float64, from the float32 values)."""
    b = copy.deepcopy(m)
    t = dict(b.named_parameters())[next(n for n, p in m.named_parameters() if p is table)]
    old = t.data[ROW].double().clone()
    with torch.no_grad():
        t[ROW] *= 1.01
    return b, float((t.data[ROW].double() - old).abs().max())


def test_tied_table_bug_is_named_at_the_lookup_and_shared() -> None:
    torch.manual_seed(0)
    a = Tied().eval()
    b, change = _planted(a, a.wte.weight)  # one bug: the head's weight is the same Parameter
    x = (_ids(0, with_row=True),)
    for other in (b, fc2conv.to_conv(b, x)):  # hooked nn.Embedding; GraphModule aten.embedding
        rep = fc2conv.compare(a, other, inputs=x, layers=True)
        assert rep.verdict == "different", str(rep)
        assert rep.first_divergence == "wte", str(rep)
        assert rep.weight_shared_with == ["head"], str(rep)
        assert "Its weight is shared with 'head' (the same Parameter)" in str(rep)
        doc = json.loads(rep.to_json())
        assert doc["weight_shared_with"] == ["head"] and "shared with 'head'" in doc["diagnosis"]
        assert _row(rep, "wte") == change  # the lookup is exact: |A - B| is the row's change
    # a draw that never looks the changed row up diverges first at the head, which shares it
    rep = fc2conv.compare(a, b, inputs=(_ids(1, with_row=False),), layers=True)
    assert rep.verdict == "different" and rep.first_divergence == "head", str(rep)
    assert rep.weight_shared_with == ["wte"], str(rep)
    assert _row(rep, "wte") == 0.0


def test_functional_embedding_is_a_layer() -> None:
    torch.manual_seed(1)
    a = Functional().eval()
    b, change = _planted(a, a.table)
    x = (_ids(2, with_row=True),)
    layers = run_torch(a, x, capture=True, graph=False).layers
    assert [la.name for la in layers] == ["table", "mix"]
    assert torch.equal(layers[0].output, a.table.detach()[x[0]])
    rep = fc2conv.compare(a, b, inputs=x, layers=True)
    assert rep.verdict == "different" and rep.first_divergence == "table", str(rep)
    assert rep.weight_shared_with == [] and "weight is shared" not in (rep.diagnosis or "")
    assert _row(rep, "table") == change


def test_clean_conversion_keeps_lookup_rows_identical() -> None:
    torch.manual_seed(2)
    a = Tied().eval()
    x = (_ids(3, with_row=True),)
    rep = fc2conv.compare(a, fc2conv.to_conv(a, x), inputs=x, layers=True)
    assert rep.verdict in ("identical", "equivalent"), str(rep)
    assert _row(rep, "wte") == 0.0 and rep.first_divergence is None


# -- ONNX --------------------------------------------------------------------------------------

def _graph(table: np.ndarray, w: np.ndarray, tied: bool):
    """ids -> Gather(table) [emb] -> MatMul W [mix] -> Tanh -> MatMul table^T [head] when
    ``tied`` (the head reads the table through a Transpose), else the Tanh's output."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="/emb/Gather"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="/mix/MatMul"),
             helper.make_node("Tanh", ["h"], ["t"], name="/act/Tanh")]
    out = "t"
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["tT"], name="/head/Transpose",
                                   perm=[1, 0]),
                  helper.make_node("MatMul", ["t", "tT"], ["y"], name="/head/MatMul")]
        out = "y"
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "W")]
    return model(nodes, [vinfo("ids", [2, 6], TensorProto.INT64)],
                 [vinfo(out, [2, 6, VOCAB if tied else DIM])], inits)


def test_onnx_gather_over_an_initializer_is_a_layer() -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    w = rng.standard_normal((DIM, DIM)).astype(np.float32)
    bad = table.copy()
    bad[ROW] *= np.float32(1.01)
    change = float(np.abs(bad[ROW].astype(np.float64) - table[ROW].astype(np.float64)).max())
    x = (_ids(4, with_row=True),)
    for tied in (False, True):
        a, b = _graph(table, w, tied), _graph(bad, w, tied)
        rep = fc2conv.compare(a, fc2conv.onnx.to_conv(b), inputs=x, layers=True)
        assert rep.verdict == "different" and rep.first_divergence == "emb", str(rep)
        assert _row(rep, "emb") == change
        assert rep.weight_shared_with == (["head"] if tied else []), str(rep)
        if tied:
            assert "Its weight is shared with 'head' (the same initializer)" in str(rep)
    # the clean conversion: the lookup row is paired and identical
    a = _graph(table, w, True)
    rep = fc2conv.compare(a, fc2conv.onnx.to_conv(a), inputs=x, layers=True)
    assert rep.verdict in ("identical", "equivalent"), str(rep)
    assert _row(rep, "emb") == 0.0
