"""What a converted model pays in eager PyTorch that the original does not: a captured
attention mask that is True everywhere (:mod:`fc2conv.pytorch.masks`; dropped only when
proven for every size) and the Python frame of every aten op call in a torch.export graph
(:mod:`fc2conv.pytorch.direct_calls`). Behaviour only: the converted model against the float64
original at sizes other than the example's, masks kept where they are not provably all True,
and the direct calls' forward bit-identical to fx's own (timings: bench/converted_overhead.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_refs import assert_matches_reference

from fc2conv import to_conv
from fc2conv.pytorch.attention import channel_attention

HEADS = 2


def _mask(kind: str, b: int, s: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(B, 1, S, S)`` masks built from sizes only, as ``masking_utils`` builds them."""
    idx = torch.arange(s, device=device)
    if kind == "hf":  # transformers' bidirectional mask: q_idx >= 0 over arange(S) + 0
        return ((idx + 0)[None, None, :, None] >= 0).expand(b, -1, s, s)
    if kind == "ones":
        return torch.ones(b, 1, s, s, dtype=torch.bool, device=device)
    if kind == "and":  # two all-True factors
        return ((idx + 0)[None, None, :, None] >= 0) & ((idx + 1)[None, None, None, :] > 0)
    if kind == "causal":  # all True at S = 1 only: must stay
        return (idx[:, None] >= idx[None, :])[None, None].expand(b, -1, s, s)
    if kind == "from_one":  # key 0 masked out: arange(S) - 1 >= 0 is not provable
        return ((idx - 1)[None, None, None, :] >= 0).expand(b, -1, s, s)
    if kind == "trunc":  # int(0 + 0.5) = 0 < 0.5: key 0 masked out by the cast's truncation
        return ((idx + 0.5).long()[None, None, None, :] >= 0.5).expand(b, -1, s, s)
    raise AssertionError(kind)


class MaskedAttention(nn.Module):
    """Self-attention whose SDPA mask the model builds from the input's sizes."""

    def __init__(self, kind: str, dim: int = 8) -> None:
        super().__init__()
        self.kind = kind
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = (f(x).view(b, s, HEADS, c // HEADS).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(self.kind, b, s, x.device))
        return self.o(att.transpose(1, 2).reshape(b, s, c))


_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


def _masks(gm: torch.fx.GraphModule) -> list[object]:
    """The mask argument of every attention call left in ``gm``."""
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is channel_attention:
            found.append(n.kwargs.get("mask", n.args[4] if len(n.args) > 4 else None))
        elif n.op == "call_function" and n.target in _SDPA:
            found.append(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None))
    return found


DROPPED = {"hf": True, "ones": True, "and": True, "causal": False, "from_one": False,
           "trunc": False}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("kind", sorted(DROPPED))
def test_all_true_masks_are_dropped_and_others_kept(kind: str, capture: str) -> None:
    torch.manual_seed(len(kind))
    model = MaskedAttention(kind).eval()
    x = torch.randn(2, 6, 8)
    source: object = model
    if capture == "export":
        dims = {0: torch.export.Dim("batch", min=2, max=8),
                1: torch.export.Dim("seq", min=2, max=32)}
        source = torch.export.export(model, (x,), dynamic_shapes={"x": dims})
    conv = to_conv(source, x, verify=False)
    masks = _masks(conv)
    assert len(masks) == 1, conv.code
    assert (masks[0] is None) == DROPPED[kind], conv.code
    if DROPPED[kind]:  # nothing of the mask is computed any more
        assert not any(n.op in ("call_function", "call_method") and "arange" in str(n.target)
                       for n in conv.graph.nodes), conv.code
    for seed, s in ((1, 9), (2, 3)):  # sizes other than the example's
        y = torch.randn(3, s, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            got = conv(y)
        assert_matches_reference(got, model, y)


@contextmanager
def _overload_calls() -> Iterator[list[int]]:
    """Counts calls of ``OpOverload.__call__`` (fx's way of calling an aten op) meanwhile."""
    count = [0]
    original = torch._ops.OpOverload.__call__

    def counting(self, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        count[0] += 1
        return original(self, *args, **kwargs)

    torch._ops.OpOverload.__call__ = counting  # type: ignore[method-assign]
    try:
        yield count
    finally:
        torch._ops.OpOverload.__call__ = original  # type: ignore[method-assign]


class Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x)))) * x.shape[1] ** -0.5


@torch.no_grad()
def test_exported_graph_calls_aten_directly_with_the_same_result() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 8)
    seq = torch.export.Dim("seq", min=2, max=32)
    conv = to_conv(torch.export.export(model, (x,), dynamic_shapes={"x": {1: seq}}), x,
                   verify=False)
    assert "torch.ops.aten." in conv.code  # the graph and its code are fx's own
    standard = copy.deepcopy(conv)  # a deepcopy recompiles: fx's forward
    y = torch.randn(3, 7, 8)
    with _overload_calls() as direct:
        got = conv(y)
    with _overload_calls() as through:
        want = standard(y)
    assert direct[0] == 0 < through[0]
    assert torch.equal(got, want)  # the same ops in the same order: bit for bit
    assert_matches_reference(got, model, y)
    conv.recompile()  # what a later pass (or pickling) does: still direct after it
    with _overload_calls() as after:
        again = conv(y)
    assert after[0] == 0 and torch.equal(again, got)


@torch.no_grad()
def test_direct_calls_step_aside_while_a_graph_is_captured() -> None:
    """dynamo cannot trace the C++ entry points: under torch.compile(fullgraph=True) and
    torch.export (strict) the standard forward runs (it failed with "Dynamo does not know how
    to trace the builtin" otherwise), and the captured graphs compute the model."""
    torch.manual_seed(1)
    model = Block().eval()
    x = torch.randn(2, 5, 8)
    conv = to_conv(torch.export.export(model, (x,)), x, verify=False)
    compiled = torch.compile(conv, backend="eager", fullgraph=True)
    assert_matches_reference(compiled(x), model, x)  # captured: 1x1 convs, not F.linear
    program = torch.export.export(conv, (x,), strict=True)
    assert any(n.target is torch.ops.aten.conv2d.default for n in program.graph.nodes)
    assert_matches_reference(program.module()(x), model, x)
