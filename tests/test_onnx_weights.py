"""The numpy weight math of the ONNX rules equals the core's, and both equal an independent
float64 einsum on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fc2conv.core import conv_to_linear, flatten_linear_to_conv, linear_to_conv
from fc2conv.onnx.weights import (
    conv_kernel_to_linear,
    flatten_linear_to_conv_kernel,
    linear_to_conv_kernel,
)


@settings(max_examples=15, deadline=None)
@given(out_f=st.integers(1, 7), in_f=st.integers(1, 7), dims=st.integers(1, 3))
def test_linear_kernel_equals_core_and_einsum(out_f: int, in_f: int, dims: int) -> None:
    rng = np.random.default_rng()
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    kernel = linear_to_conv_kernel(w, dims)
    np.testing.assert_array_equal(kernel, linear_to_conv(lin, dims).weight.detach().numpy())
    x = rng.standard_normal((2, in_f, *([3] * dims)))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    got = conv(torch.from_numpy(x), torch.from_numpy(kernel.astype(np.float64))).numpy()
    np.testing.assert_allclose(
        got, np.einsum("oc,nc...->no...", w.astype(np.float64), x), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("in_shape", [(3, 4), (2, 3, 4), (2, 2, 3, 2)])
def test_flatten_kernel_equals_core_and_einsum(in_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng()
    feats = int(np.prod(in_shape))
    w = rng.standard_normal((5, feats)).astype(np.float32)
    lin = torch.nn.Linear(feats, 5, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    kernel = flatten_linear_to_conv_kernel(w, in_shape)
    core = flatten_linear_to_conv(lin, in_shape).weight.detach().numpy()
    np.testing.assert_array_equal(kernel, core)
    x = rng.standard_normal((3, *in_shape))
    ref = x.reshape(3, -1) @ w.astype(np.float64).T
    got = np.einsum(
        "ocs,ncs->no",
        kernel.reshape(5, in_shape[0], -1).astype(np.float64),
        x.reshape(3, in_shape[0], -1),
    )
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_block_diagonal_equals_core_and_grouped_conv(groups: int) -> None:
    rng = np.random.default_rng()
    out_ch, in_ch = 6, 12
    k = rng.standard_normal((out_ch, in_ch // groups, 1, 1)).astype(np.float32)
    conv = torch.nn.Conv2d(in_ch, out_ch, 1, groups=groups, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(k))
    dense = conv_kernel_to_linear(k, groups)
    np.testing.assert_array_equal(dense, conv_to_linear(conv).weight.detach().numpy())
    x = rng.standard_normal((2, in_ch, 3, 2))
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(k.astype(np.float64)), groups=groups)
    got = np.einsum("oc,nchw->nohw", dense.astype(np.float64), x)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12, atol=1e-12)
