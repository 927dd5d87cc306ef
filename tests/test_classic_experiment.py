"""The classic experiment: an MLP 256->64->128->256->4 on (batch=16, samples=5, dim=256) input,
all weights and biases 1, against the same MLP as 1x1 convs. The outputs (~1e8) differ by
rounding only: both stay within Higham's forward-error bound of a float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fc2conv
from fc2conv.core.rounding import affine_bound, unit_roundoff

SIZES = [256, 64, 128, 256, 4]


def mlp(dtype: torch.dtype, ones: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:], strict=False)):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    if ones:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0)
    return model


def as_conv(model: nn.Sequential, dims: int) -> nn.Sequential:
    return nn.Sequential(
        *[fc2conv.linear_to_conv(m, dims=dims) if isinstance(m, nn.Linear) else m for m in model]
    )


def run_conv(convs: nn.Sequential, x: torch.Tensor, dims: int) -> torch.Tensor:
    h = x.movedim(-1, 1)  # (B, S, D) -> (B, D, S)
    if dims == 2:
        h = h.unsqueeze(2)  # (B, D, 1, S): the layout of Apple's ANE transformers
    out = convs(h)
    if dims == 2:
        out = out.squeeze(2)
    return out.movedim(1, -1)


def independent_bound(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Layer by layer: e' = |W| e + γ_{n+1}(|W||x̂| + |b|), ReLU passes e on."""
    u = unit_roundoff(x.dtype)
    err = torch.zeros_like(x, dtype=torch.float64)
    h = x
    for m in model:
        if isinstance(m, nn.Linear):
            err = affine_bound(m.weight, h, m.bias, err, u)
        h = m(h)
    return err


@pytest.mark.parametrize("ones", [True, False], ids=["weights=1", "random-weights"])
@pytest.mark.parametrize("dims", [1, 2])
def test_linear_and_conv_mlps_are_both_within_rounding_of_float64(ones, dims):
    model = mlp(torch.float32, ones)
    convs = as_conv(model, dims)
    x = torch.rand(16, 5, 256)
    with torch.no_grad():
        y_lin = model(x)
        y_conv = run_conv(convs, x, dims)
        ref = mlp(torch.float64, ones)
        ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        y_ref = ref(x.double())
        bound = independent_bound(model, x)
    assert y_conv.shape == y_lin.shape == (16, 5, 4)
    if ones:
        assert y_ref.abs().min() > 1e7  # logits ~1e8, as in the experiment
    for y in (y_lin, y_conv):
        err = (y.double() - y_ref).abs()
        assert (err <= bound).all(), f"error {err.max():.3g} above bound {bound.max():.3g}"
    # Between the two models: at most the sum of both bounds — and far below it in practice.
    assert ((y_lin.double() - y_conv.double()).abs() <= 2 * bound).all()
    if ones:  # no cancellation: the worst-case bound is tight within a few orders of magnitude
        assert (bound / y_ref.abs()).max() < 1e-3


def test_worst_case_bound_is_loose_under_cancellation_so_observed_errors_matter():
    """With random weights the |W||x| bound (~1e-2 here) dwarfs the real rounding (~1e-8):
    a verifier must also compare the two models' difference with their observed errors."""
    model = mlp(torch.float32, ones=False)
    x = torch.rand(16, 5, 256)
    with torch.no_grad():
        ref = mlp(torch.float64, ones=False)
        ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        observed = (model(x).double() - ref(x.double())).abs().max()
        bound = independent_bound(model, x).max()
    assert observed < 1e-3 * bound


def test_a_real_bug_exceeds_the_bound():
    model = mlp(torch.float32, ones=False)
    convs = as_conv(model, 1)
    with torch.no_grad():
        x = torch.rand(16, 5, 256)
        # One weight of the last layer changed by 1e-3, on an input feature that is alive
        # (ReLU can silence a feature for every sample, which would hide any change).
        alive = model[:-1](x).reshape(-1, 256).mean(0).argmax()
        convs[-1].weight[1, alive] += 1e-3
        ref = mlp(torch.float64, ones=False)
        ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        y_ref = ref(x.double())
        rounding = (model(x).double() - y_ref).abs().max()
        diff = (model(x).double() - run_conv(convs, x, 1).double()).abs().max()
    assert diff > 100 * rounding  # far outside what rounding produced on the same inputs
