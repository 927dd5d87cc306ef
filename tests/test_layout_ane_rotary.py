"""Rotary embeddings and grouped K/V heads in the conv layout ``(B, C, 1, S)``: the math
against float64 per-head references, and a hand-written Llama-style block that ``to_conv``
keeps in that layout (one move in, one out) and ``to_linear`` brings back to SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fc2conv import compare, to_conv, to_linear
from fc2conv.pytorch.attention import channel_attention
from fc2conv.pytorch.layout import layout_changes
from fc2conv.pytorch.rotary import channel_rotary, rotary_table

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _tables(s: int, d: int, dtype: torch.dtype, g: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, S, D) cos/sin tables as Llama builds them (random frequencies: any table works)."""
    freqs = torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 3
    emb = torch.cat((freqs, freqs), -1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [1, 3])
def test_channel_rotary_matches_per_head_reference(dtype: torch.dtype, heads: int) -> None:
    """Per head and channel, in float64 loops: ``y[d] = x[d] cos[d] - x[d + D/2] sin[d]`` for
    ``d < D/2`` and ``x[d] cos[d] + x[d - D/2] sin[d]`` above; the conv-layout rotation is
    also bit-identical to Llama's on the (B, H, S, D) view (the same float operations)."""
    g = torch.Generator().manual_seed(heads)
    b, d, s = 2, 8, 5
    x = torch.randn(b, heads * d, 1, s, generator=g, dtype=dtype)
    cos, sin = _tables(s, d, dtype, g)
    got = channel_rotary(x, rotary_table(cos), rotary_table(sin), heads)
    xd, cd, sd = x.double(), cos.double()[0], sin.double()[0]  # (S, D) tables
    want = torch.empty_like(xd)
    for h in range(heads):
        for j in range(d):
            c = h * d + j
            other = xd[:, h * d + (j + d // 2) % d, 0]
            sign = -1.0 if j < d // 2 else 1.0
            want[:, c, 0] = xd[:, c, 0] * cd[:, j] + sign * other * sd[:, j]
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)
    xh = x.reshape(b, heads, d, s).transpose(2, 3)  # Llama's (B, H, S, D)
    half = d // 2
    llama = xh * cos[:, None] + torch.cat((-xh[..., half:], xh[..., :half]), -1) * sin[:, None]
    assert torch.equal(got.reshape(b, heads, d, s).transpose(2, 3), llama)


def _stored(t: torch.Tensor, positions_major: bool) -> torch.Tensor:
    """``t`` (B, C, 1, S) stored NCHW-contiguous, or positions-major (memory (B, S, C), as
    the move in and the 1x1 convs leave it in eager PyTorch)."""
    return t.squeeze(2).transpose(1, 2).contiguous().transpose(1, 2).unsqueeze(2) \
        if positions_major else t.contiguous()


@pytest.mark.parametrize("positions_major", [False, True])  # einsum form / SDPA on views
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_channel_attention_matches_repeated_heads(kv_heads: int,
                                                          positions_major: bool) -> None:
    """``kv_heads`` < ``heads``: query head ``h`` reads K/V head ``h // (heads / kv_heads)``;
    float64 reference loops over query heads with plain matmuls, a padding mask included.
    Both storages of the inputs give the same values and a (B, C, 1, S) result."""
    g = torch.Generator().manual_seed(kv_heads)
    b, heads, d, s = 2, 4, 6, 7
    q = _stored(torch.randn(b, heads * d, 1, s, generator=g), positions_major)
    k, v = (_stored(torch.randn(b, kv_heads * d, 1, s, generator=g), positions_major)
            for _ in range(2))
    mask = torch.ones(b, 1, s, s, dtype=torch.bool)
    mask[1, ..., -2:] = False
    got = channel_attention(q, k, v, heads, mask=mask, kv_heads=kv_heads)
    assert got.shape == (b, heads * d, 1, s)
    rep = heads // kv_heads
    outs = []
    for h in range(heads):
        qh = q.double()[:, h * d:(h + 1) * d, 0].transpose(1, 2)  # (B, S, D)
        kh, vh = (t.double()[:, (h // rep) * d:(h // rep + 1) * d, 0].transpose(1, 2)
                  for t in (k, v))
        scores = (qh @ kh.transpose(1, 2) / math.sqrt(d)).masked_fill(~mask[:, 0], -math.inf)
        outs.append((torch.softmax(scores, -1) @ vh).transpose(1, 2))
    want = torch.cat(outs, 1).unsqueeze(2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    """A Llama-style pre-norm block written by hand: RMSNorm, rotary Q/K, grouped K/V
    (``repeat_kv``), SDPA with a mask, residual, SwiGLU MLP."""

    def __init__(self, dim: int = 24, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q, self.o = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.k, self.v = (nn.Linear(dim, kv_heads * self.d) for _ in range(2))
        self.gate, self.up = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.w1, self.w2 = (nn.Parameter(torch.rand(dim) + 0.5) for _ in range(2))

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        h = self.norm(x, self.w1)
        q = self.q(h).view(b, s, self.heads, self.d).transpose(1, 2)
        k = self.k(h).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(h).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k.unsqueeze(2).expand(b, self.kv_heads, rep, s, self.d).reshape(b, -1, s, self.d)
        v = v.unsqueeze(2).expand(b, self.kv_heads, rep, s, self.d).reshape(b, -1, s, self.d)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, c))
        h = self.norm(x, self.w2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _inputs(seed: int, b: int = 2, s: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cos, sin = _tables(s, 6, torch.float32, g)
    mask = torch.ones(b, 1, s, s, dtype=torch.bool).tril()
    return torch.randn(b, s, 24, generator=g), cos, sin, mask


def test_llama_block_stays_in_conv_layout_and_round_trips() -> None:
    """to_conv: one move in, one out, two rotary tables (cos, sin) moved once, no permute;
    the result is within float32 rounding of a float64 run of the block on a fresh draw.
    to_linear of it: SDPA again, and exactly the original's transposes."""
    torch.manual_seed(3)
    block = LlamaBlock().eval()
    conv = to_conv(block, _inputs(0), verify=False)
    kinds = [c.direction for c in layout_changes(conv)]
    assert sorted(kinds) == ["in", "out", "table", "table"], "\n".join(
        map(str, layout_changes(conv)))
    att = [n for n in conv.graph.nodes if n.target is channel_attention]
    assert len(att) == 1 and att[0].kwargs.get("kv_heads") == 2
    fresh = _inputs(1)
    want = block.double()(*(t.double() if t.is_floating_point() else t for t in fresh))
    block.float()
    torch.testing.assert_close(conv(*fresh).double(), want, atol=1e-5, rtol=1e-5)
    # the exported graph (what an ANE / Core ML converter reads) keeps the einsum form: the
    # only transposes are the move in, the move out and the two tables
    exported = torch.export.export(conv, fresh).graph.nodes
    ops = [getattr(n.target, "_opname", "") for n in exported if n.op == "call_function"]
    assert sum(o in ("permute", "transpose", "movedim") for o in ops) == 4, ops
    assert not any("scaled_dot_product" in o for o in ops)
    back = to_linear(conv, _inputs(0), verify=False)
    assert not any(n.target is channel_attention for n in back.graph.nodes)
    assert sum(c.direction == "permute" for c in layout_changes(back)) == \
        sum(c.direction == "permute" for c in layout_changes(torch.fx.symbolic_trace(block)))
    report = compare(block, back, fresh, layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)


@pytest.mark.parametrize("positions_major", [False, True])  # a gathered / a free view
def test_channel_layer_norm_matches_reference_in_both_storages(positions_major: bool) -> None:
    """ChannelLayerNorm against float64 arithmetic per position (biased variance); a captured
    graph records the reduction over axis 1 (no transpose, no layer_norm on a moved view)."""
    from fc2conv.pytorch.layout import ChannelLayerNorm

    g = torch.Generator().manual_seed(5)
    c = 12
    norm = ChannelLayerNorm(c, 1e-5, torch.rand(c, generator=g) + 0.5,
                            torch.randn(c, generator=g))
    x = _stored(torch.randn(3, c, 1, 9, generator=g) * 3 + 1, positions_major)
    xd = x.double()
    mean = xd.sum(1, keepdim=True) / c
    var = ((xd - mean) ** 2).sum(1, keepdim=True) / c
    w, b = (p.detach().double().reshape(1, -1, 1, 1) for p in (norm.weight, norm.bias))
    want = (xd - mean) / torch.sqrt(var + 1e-5) * w + b
    got = norm(x)
    assert got.shape == x.shape
    assert got.movedim(1, -1).is_contiguous()  # channels innermost for the layers after it
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    ops = [getattr(n.target, "_opname", "") for n in
           torch.export.export(norm, (x,)).graph.nodes if n.op == "call_function"]
    assert "var_mean" in ops and not any(o in ("permute", "transpose", "movedim",
                                                "layer_norm", "native_layer_norm") for o in ops)
