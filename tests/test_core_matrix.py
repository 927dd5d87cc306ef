"""``as_matrix`` / ``as_affine`` against matrices probed column by column from torch's own conv
in float64 (an independent derivation: ``M[:, i] = f(e_i) - f(0)``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import probe_matrix
from torch import nn

import fc2conv
from fc2conv import Fc2ConvError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@st.composite
def conv_case(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "circular", "reflect", "replicate"]))
    same = draw(st.booleans()) and all(s == 1 for s in stride)
    if same:
        padding: object = "same"
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    # Input large enough for the dilated kernel and for reflect padding (pad < size).
    spatial = tuple(
        draw(st.integers(max(d * (k - 1) + 1, 3), 5)) for k, d in zip(kernel, dilation, strict=True)
    )
    conv = CONVS[dims - 1](
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
        dtype=torch.float64,
    )
    return conv, (cin, *spatial)


@given(case=conv_case(), order=st.sampled_from(["chw", "hwc"]), sparse=st.booleans())
def test_as_matrix_equals_probed_matrix(case, order, sparse):
    conv, in_shape = case
    with torch.no_grad():
        if order == "chw":
            fn = conv
            reference = probe_matrix(lambda x: conv(x), in_shape)
        else:  # probe in channels-last coordinates
            hwc_shape = (*in_shape[1:], in_shape[0])

            def fn(x):
                return conv(x.movedim(-1, 1)).movedim(1, -1)

            reference = probe_matrix(fn, hwc_shape)
    matrix, bias = fc2conv.as_affine(conv, in_shape, sparse=sparse, order=order)
    dense = matrix.to_dense() if sparse else matrix
    torch.testing.assert_close(dense, reference, rtol=0, atol=1e-12)
    x = torch.randn(*in_shape, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x.unsqueeze(0))[0]
    xf = x.flatten() if order == "chw" else x.movedim(0, -1).flatten()
    yf = y.flatten() if order == "chw" else y.movedim(0, -1).flatten()
    torch.testing.assert_close(matrix @ xf + bias, yf, rtol=1e-12, atol=1e-12)


@given(dims=st.integers(0, 3), c=st.integers(1, 4), o=st.integers(1, 4), bias=st.booleans())
def test_linear_as_matrix_is_kron_and_block_diagonal(dims, c, o, bias):
    linear = nn.Linear(c, o, bias=bias, dtype=torch.float64)
    spatial = (2, 3, 2)[:dims]
    positions = math.prod(spatial)
    eye = torch.eye(positions, dtype=torch.float64)
    w = linear.weight.detach()
    m = fc2conv.as_matrix(linear, (c, *spatial))
    assert torch.equal(m, torch.kron(w, eye))  # C order: W ⊗ I_P
    m_hwc = fc2conv.as_matrix(linear, (c, *spatial), order="hwc")
    assert torch.equal(m_hwc, torch.kron(eye, w))  # channels-last: one copy of W per position
    x = torch.randn(c, *spatial, dtype=torch.float64)
    _, b = fc2conv.as_affine(linear, (c, *spatial))
    with torch.no_grad():
        y = linear(x.movedim(0, -1)).movedim(-1, 0)
    torch.testing.assert_close(m @ x.flatten() + b, y.flatten(), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_sparse_matrix_where_dense_would_not_fit():
    # 64 channels of 64x64 -> 64 channels: the dense matrix would be 262144 x 262144
    # (275 GB in float32); the sparse one has 64 * 64 * 4096 entries.
    conv = nn.Conv2d(64, 64, 1, dtype=torch.float64)
    m = fc2conv.as_matrix(conv, (64, 64, 64), sparse=True)
    assert m.is_sparse and m.shape == (262144, 262144)
    assert m._nnz() == 64 * 64 * 4096
    x = torch.randn(64, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x.unsqueeze(0))[0].flatten() - conv.bias.detach().repeat_interleave(4096)
    got = torch.sparse.mm(m, x.reshape(-1, 1)).reshape(-1)
    torch.testing.assert_close(got, y, rtol=1e-10, atol=1e-10)
    with pytest.raises(Fc2ConvError, match="pass sparse=True"):
        fc2conv.as_matrix(conv, (64, 64, 64))


@pytest.mark.slow
def test_sparse_matrix_of_a_3x3_conv_over_a_large_map():
    conv = nn.Conv2d(16, 32, 3, padding=1, stride=2, groups=2, dtype=torch.float64)
    in_shape = (16, 96, 96)
    m = fc2conv.as_matrix(conv, in_shape, sparse=True)
    x = torch.randn(*in_shape, dtype=torch.float64)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x.unsqueeze(0), conv.weight, None, 2, 1, 1, 2)[0]
    got = torch.sparse.mm(m, x.reshape(-1, 1)).reshape(-1)
    torch.testing.assert_close(got, y.flatten(), rtol=1e-10, atol=1e-10)


def test_as_matrix_errors_are_sentences():
    with pytest.raises(Fc2ConvError, match=r"expects 3 input channels, in_shape \(4, 5, 5\) has 4"):
        fc2conv.as_matrix(nn.Conv2d(3, 2, 3), (4, 5, 5))
    with pytest.raises(Fc2ConvError, match="2 spatial dimensions"):
        fc2conv.as_matrix(nn.Conv2d(3, 2, 3), (3, 5))
    with pytest.raises(Fc2ConvError, match="larger than the padded input"):
        fc2conv.as_matrix(nn.Conv2d(3, 2, 5), (3, 3, 3))
    with pytest.raises(Fc2ConvError, match="supports nn.Linear and nn.Conv1d/2d/3d, got ReLU"):
        fc2conv.as_matrix(nn.ReLU(), (3, 3))
