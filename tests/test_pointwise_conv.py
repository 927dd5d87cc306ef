"""PointwiseConv{1,2,3}d: a 1x1 conv that runs as F.linear on a channels-last input in eager
PyTorch and as the plain convolution otherwise and in captured graphs.

Every value is checked against a float64 einsum ``y[n, o, p] = sum_c W[o, c] x[n, c, p] + b[o]``
on fresh random shapes and values, within the float32 GEMM bound ``C * eps * sum |W| |x|``.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fc2conv
from fc2conv.core.describe import describe
from fc2conv.core.pointwise_conv import (
    PointwiseConv1d,
    PointwiseConv2d,
    PointwiseConv3d,
    pointwise_class,
)
from fc2conv.pytorch.weights import SharedWeightConv2d

BASES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCS = {1: "conv1d", 2: "conv2d", 3: "conv3d"}


def _shapes(rng: random.Random, dims: int) -> tuple[int, int, int, tuple[int, ...]]:
    """(N, C, O, spatial), fresh each call."""
    spatial = tuple(rng.randint(1, 5) for _ in range(dims))
    return rng.randint(1, 3), rng.randint(1, 24), rng.randint(1, 24), spatial


def _input(n: int, c: int, spatial: tuple[int, ...], memory: str,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An ``(N, C, *S)`` tensor whose memory is channels-last (the move in's strided view) or
    NCHW-contiguous."""
    x = torch.randn(n, *spatial, c, dtype=dtype).movedim(-1, 1)
    return x.contiguous() if memory == "contiguous" else x


