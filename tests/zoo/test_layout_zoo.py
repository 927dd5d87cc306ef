"""The ANE layout end to end on the zoo's transformers: ``to_conv`` keeps ``(B, C, 1, S)``
across residual adds, LayerNorm/RMSNorm and attention, so the converted graph changes layout
only where a model input enters and an output leaves, and stays equivalent (``compare``)."""

from __future__ import annotations

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


def _attention_count(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is channel_attention for n in gm.graph.nodes)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_layout_changes_and_equivalence(name: str) -> None:
    zoo = zoo_models.ZOO[name]
    model = zoo.build()
    conv = to_conv(model, tuple(zoo.draw(0).values()))
    changes = layout_changes(conv)
    assert len(changes) <= BOUNDS[name], "\n".join(map(str, changes))
    # every self-attention runs per head along C (Whisper and T5 too: they call SDPA)
    assert _attention_count(conv) == 2
    report = compare(model, conv, tuple(zoo.draw(1).values()), layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)


def test_llama_names_what_forces_the_moves() -> None:
    """Rotary embeddings and grouped K/V heads sit between the head split and SDPA; that
    attention stays in (B, H, S, D), so each layer moves Q, K, V out and the merge back in --
    still equivalent, and fewer moves than before the RMSNorm/residual rules."""
    zoo = zoo_models.ZOO["llama"]
    model = zoo.build()
    conv = to_conv(model, tuple(zoo.draw(0).values()))
    moves = [c for c in layout_changes(conv) if c.direction in ("in", "out")]
    # 3 out + 1 in per layer (2 layers), 1 in, 1 out, 1 slack; +1 since HF models are captured
    # with dynamic axes (torch.export Dim.AUTO): 12 measured, the extra move not yet traced.
    assert len(moves) <= 12
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


@pytest.mark.parametrize("name", ["distilbert", "vit"])  # bert, whisper_encoder: the same
def test_round_trip_through_channel_attention(name: str) -> None:
    """``to_linear(to_conv(m))``: each ``channel_attention`` is SDPA on (B, H, S, D) again, and
    the graph has no more transposes/permutes and reshapes than ``m``."""
    zoo = zoo_models.ZOO[name]
    model = zoo.build()
    inputs = tuple(zoo.draw(0).values())
    conv = to_conv(model, inputs)
    assert _attention_count(conv) == 2
    back = to_linear(conv, inputs)
    assert _attention_count(back) == 0
    assert sum(n.target is torch.nn.functional.scaled_dot_product_attention
               for n in back.graph.nodes) == 2
    (moves, reshapes), (moves0, reshapes0) = _layout_ops(back, inputs), _layout_ops(model, inputs)
    assert moves <= moves0 and reshapes <= reshapes0, ((moves, reshapes), (moves0, reshapes0))
    report = compare(model, back, tuple(zoo.draw(1).values()), layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)
