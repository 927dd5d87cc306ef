"""Conversions keep each parameter's ``requires_grad``: a frozen layer stays frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fc2conv import conv_to_flatten_linear, conv_to_linear, flatten_linear_to_conv, linear_to_conv

X_SHAPE = (6, 2, 2)  # the (C, H, W) map each case is checked on


def _linear_to_conv(src: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    new = linear_to_conv(src, 2).double()  # type: ignore[arg-type]
    return new, new(x.flatten(1)[:, :6, None, None]).flatten(1)


def _flatten_linear_to_conv(src: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    new = flatten_linear_to_conv(src, X_SHAPE).double()  # type: ignore[arg-type]
    return new, new(x).flatten(1)


def _conv_to_linear(src: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    new = conv_to_linear(src).double()  # type: ignore[arg-type]
    return new, new(x.movedim(1, -1)).movedim(-1, 1).flatten(1)


def _conv_to_flatten_linear(src: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    new = conv_to_flatten_linear(src, X_SHAPE).double()  # type: ignore[arg-type]
    return new, new(x.flatten(1))


def _ref(src: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Float64 reference by plain matmul / F.conv2d on copies of the source's tensors."""
    w, b = src.weight.detach().double(), src.bias.detach().double()
    if isinstance(src, nn.Linear):
        inp = x.flatten(1)[:, :6] if w.shape[1] == 6 else x.flatten(1)
        return inp @ w.T + b
    return F.conv2d(x, w, b).flatten(1)


CASES = {
    "linear_to_conv": (_linear_to_conv, lambda: nn.Linear(6, 4)),
    "flatten_linear_to_conv": (_flatten_linear_to_conv, lambda: nn.Linear(24, 4)),
    "conv_to_linear": (_conv_to_linear, lambda: nn.Conv2d(6, 4, 1)),
    "conv_to_flatten_linear": (_conv_to_flatten_linear, lambda: nn.Conv2d(6, 4, 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("weight", "bias"), [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_requires_grad_is_copied(case, weight, bias):
    convert, make = CASES[case]
    torch.manual_seed(len(case))
    source = make()
    source.weight.requires_grad_(weight)
    source.bias.requires_grad_(bias)
    x = torch.randn(3, *X_SHAPE, dtype=torch.float64)
    new, got = convert(source, x)
    assert (new.weight.requires_grad, new.bias.requires_grad) == (weight, bias)
    # the values are the source's: frozen parameters are copied, not re-initialized
    ref = _ref(source, x)
    tol = 64 * torch.finfo(torch.float64).eps * max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= tol


def test_no_bias_stays_no_bias():
    lin = nn.Linear(5, 3, bias=False)
    lin.weight.requires_grad_(False)
    conv = linear_to_conv(lin, 1)
    assert conv.bias is None and not conv.weight.requires_grad