def _reference(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``W x + b`` per position, and the rounding scale ``sum_c |W||x|``."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    xd = x.detach().double()
    y = torch.einsum("oc,nc...->no...", w, xd)
    if bias is not None:
        y = y + bias.detach().double().reshape(1, -1, *([1] * (x.dim() - 2)))
    scale = torch.einsum("oc,nc...->no...", w.abs(), xd.abs())
    return y, scale


def _assert_close(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, c: int) -> None:
    eps = torch.finfo(y.dtype).eps
    bound = (c + 2) * eps * (scale + ref.abs()) + torch.finfo(y.dtype).tiny
    err = (y.double() - ref).abs()
    assert y.shape == ref.shape and y.dtype in (torch.float32, torch.float64)
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, allowed {bound.min():.3g}"


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("memory", ["channels_last", "contiguous"])
def test_equals_float64_reference(dims: int, bias: bool, memory: str) -> None:
    rng = random.Random()
    for _ in range(3):
        n, c, o, spatial = _shapes(rng, dims)
        conv = fc2conv.linear_to_conv(nn.Linear(c, o, bias=bias), dims=dims)
        assert isinstance(conv, pointwise_class(dims)) and isinstance(conv, BASES[dims])
        x = _input(n, c, spatial, memory)
        ref, scale = _reference(conv.weight, conv.bias, x)
        _assert_close(conv(x), ref, scale, c)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_eager_pointwise_never_reaches_the_convolution(dims: int, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """In eager, a pointwise conv runs as F.linear whatever the input's memory: channels-last
    (a free view), NCHW-contiguous and strided (one gather): the convolution is never called,
    and each result is within float32 rounding of the float64 reference."""
    calls: list[tuple[int, ...]] = []
    plain = getattr(F, FUNCS[dims])

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return plain(x, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(F, FUNCS[dims], spy)
    rng = random.Random()
    n, c, o, spatial = _shapes(rng, dims)
    c, spatial = c + 2, tuple(s + 1 for s in spatial)  # memory formats differ
    conv = pointwise_class(dims)(c, o, 1)
    x = _input(n, c, spatial, "channels_last")
    strided = torch.randn(n, 2 * c, *spatial)[:, ::2]  # neither layout: every other channel
    for inp in (x, x.contiguous(), strided):
        ref, scale = _reference(conv.weight, conv.bias, inp)
        y = conv(inp)
        _assert_close(y, ref, scale, c)
        assert y.movedim(1, -1).is_contiguous()  # the next converted layer's view is free
    assert calls == []
    spatial_k = tuple(3 for _ in spatial)  # a kernel that is not pointwise does reach it
    big = pointwise_class(dims)(c, o, spatial_k)
    big(torch.randn(n, c, *(s + 2 for s in spatial)))
    assert len(calls) == 1


def test_output_stays_channels_last_so_the_next_layer_is_fast() -> None:
    """The F.linear output viewed back is channels-last again: a chain of converted layers
    stays on the fast path (the positions-major ``(B, C, 1, S)`` of ``to_conv``)."""
    conv = PointwiseConv2d(6, 9, 1)
    x = torch.randn(2, 7, 6).movedim(-1, 1).unsqueeze(2)  # (B, C, 1, S), memory (B, S, C)
    y = conv(x)
    assert y.shape == (2, 9, 1, 7) and y.movedim(1, -1).is_contiguous()


@pytest.mark.parametrize("cfg", [dict(kernel_size=3), dict(kernel_size=1, stride=2),
                                 dict(kernel_size=1, padding=1), dict(kernel_size=1, groups=2),
                                 dict(kernel_size=1, dilation=2)])
def test_not_pointwise_runs_the_plain_conv(cfg: dict[str, int]) -> None:
    """A kernel that is not one matrix per position is never run as F.linear."""
    conv = PointwiseConv2d(4, 6, **cfg)  # type: ignore[arg-type]
    assert not conv.is_pointwise()
    x = _input(2, 4, (5, 6), "channels_last")
    plain = nn.Conv2d(4, 6, **cfg).double()  # type: ignore[arg-type]
    plain.load_state_dict(conv.state_dict())
    ref = plain(x.double())
    scale = F.conv2d(x.double().abs(), plain.weight.abs(), None, plain.stride, plain.padding,
                     plain.dilation, plain.groups)
    _assert_close(conv(x), ref, scale, 4 * 9)


def test_shared_weight_conv_fast_path_with_its_tied_matrix() -> None:
    """A tied ``(O, C)`` weight runs as F.linear on either memory layout."""
    conv = SharedWeightConv2d(5, 7, 1, bias=True)
    conv.weight = nn.Parameter(torch.randn(7, 5))
    for memory in ("channels_last", "contiguous"):
        x = _input(2, 5, (1, 6), memory)
        ref, scale = _reference(conv.weight, conv.bias, x)
        _assert_close(conv(x), ref, scale, 5)


def test_gradients_match_the_float64_reference() -> None:
    conv = fc2conv.linear_to_conv(nn.Linear(6, 4), dims=2)
    x = _input(2, 6, (1, 5), "channels_last").requires_grad_(True)
    conv(x).square().sum().backward()
    w = conv.weight.detach().double().reshape(4, 6).requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    y = torch.einsum("oc,nc...->no...", w, xd) + conv.bias.detach().double().reshape(1, -1, 1, 1)
    y.square().sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    assert w.grad is not None and xd.grad is not None
    # float32 results against the float64 gradients rounded once: float32 tolerances
    torch.testing.assert_close(conv.weight.grad.reshape(4, 6), w.grad.float())
    torch.testing.assert_close(x.grad, xd.grad.float())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_export_records_a_convolution(dims: int) -> None:
    conv = fc2conv.linear_to_conv(nn.Linear(6, 5), dims=dims)
    x = _input(2, 6, (3,) * dims, "channels_last")
    ep = torch.export.export(conv, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("conv" in t for t in targets), targets
    assert not any(k in t for t in targets for k in ("linear", "mm", "matmul")), targets
    ref, scale = _reference(conv.weight, conv.bias, x)
    _assert_close(ep.module()(x), ref, scale, 6)


def test_jit_trace_records_a_convolution() -> None:
    conv = fc2conv.linear_to_conv(nn.Linear(6, 5), dims=2)
    x = _input(2, 6, (1, 4), "channels_last")
    traced = torch.jit.trace(conv, (x,))
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert "aten::_convolution" in kinds or "aten::conv2d" in kinds, kinds
    assert not {"aten::linear", "aten::matmul"} & kinds


def test_module_contract() -> None:
    """Same parameters and state-dict keys as nn.Conv2d, loading strictly both ways;
    conv_to_linear takes it back; descriptions speak of a Conv2d."""
    conv = fc2conv.linear_to_conv(nn.Linear(6, 5), dims=2)
    plain = nn.Conv2d(6, 5, 1)
    assert set(conv.state_dict()) == set(plain.state_dict()) == {"weight", "bias"}
    plain.load_state_dict(conv.state_dict(), strict=True)
    other = PointwiseConv2d(6, 5, 1)
    other.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(other.weight, conv.weight)
    assert describe(conv) == "Conv2d 6->5, kernel 1x1"
    back = fc2conv.conv_to_linear(conv)
    assert type(back) is nn.Linear and torch.equal(back.weight, conv.weight.reshape(5, 6))
    assert PointwiseConv1d is pointwise_class(1) and PointwiseConv3d is pointwise_class(3)


def test_symbolic_trace_of_a_model_holding_it() -> None:
    """fx proxies are not tensors: tracing through the module records the convolution."""
    model = nn.Sequential(PointwiseConv2d(4, 3, 1), nn.ReLU())
    gm = torch.fx.symbolic_trace(model)
    x = _input(2, 4, (1, 5), "channels_last")
    torch.testing.assert_close(gm(x), model(x))


def test_parameters_kept_elsewhere_are_still_read() -> None:
    """A bias moved to a buffer (as fusing code does) is not dropped on the fast path."""
    conv = PointwiseConv2d(4, 3, 1)
    bias = conv.bias.detach().clone() + 1
    del conv.bias
    conv.register_buffer("bias", bias)
    x = _input(2, 4, (1, 5), "channels_last")
    ref, scale = _reference(conv.weight, bias, x)
    _assert_close(conv(x), ref, scale, 4)


def test_converted_model_never_calls_the_convolution_in_eager(monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """to_conv's 1x1 convs see positions-major inputs, so none reaches F.conv2d in eager; the
    result matches the original model run in float64."""
    from archs import MLP

    model = MLP(dim=12, hidden=20).eval()
    x = torch.randn(2, 7, 12)
    conv = fc2conv.to_conv(model, (x,), verify=False)
    convs = [m for m in conv.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(isinstance(m, PointwiseConv2d) for m in convs)

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a converted 1x1 conv ran the convolution in eager")

    monkeypatch.setattr(F, "conv2d", refuse)
    fresh = torch.randn(3, 5, 12)
    with torch.no_grad():
        y = conv(fresh)
        ref = MLP(dim=12, hidden=20).double().eval()
        ref.load_state_dict(model.state_dict())
        expected = ref(fresh.double())
    eps = torch.finfo(torch.float32).eps
    assert (y.double() - expected).abs().max() <= 64 * 20 * eps * (1 + expected.abs().max())
