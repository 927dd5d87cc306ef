"""compare's random inputs for models that take token ids: valid ids, said in the report, and
one sentence asking for inputs when random floats cannot feed the model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from _onnx_helpers import init, model, vinfo
from onnx import TensorProto, helper
from torch import nn

from fc2conv.errors import Fc2ConvError
from fc2conv.onnx import to_conv
from fc2conv.pytorch import to_conv as torch_to_conv
from fc2conv.verify import compare
from fc2conv.verify.inputs import draw, resolve_specs, with_id_ranges
from fc2conv.verify.models import load


def _embedding_graph(vocab: int) -> onnx.ModelProto:
    """ids (int64) -> Cast -> Gather(table (vocab, 6)) -> MatMul; plus a float input."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "ids32"], ["e"]),
             helper.make_node("Add", ["e", "x"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"])]
    return model(nodes, [vinfo("ids", [2, 7], TensorProto.INT64), vinfo("x", [2, 7, 6])],
                 [vinfo("y", [2, 7, 4])], [init(rng, "table", vocab, 6), init(rng, "W", 6, 4)])


def test_onnx_ids_cover_the_whole_table_and_the_report_says_so() -> None:
    m = _embedding_graph(50)
    specs = with_id_ranges(resolve_specs(load(m, "A"), load(m, "B"), None), load(m, "A"),
                           load(m, "B"))
    ids = torch.cat([d[0].reshape(-1) for d in draw(specs, 20, torch.float32, 0)])
    assert int(ids.min()) >= 0 and int(ids.max()) < 50
    assert int(ids.max()) >= 40  # 280 ids drawn from [0, 50): the top of the table is used
    rep = compare(m, to_conv(m), samples=3, seed=0)
    assert rep.verdict in ("identical", "equivalent"), str(rep)
    assert "drew integer ids in [0, 50) for input 'ids'" in rep.inputs, rep.inputs


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.emb(ids)))


def test_torch_embedding_model_gets_ids_from_input_shape() -> None:
    torch.manual_seed(0)
    m = _Tagger().eval()
    conv = torch_to_conv(m, (torch.randint(0, 30, (2, 9)),))
    rep = compare(m, conv, input_shape=(2, 9), samples=3, seed=1)
    assert rep.verdict in ("identical", "equivalent"), str(rep)
    assert "drew integer ids in [0, 30) for input 'input'" in rep.inputs, rep.inputs
    bad = _Tagger().eval()
    bad.load_state_dict(m.state_dict())
    with torch.no_grad():
        bad.head.weight[2, 3] += 0.25
    assert compare(m, bad, input_shape=(2, 9), samples=3, seed=1,
                   layers=False).verdict == "different"


class _NeedsMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bool:
            raise TypeError(f"expected a bool mask, got {x.dtype}")
        return self.lin(x.float())


def test_model_random_floats_cannot_feed_asks_for_inputs() -> None:
    with pytest.raises(Fc2ConvError) as err:
        compare(_NeedsMask(), _NeedsMask(), input_shape=(2, 4), samples=2, seed=0)
    text = str(err.value)
    assert len(text.splitlines()) == 1
    assert "inputs= (API) or --inputs FILE.npz (CLI)" in text and "expected a bool" in text
