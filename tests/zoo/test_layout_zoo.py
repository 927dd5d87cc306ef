"""The ANE layout end to end on the zoo's transformers: ``to_conv`` keeps ``(B, C, 1, S)``
across residual adds, LayerNorm/RMSNorm and attention, so the converted graph changes layout
only where a model input enters and an output leaves, and stays equivalent (``compare``)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import zoo_models

from fc2conv import compare, to_conv, to_linear
from fc2conv.pytorch.attention import channel_attention
from fc2conv.pytorch.layout import layout_changes

# family -> (most layout changes allowed, why above inputs+outputs where it is)
BOUNDS = {
    "bert": 4,  # in once, out once, plus the pooler's select of token 0 in and its tanh out
    "distilbert": 2,
    "roberta": 4,  # as BERT
    "vit": 5,  # + the patch conv's own flatten/transpose before the class token is cat'ed
    "whisper_encoder": 3,  # + the conv front end's own permute to (B, T, C)
    "t5_encoder": 4,  # + T5's relative position bias permute (not an activation of the stream)
}


@functools.cache
def _converted(name: str) -> tuple[torch.nn.Module, tuple, torch.fx.GraphModule]:
    """(model, inputs of draw 0, ``to_conv`` of it), once per family for this module's tests
    (unverified here: each test runs its own ``compare`` on a fresh draw)."""
    zoo = zoo_models.ZOO[name]
    model = zoo.build()
    inputs = tuple(zoo.draw(0).values())
    return model, inputs, to_conv(model, inputs, verify=False)


def _attention_count(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is channel_attention for n in gm.graph.nodes)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_layout_changes_and_equivalence(name: str) -> None:
    zoo = zoo_models.ZOO[name]
    model, _, conv = _converted(name)
    changes = layout_changes(conv)
    assert len(changes) <= BOUNDS[name], "\n".join(map(str, changes))
    # every self-attention runs per head along C (Whisper and T5 too: they call SDPA)
    assert _attention_count(conv) == 2
    report = compare(model, conv, tuple(zoo.draw(1).values()), layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])  # one code, three configs
def test_rotary_gqa_models_move_once_each_way(name: str) -> None:
    """Rotary embeddings along C and grouped K/V as a grouped einsum: the converted graph
    moves the embedding in once and the logits out once; the rotary cos/sin tables move once
    for all layers (position x head-dim tables, not activations); no permute is left."""
    zoo = zoo_models.ZOO[name]
    model, _, conv = _converted(name)
    kinds = sorted(c.direction for c in layout_changes(conv))
    assert kinds == ["in", "out", "table", "table"], "\n".join(map(str, layout_changes(conv)))
    assert _attention_count(conv) == 2
    report = compare(model, conv, tuple(zoo.draw(1).values()), layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)


_MOVES = ("permute", "transpose", "movedim")
_RESHAPES = ("view", "reshape", "_unsafe_view", "unflatten", "flatten")


def _layout_ops(model: torch.nn.Module, inputs: tuple) -> tuple[int, int]:
    """(transposes/permutes, reshapes) in the graph ``torch.export`` gives for ``model``."""
    moves = reshapes = 0
    for node in torch.export.export(model, inputs).graph.nodes:
        name = getattr(node.target, "_opname", "") if node.op == "call_function" else ""
        moves += name in _MOVES
        reshapes += name in _RESHAPES
    return moves, reshapes


@pytest.mark.parametrize("name", ["bert", "distilbert", "vit", "whisper_encoder", "t5_encoder",
                                  "t5", "llama"])
def test_round_trip_through_channel_attention(name: str) -> None:
    """``to_linear(to_conv(m))``: each ``channel_attention`` is SDPA on (B, H, S, D) again
    (rotary Q/K and grouped K/V as Llama writes them), RMSNorm's channel mean and weight are
    over the last axis again, and the graph has no more transposes/permutes and reshapes than
    ``m``."""
    zoo = zoo_models.ZOO[name]
    model, inputs, conv = _converted(name)
    attentions = _attention_count(conv)
    assert attentions == (6 if name == "t5" else 2)  # T5: encoder self, decoder self + cross
    back = to_linear(conv, inputs, verify=False)
    assert _attention_count(back) == 0
    assert sum(n.target is torch.nn.functional.scaled_dot_product_attention
               for n in back.graph.nodes) == attentions
    (moves, reshapes), (moves0, reshapes0) = _layout_ops(back, inputs), _layout_ops(model, inputs)
    assert moves <= moves0 and reshapes <= reshapes0, ((moves, reshapes), (moves0, reshapes0))
    report = compare(model, back, tuple(zoo.draw(1).values()), layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)


@pytest.mark.parametrize("name", ["vit"])
def test_no_mask_that_eager_skips(name: str) -> None:
    """ViT calls SDPA without a mask in eager (transformers skips its all-True bidirectional
    mask), but torch.export captures ``arange(S) + 0 >= 0`` expanded to (B, 1, S, S), which
    SDPA then turned into an additive mask on every call (1.17x the original's CPU time at the
    zoo size). The converted model computes no mask, and still matches the float64 original."""
    model, _, conv = _converted(name)
    masks = [n.kwargs.get("mask") for n in conv.graph.nodes if n.target is channel_attention]
    assert masks and all(m is None for m in masks), conv.code
    assert not any("arange" in str(n.target) for n in conv.graph.nodes), conv.code
    draw = zoo_models.ZOO[name].draw(4, batch=3)
    with torch.no_grad():
        got = zoo_models.logits(conv(*draw.values())).double()
        ref = zoo_models.logits(copy.deepcopy(model).double()(
            *(v.double() for v in draw.values())))
        own = (zoo_models.logits(model(*draw.values())).double() - ref).abs().max().item()
    assert (got - ref).abs().max().item() <= 8 * max(own, 64 * 2.0**-23 * ref.abs().max().item())
