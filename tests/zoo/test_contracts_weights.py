"""Zoo tier, issue 10 (part A): converted models keep their weights' contract.

GPT-2's ``Conv1D`` layers convert; tied weights stay tied (counted as unique storages and
parameters); ``to_linear(to_conv(m))`` loads ``m``'s state dict with ``strict=True`` and then
computes what ``m`` computes with those weights (checked against the original model with those
weights, run in float64); unchanged modules keep their names and types.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo_models import ZOO, logits

from fc2conv import to_conv, to_linear

EPS = torch.finfo(torch.float32).eps


def _double(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


@torch.no_grad()
def _assert_computes_like(converted: nn.Module, original: nn.Module, inputs) -> None:
    """``converted`` on ``inputs`` is within float32 rounding of ``original`` run in float64
    (the allowance scales with the original's own float32 error and the output's size)."""
    ref = logits(copy.deepcopy(original).double()(**_double(inputs))).double()
    own = logits(original(**inputs)).double()
    got = logits(converted(**inputs)).double()
    assert got.shape == ref.shape
    allowed = max(8 * (own - ref).abs().max().item(), 64 * EPS * ref.abs().max().item())
    assert (got - ref).abs().max().item() <= allowed


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict(keep_vars=True).values()}


@torch.no_grad()
def _scaled(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with fresh weights of unit gain (``W ~ N(0, 1/fan_in)``): small random configs
    initialized by their libraries can shrink the output to ~1e-40 (MobileNet), where a
    comparison would check nothing."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_gpt2_every_dense_layer_converts_and_ties_stay() -> None:
    """All 9 dense layers of a 2-block GPT-2 (8 Conv1D + the tied lm_head) become convs (before:
    1 of 9); the head keeps wte's weight (before: a copy, 1.32x the parameters at this size)."""
    z = ZOO["gpt2"]
    model = z.build(0)
    conv = to_conv(model, z.draw(1))
    kinds = [type(m).__name__ for m in conv.modules()]
    assert sum(isinstance(m, nn.Conv2d) for m in conv.modules()) == 9, kinds
    assert not any(isinstance(m, nn.Linear) for m in conv.modules())
    assert not [n for n in conv.graph.nodes if "addmm" in str(n.target)]
    assert len(_storages(conv)) == len(_storages(model))
    assert _numel(conv) == _numel(model)
    assert conv.get_submodule("lm_head").weight is conv.get_submodule("transformer.wte").weight
    _assert_computes_like(conv, model, z.draw(2, batch=3, length=11))
    # the conv model loads GPT-2's own state dict: (in, out) Conv1D weights find their place
    other = z.build(1)
    conv.load_state_dict(other.state_dict(), strict=True)
    _assert_computes_like(conv, other, z.draw(3, batch=2, length=6))


ROUND_TRIP = ["gpt2", "t5", "convnext", "mobilenet_v1", "mobilenet_v2", "monai_densenet3d"]
TIED = {"gpt2": ("transformer.wte", "lm_head"),
        "t5": ("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head")}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_loads_the_original_state_dict(name: str) -> None:
    """``to_linear(to_conv(m))`` loads ``m.state_dict()`` strictly (before: gpt2/t5 lost tied
    names, convnext renamed its LayerNorms, the others' own 1x1 convs came back as Linears that
    refused (O, C, 1, 1) weights) and then computes what ``m`` does with those weights. Tied
    weights are one parameter in the conv model and after the round trip."""
    z = ZOO[name]
    size = None
    model = z.build(0)
    conv = to_conv(model, z.draw(1, size=size), verify=False)
    back = to_linear(conv, z.draw(1, size=size), verify=False)
    for converted in (conv, back):
        assert len(_storages(converted)) == len(_storages(model))
        assert _numel(converted) == _numel(model)
        tied = [converted.get_submodule(n).weight for n in TIED.get(name, ())]
        assert all(w is tied[0] for w in tied)
    other = _scaled(z.build(1), seed=7)
    back.load_state_dict(other.state_dict(), strict=True)
    _assert_computes_like(back, other, z.draw(4, size=size))


def test_bert_unchanged_modules_keep_names_and_types() -> None:
    """On the torch.export path the embeddings and LayerNorms are modules again, at their
    names, and every parameter keeps its name and size (converted LayerNorms too)."""
    z = ZOO["bert"]
    model = z.build(0)
    conv = to_conv(model, z.draw(1), verify=False)
    mods = dict(conv.named_modules())
    assert isinstance(mods["embeddings.word_embeddings"], nn.Embedding)
    assert isinstance(mods["embeddings.LayerNorm"], nn.LayerNorm)
    assert isinstance(mods["encoder.layer.0.output.dense"], nn.Conv2d)
    params = dict(conv.named_parameters())
    for name, p in model.named_parameters():
        assert name in params and params[name].numel() == p.numel(), name
    back = to_linear(conv, z.draw(1), verify=False)
    assert isinstance(back.get_submodule("encoder.layer.0.output.LayerNorm"), nn.LayerNorm)
    assert isinstance(back.get_submodule("encoder.layer.0.output.dense"), nn.Linear)
    _assert_computes_like(back, model, z.draw(6, batch=3, length=9))
