"""core.rounding: the bounds must hold (float computation vs float64 reference on fresh random
data, many draws) and must not be absurdly loose; ULP distances must handle signs and zero."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fc2conv.core.rounding import (
    affine_bound,
    conv_bound,
    gamma,
    relative_error,
    ulp,
    ulp_distance,
    unit_roundoff,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_unit_roundoffs() -> None:
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.float16) == 2.0**-11
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff("tf32") == 2.0**-11
    assert unit_roundoff(torch.int64) == 0.0
    assert gamma(10, 2.0**-24) == pytest.approx(10 * 2.0**-24, rel=1e-6)
    assert math.isinf(gamma(256, 2.0**-8))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None)
@given(n_in=st.integers(1, 300), n_out=st.integers(1, 40), batch=st.integers(1, 16),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_affine_bound_holds_and_is_not_loose(dtype: torch.dtype, n_in: int, n_out: int,
                                              batch: int, scale: float) -> None:
    u = unit_roundoff(dtype)
    # values exactly representable in dtype; the reference sees the very same numbers
    w = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
    b = torch.randn(n_out).to(dtype)
    x = (torch.randn(batch, n_in) * scale).to(dtype)
    computed = F.linear(x, w, b).double()
    exact = x.double() @ w.double().T + b.double()
    bound = affine_bound(w, x, b, u=u)
    err = (computed - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_bound_is_attained_within_1e3(dtype: torch.dtype) -> None:
    """Over many draws the worst actual error reaches > 1e-3 of the bound somewhere."""
    u = unit_roundoff(dtype)
    worst = 0.0
    for _ in range(20):
        w = torch.randn(16, 64).to(dtype)
        x = torch.rand(32, 64).to(dtype)  # same-sign terms: little cancellation
        computed = F.linear(x, w).double()
        exact = x.double() @ w.double().T
        bound = affine_bound(w, x, u=u)
        worst = max(worst, float(((computed - exact).abs() / bound).max()))
    assert 1e-3 < worst <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_bound_propagates_input_error(dtype: torch.dtype) -> None:
    u = unit_roundoff(dtype)
    for _ in range(10):
        w = torch.randn(24, 50).to(dtype)
        x_exact = torch.randn(8, 50, dtype=torch.float64)
        x_hat = x_exact.to(dtype)  # the input arrives rounded: |x̂ - x| <= u|x|
        e = u * x_exact.abs()
        computed = F.linear(x_hat, w).double()
        exact = x_exact @ w.double().T
        bound = affine_bound(w, x_hat, in_error=e, u=u)
        assert bool(((computed - exact).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dims", "groups", "stride", "padding"),
                         [(1, 1, 1, 0), (2, 1, 2, 1), (2, 2, 1, 1), (3, 1, 1, 0)])
def test_conv_bound_holds_and_is_not_loose(dtype: torch.dtype, dims: int, groups: int,
                                           stride: int, padding: int) -> None:
    u = unit_roundoff(dtype)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    worst = 0.0
    for _ in range(6):
        c_in, c_out, k = 4 * groups, 6, 3
        x = torch.randn(2, c_in, *[7] * dims).to(dtype)
        w = torch.randn(c_out, c_in // groups, *[k] * dims).to(dtype)
        b = torch.randn(c_out).to(dtype)
        kw = {"stride": stride, "padding": padding, "groups": groups}
        computed = conv(x, w, b, **kw).double()
        exact = conv(x.double(), w.double(), b.double(), **kw)
        bound = conv_bound(w, x, b, u=u, **kw)
        ratio = (computed - exact).abs() / bound
        assert bool((ratio <= 1).all()), float(ratio.max())
        worst = max(worst, float(ratio.max()))
    assert worst > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_ulp_distance_of_neighbours_is_one(dtype: torch.dtype) -> None:
    x = torch.randn(1000).to(dtype)
    x = x[x != 0]
    # the neighbour one spacing away from zero
    up = (x.double() + ulp(x, dtype) * torch.sign(x.double())).to(dtype)
    d = ulp_distance(x, up, dtype)
    assert bool(((d >= 0.5) & (d <= 1.0)).all()), d.max()


def test_ulp_distance_across_sign_change_and_near_zero() -> None:
    x = torch.tensor([1.0, 3.0e-3, 1e-30], dtype=torch.float32)
    d = ulp_distance(x, -x, torch.float32)
    # 2|x| / ulp(|x|) is 2^24 .. 2^25, not the ~2e9 of an integer reinterpretation
    assert bool(((d >= 2.0**24) & (d <= 2.0**25)).all())
    assert float(ulp_distance(torch.tensor([1e-30]), torch.tensor([-1e-30]), torch.float32,
                              floor=1e-3)[0]) < 1e-10
    assert float(ulp_distance(torch.tensor([0.0]), torch.tensor([0.0]), torch.float32)[0]) == 0
    # integers: plain differences
    assert ulp_distance(torch.tensor([3]), torch.tensor([-2]), torch.int64).tolist() == [5.0]


def test_relative_error_uses_the_floor_near_zero() -> None:
    ref = torch.tensor([0.0, 1e-12, 2.0], dtype=torch.float64)
    a = ref + torch.tensor([1e-9, 1e-9, 1e-9], dtype=torch.float64)
    rel = relative_error(a, ref, floor=1e-3)
    assert rel.tolist() == pytest.approx([1e-6, 1e-6, 5e-10])
    assert float(relative_error(a, ref)[0]) > 1e290  # without a floor: meaningless
