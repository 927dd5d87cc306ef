"""Layer equivalences against independent float64 references on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import dot_tolerance, linear_per_position, magnitude_per_position
from torch import nn

import fc2conv
from fc2conv import Fc2ConvError

DTYPES = [torch.float32, torch.float64]
dims_st = st.integers(1, 3)
dtype_st = st.sampled_from(DTYPES)


def spatial_st(dims: int, lo: int = 1, hi: int = 5):
    return st.lists(st.integers(lo, hi), min_size=dims, max_size=dims).map(tuple)


def assert_within(actual: torch.Tensor, expected64: torch.Tensor, tol: torch.Tensor) -> None:
    err = (actual.double() - expected64).abs()
    worst = (err - tol).max()
    assert worst <= 0, f"max error {err.max():.3e} exceeds tolerance at {(err - tol).argmax()}"


# --- Linear -> 1x1 conv ----------------------------------------------------------------------


@given(
    data=st.data(),
    dims=dims_st,
    dtype=dtype_st,
    bias=st.booleans(),
    c=st.integers(1, 12),
    o=st.integers(1, 12),
    n=st.integers(1, 3),
)
def test_linear_to_conv_matches_per_position_reference(data, dims, dtype, bias, c, o, n):
    spatial = data.draw(spatial_st(dims))
    linear = nn.Linear(c, o, bias=bias, dtype=dtype)
    conv = fc2conv.linear_to_conv(linear, dims=dims)
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1])
    assert tuple(conv.kernel_size) == (1,) * dims
    assert conv.weight.dtype == dtype and (conv.bias is None) == (not bias)
    x = torch.randn(n, c, *spatial, dtype=dtype)
    expected = linear_per_position(x, linear.weight, linear.bias)
    tol = dot_tolerance(dtype, c, magnitude_per_position(x, linear.weight, linear.bias))
    with torch.no_grad():
        assert_within(conv(x), expected, tol)


def test_linear_to_conv_copies_parameters_and_keeps_input():
    linear = nn.Linear(5, 3)
    before = linear.weight.detach().clone()
    conv = fc2conv.linear_to_conv(linear)
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))
        conv.bias.add_(1.0)
    assert torch.equal(linear.weight, before)
    assert conv.weight.data_ptr() != linear.weight.data_ptr()
    assert conv.fc2conv_origin == "Linear 5->3"


@pytest.mark.parametrize("dims", [4, 0, "2", 2.0, True])
def test_linear_to_conv_rejects_bad_dims(dims):
    with pytest.raises(Fc2ConvError, match="dims must be 1, 2 or 3"):
        fc2conv.linear_to_conv(nn.Linear(2, 2), dims=dims)


@pytest.mark.parametrize("in_shape", [(3, 2, 2.0), "3,2,2", (3, -2, 2), (3,) * 5])
def test_in_shape_must_be_positive_integers(in_shape):
    with pytest.raises(Fc2ConvError, match="in_shape"):
        fc2conv.flatten_linear_to_conv(nn.Linear(12, 2), in_shape)


def test_lazy_layers_must_be_initialised_first():
    with pytest.raises(Fc2ConvError, match="uninitialized .lazy. parameters; run the model once"):
        fc2conv.linear_to_conv(nn.LazyLinear(4))
    with pytest.raises(Fc2ConvError, match="uninitialized"):
        fc2conv.conv_to_linear(nn.LazyConv2d(4, 1))


def test_linear_to_conv_rejects_other_types():
    with pytest.raises(Fc2ConvError, match="expected an nn.Linear, got Conv2d"):
        fc2conv.linear_to_conv(nn.Conv2d(2, 2, 1))  # type: ignore[arg-type]


# --- 1x1 conv -> Linear ----------------------------------------------------------------------


@given(
    data=st.data(),
    dims=dims_st,
    dtype=dtype_st,
    bias=st.booleans(),
    groups=st.integers(1, 4),
    cpg=st.integers(1, 4),
    opg=st.integers(1, 4),
)
def test_conv_to_linear_block_diagonal_matches_grouped_reference(
    data, dims, dtype, bias, groups, cpg, opg
):
    spatial = data.draw(spatial_st(dims))
    dilation = data.draw(st.integers(1, 3))
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = cls(
        groups * cpg, groups * opg, 1, groups=groups, bias=bias, dilation=dilation, dtype=dtype
    )
    linear = fc2conv.conv_to_linear(conv)
    assert (linear.in_features, linear.out_features) == (groups * cpg, groups * opg)
    # Off-block entries are exact zeros; blocks are the group weights.
    w = conv.weight.detach().reshape(groups, opg, cpg)
    for g in range(groups):
        for h in range(groups):
            block = linear.weight[g * opg : (g + 1) * opg, h * cpg : (h + 1) * cpg]
            assert torch.equal(block, w[g]) if g == h else bool((block == 0).all())
    x = torch.randn(2, groups * cpg, *spatial, dtype=dtype)
    xg = x.double().reshape(2, groups, cpg, *spatial)
    ref = torch.einsum("goc,ngc...->ngo...", w.double(), xg).reshape(2, groups * opg, *spatial)
    if bias:
        ref = ref + conv.bias.double().reshape(1, -1, *([1] * dims))
    tol = dot_tolerance(dtype, cpg, magnitude_per_position(x, linear.weight, linear.bias))
    with torch.no_grad():
        assert_within(linear(x.movedim(1, -1)).movedim(-1, 1), ref, tol)


@pytest.mark.parametrize(
    "conv, why",
    [
        (nn.Conv2d(3, 4, 3), "3x3 kernel mixes neighbouring positions"),
        (nn.Conv2d(3, 4, 1, stride=2), "stride 2x2 skips positions"),
        (nn.Conv1d(3, 4, 1, padding=1), "padding 1 adds border positions"),
    ],
)
def test_conv_to_linear_refuses_with_a_sentence(conv, why):
    with pytest.raises(ValueError) as info:
        fc2conv.conv_to_linear(conv)
    message = str(info.value)
    assert why in message and "as_matrix" in message and "Cannot convert Conv" in message


# --- Linear over a flattened map <-> conv with the map's kernel --------------------------------


def flatten(x: torch.Tensor, order: str) -> torch.Tensor:
    return x.flatten(1) if order == "chw" else x.movedim(1, -1).flatten(1)


@given(
    data=st.data(),
    dims=dims_st,
    dtype=dtype_st,
    bias=st.booleans(),
    order=st.sampled_from(["chw", "hwc"]),
    c=st.integers(1, 4),
    o=st.integers(1, 6),
)
def test_flatten_linear_to_conv_equals_linear_and_slides(data, dims, dtype, bias, order, c, o):
    spatial = data.draw(spatial_st(dims, 1, 4))
    features = c * math.prod(spatial)
    linear = nn.Linear(features, o, bias=bias, dtype=dtype)
    conv = fc2conv.flatten_linear_to_conv(linear, (c, *spatial), order=order)
    assert tuple(conv.kernel_size) == spatial
    extra = data.draw(spatial_st(dims, 0, 2))
    big = torch.randn(2, c, *(s + e for s, e in zip(spatial, extra, strict=True)), dtype=dtype)
    with torch.no_grad():
        out = conv(big)
    assert tuple(out.shape[2:]) == tuple(e + 1 for e in extra)
    # Every output cell equals the Linear applied to the flattened crop under it.
    for offset in [(0,) * dims, extra]:
        crop = big[
            (
                slice(None),
                slice(None),
                *(slice(a, a + s) for a, s in zip(offset, spatial, strict=True)),
            )
        ]
        flat = flatten(crop, order)
        ref = flat.double() @ linear.weight.double().T
        if bias:
            ref = ref + linear.bias.double()
        mag = flat.double().abs() @ linear.weight.double().abs().T
        tol = dot_tolerance(dtype, features, mag + (linear.bias.double().abs() if bias else 0))
        assert_within(out[(slice(None), slice(None), *offset)], ref, tol)


def test_flatten_order_matters_and_mismatch_is_a_sentence():
    linear = nn.Linear(2 * 3 * 3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    wrong = fc2conv.flatten_linear_to_conv(linear, (2, 3, 3), order="hwc")
    with torch.no_grad():
        assert (wrong(x).flatten(1) - linear(x.flatten(1))).abs().max() > 1e-3
    with pytest.raises(Fc2ConvError) as info:
        fc2conv.flatten_linear_to_conv(nn.Linear(25088, 8), (512, 6, 6))
    msg = str(info.value)
    assert "Linear 25088->8" in msg and "(512, 6, 6)" in msg and "18432" in msg
    assert "Did you mean in_shape=(512, 7, 7)?" in msg


@given(
    data=st.data(),
    dims=dims_st,
    bias=st.booleans(),
    order=st.sampled_from(["chw", "hwc"]),
    groups=st.integers(1, 2),
    o_per_g=st.integers(1, 3),
    c_per_g=st.integers(1, 3),
)
def test_conv_to_flatten_linear_roundtrip(data, dims, bias, order, groups, o_per_g, c_per_g):
    spatial = data.draw(spatial_st(dims, 1, 4))
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = cls(
        groups * c_per_g, groups * o_per_g, spatial, groups=groups, bias=bias, dtype=torch.float64
    )
    in_shape = (groups * c_per_g, *spatial)
    linear = fc2conv.conv_to_flatten_linear(conv, in_shape, order=order)
    x = torch.randn(3, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x).flatten(1)
        got = linear(flatten(x, order))
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        # And back again: a dense conv (groups folded into exact zeros) with the same outputs.
        back = fc2conv.flatten_linear_to_conv(linear, in_shape, order=order)
        assert back.groups == 1
        torch.testing.assert_close(back(x).flatten(1), ref, rtol=1e-12, atol=1e-12)
    if groups == 1:
        assert torch.equal(back.weight, conv.weight)


def test_conv_to_flatten_linear_refuses_sliding_conv():
    with pytest.raises(Fc2ConvError, match="spatial size 3x3, not 1"):
        fc2conv.conv_to_flatten_linear(nn.Conv2d(2, 3, 3), (2, 5, 5))


# --- the seed example: 2 channels of 2x2 -> 1 channel ----------------------------------------


def test_seed_example_one_by_one_conv_is_four_shared_dense_layers_and_one_block_matrix():
    conv = nn.Conv2d(2, 1, 1, dtype=torch.float64)
    w = conv.weight.detach().reshape(1, 2)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x).reshape(4)
    # (a) four dense layers, one per position, all with the same weight vector
    per_position = torch.stack([w @ x[0, :, i, j] for i in range(2) for j in range(2)]).reshape(4)
    per_position = per_position + conv.bias.detach()
    # (b) one dense layer on the 8 flattened inputs with a block-structured 4x8 matrix
    m = fc2conv.as_matrix(conv, (2, 2, 2))
    assert m.shape == (4, 8)
    assert torch.equal(m, torch.kron(w, torch.eye(4, dtype=torch.float64)))
    m_hwc = fc2conv.as_matrix(conv, (2, 2, 2), order="hwc")
    assert torch.equal(m_hwc, torch.block_diag(*[w] * 4))
    dense = m @ x.reshape(8) + conv.bias.detach()
    torch.testing.assert_close(per_position, y, rtol=0, atol=1e-15)
    torch.testing.assert_close(dense, y, rtol=0, atol=1e-15)
