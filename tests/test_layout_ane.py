"""The ANE layout pass on small hand-written models: residual adds, LayerNorm and RMSNorm
over channels, attention per head along C; each checked against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fc2conv import compare, to_conv
from fc2conv.core.positionwise import Channel, kind_of, onnx_types
from fc2conv.pytorch.attention import channel_attention
from fc2conv.pytorch.layout import layout_changes

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Loops over heads in float64 on the (B, S, C) views: plain matmuls, no einsum."""
    q, k, v = (t.double().squeeze(2).transpose(1, 2) for t in (q, k, v))  # (B, S, C)
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)  # (B, Sq, Sk)
        if causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).tril().logical_not(),
                              -math.inf)
        if mask is not None:
            m = mask[:, h if mask.shape[1] > 1 else 0]
            s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.double()
        outs.append(torch.softmax(s, -1) @ v[..., sl])
    return torch.cat(outs, -1).transpose(1, 2).unsqueeze(2)  # (B, C, 1, Sq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "causal"])
@pytest.mark.parametrize("heads", [1, 3])
def test_channel_attention_matches_per_head_reference(dtype: torch.dtype, mask_kind: str | None,
                                                      heads: int) -> None:
    g = torch.Generator().manual_seed(heads * 7 + len(mask_kind or ""))
    b, c, sq, sk = 2, 6 * heads, 5, 5
    q, k, v = (torch.randn(b, c, 1, n, generator=g, dtype=dtype) for n in (sq, sk, sk))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        mask[..., 0] = True  # every query sees a key
    elif mask_kind == "additive":
        mask = torch.randn(b, heads, sq, sk, generator=g, dtype=dtype)
    got = channel_attention(q, k, v, heads, mask=mask, is_causal=mask_kind == "causal")
    want = _reference_attention(q, k, v, heads, mask, mask_kind == "causal")
    assert got.shape == (b, c, 1, sq) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


class PostLN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), \
            nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(F.gelu(self.up(x))))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class PreNormAttention(nn.Module):
    """x + o(SDPA(q, k, v)) with pre-RMSNorm, heads split by view/transpose (call_method)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.norm = heads, RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, s, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.o(a.transpose(1, 2).reshape(b, s, c))


def _moves(gm: torch.fx.GraphModule) -> tuple[int, int]:
    changes = layout_changes(gm)
    return (sum(c.direction == "in" for c in changes), sum(c.direction != "in" for c in changes))


def test_post_ln_stack_moves_once_each_way() -> None:
    """Three post-LN MLP blocks: one move in, one out (before: 3 + 3), LayerNorms over C."""
    torch.manual_seed(0)
    model = nn.Sequential(*(PostLN(16) for _ in range(3))).eval()
    x = torch.randn(2, 7, 16)
    conv = to_conv(model, x)
    assert _moves(conv) == (1, 1), "\n".join(map(str, layout_changes(conv)))
    assert sum(type(m).__name__ == "ChannelLayerNorm" for m in conv.modules()) == 3
    report = compare(model, conv, torch.randn(3, 5, 16), layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)


def test_attention_block_stays_in_conv_layout() -> None:
    """Pre-RMSNorm attention: RMSNorm's channel mean, SDPA per head along C, the residual;
    the traced graph moves the input in once and the output out once."""
    torch.manual_seed(1)
    model = nn.Sequential()
    block = PreNormAttention(12, 3).eval()
    x = torch.randn(2, 6, 12)
    mask = torch.randn(2, 3, 6, 6)
    conv = to_conv(block, (x, mask))
    assert sum(n.target is channel_attention for n in conv.graph.nodes) == 1
    assert _moves(conv) == (1, 1), "\n".join(map(str, layout_changes(conv)))
    x2, mask2 = torch.randn(2, 6, 12), torch.randn(2, 3, 6, 6)
    want = block.double()(x2.double(), mask2.double())
    got = conv(x2, mask2)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert len(model) == 0


def test_attention_pass_off_for_height_layout() -> None:
    """layout="height" puts S on axis 2: the attention pass (which reads (B, C, 1, S)) is off
    and the model is still exact."""
    torch.manual_seed(2)
    block = PreNormAttention(8, 2).eval()
    x, mask = torch.randn(1, 4, 8), torch.zeros(1, 1, 4, 4)
    conv = to_conv(block, (x, mask), layout="height")
    assert not any(n.target is channel_attention for n in conv.graph.nodes)
    torch.testing.assert_close(conv(x, mask), block(x, mask), atol=1e-5, rtol=1e-5)


def test_core_table_names_ops_across_front_ends() -> None:
    assert kind_of("aten.add.Tensor").action is Channel.ELEMENTWISE  # type: ignore[union-attr]
    assert kind_of("__mul__").action is Channel.ELEMENTWISE  # type: ignore[union-attr]
    assert kind_of("relu_").action is Channel.ELEMENTWISE  # type: ignore[union-attr]
    assert kind_of("aten.mean.dim").action is Channel.CHANNEL_REDUCE  # type: ignore[union-attr]
    assert kind_of("aten.select.int") is None and kind_of("transpose") is None
    assert {"Add", "Relu", "Cast"} <= onnx_types(Channel.ELEMENTWISE)
    assert "Transpose" not in onnx_types(Channel.ELEMENTWISE)

