"""Issue 9 on the zoo: a bug in an embedding table is localized at the lookup.

GPT-2's ``lm_head`` weight is the token embedding ``transformer.wte`` (tied). A bug planted in
``lm_head`` changes the embedding too, and on a draw that looks up a changed row the first real
divergence is the lookup; compare used to name ``h.0.ln_1``, the first paired layer after it
(the sweep's 26 "mislocalized" GPT-2 draws). BERT's word embeddings are not tied; a changed row
must be named at ``embeddings.word_embeddings`` on the PyTorch and on the ONNX path. The
lookup row's ``max |A-B|`` is checked against the change computed here in float64.
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import onnx
import pytest
import torch
import zoo_models

import fc2conv
import fc2conv.onnx

pytestmark = pytest.mark.zoo


def _ids(seed: int, rows: list[int]) -> torch.Tensor:
    """Fresh random token ids (batch 2, length 8) that look up each of ``rows`` once."""
    ids = zoo_models.ZOO["bert"].draw(seed, batch=2, length=8)["input_ids"]
    ids[torch.isin(ids, torch.tensor(rows))] = max(rows) + 1
    for k, r in enumerate(rows):
        ids[k % 2, 3 + k] = r
    return ids


def _row(report: fc2conv.Report, name: str) -> float:
    rows = [s for s in report.layers if s.a_name == name]
    assert rows, [s.a_name for s in report.layers]
    return rows[0].max_abs_error


def test_gpt2_tied_lm_head_bug_is_named_at_the_embedding() -> None:
    a = zoo_models.ZOO["gpt2"].build(0).eval()
    assert a.lm_head.weight is a.transformer.wte.weight
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.lm_head.weight.copy_(b.lm_head.weight[[1, 0, *range(2, b.lm_head.weight.shape[0])]])
    w = a.transformer.wte.weight.detach().double()
    change = float((w[0] - w[1]).abs().max())  # the lookup of row 0 or 1 moves by this much
    x = (_ids(5, [0, 1]),)
    rep = fc2conv.compare(a, fc2conv.to_conv(b, x), inputs=x, layers=True)
    assert rep.verdict == "different", str(rep)
    assert rep.first_divergence == "transformer.wte", str(rep)
    assert rep.weight_shared_with == ["lm_head"], str(rep)
    assert "Its weight is shared with 'lm_head' (the same Parameter)" in (rep.diagnosis or "")
    assert _row(rep, "transformer.wte") == change


class _Hidden(torch.nn.Module):
    """``m(input_ids=ids)``'s last hidden state (what is exported)."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return zoo_models.logits(self.m(input_ids=ids))


def _export(m: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Hidden(m).eval(), x, f"{tmp}/m.onnx", dynamo=False,
                          input_names=["input_ids"], opset_version=18)
        return onnx.load(f"{tmp}/m.onnx")


def test_bert_untied_embedding_bug_is_named_at_the_lookup_on_both_paths() -> None:
    a = zoo_models.ZOO["bert"].build(1).eval()
    b = copy.deepcopy(a)
    row = 7
    table = b.embeddings.word_embeddings.weight
    old = table.detach()[row].double().clone()
    with torch.no_grad():
        table[row] *= 1.01
    change = float((table.detach()[row].double() - old).abs().max())
    x = (_ids(6, [row]),)
    name = "embeddings.word_embeddings"
    rep = fc2conv.compare(a, fc2conv.to_conv(b, x), inputs=x, layers=True)
    assert rep.verdict == "different", str(rep)
    assert rep.first_divergence == name and rep.weight_shared_with == [], str(rep)
    assert _row(rep, name) == change
    rep = fc2conv.compare(_export(a, x), fc2conv.onnx.to_conv(_export(b, x)), inputs=x,
                          layers=True)
    assert rep.verdict == "different", str(rep)
    # the exporter scopes the lookup under the wrapper: 'm.embeddings.word_embeddings'
    assert rep.first_divergence == f"m.{name}" and rep.weight_shared_with == [], str(rep)
    assert _row(rep, f"m.{name}") == change
