"""Float64 references and dtype-derived tolerances for the PyTorch tests."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def reference(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``model`` run in float64 on float64 copies of the inputs (the original, not converted)."""
    ref = copy.deepcopy(model).double()
    return ref(*(t.double() for t in inputs))


@torch.no_grad()
def assert_matches_reference(got: torch.Tensor, original: nn.Module, *inputs: torch.Tensor,
                             factor: float = 8.0) -> None:
    """``got`` (a float32 result) equals the float64 reference of ``original`` on ``inputs``
    within ``factor`` times the original's own float32 error, and at least ``64 eps`` of the
    output scale. Shapes may differ by singleton axes only."""
    ref = reference(original, *inputs)
    base = original(*inputs).double()
    assert got.numel() == ref.numel(), (tuple(got.shape), tuple(ref.shape))
    got64 = got.reshape(ref.shape).double()
    eps = torch.finfo(torch.float32).eps
    own = (base - ref).abs().max().item()
    allowed = max(factor * own, 64 * eps * ref.abs().max().item())
    worst = (got64 - ref).abs().max().item()
    assert worst <= allowed, f"max abs error {worst:.3g} > allowed {allowed:.3g} (own {own:.3g})"
