"""The weight math of the ONNX rules, on numpy arrays (ONNX tensors are numpy, not torch).

Each function mirrors one function of :mod:`fc2conv.core.layers` and computes exactly the same
numbers (``tests/test_onnx_weights.py`` checks each pair against the core and against an
independent float64 reference). It is kept in numpy because the core builds ``torch.nn``
modules, whose constructors randomly initialise every parameter before the copy; on a 2 GB
model that costs more than the whole rewrite, and reshapes here stay zero-copy views of the
memory-mapped external data.

For a fully connected layer ``y = W x + b`` with ``W`` of shape ``(O, C)``:

* :func:`linear_to_conv_kernel` — ``K[o, c, 1, ..., 1] = W[o, c]``
  (mirrors :func:`fc2conv.core.linear_to_conv`).
* :func:`flatten_linear_to_conv_kernel` — ``K = W.reshape(O, C, *S)`` for a row-major
  ``Flatten`` of an ``(N, C, *S)`` map (mirrors :func:`fc2conv.core.flatten_linear_to_conv`
  with ``order="chw"``).
* :func:`conv_kernel_to_linear` — a 1x1 kernel ``K`` of shape ``(O, C/g, 1, ...)`` with ``g``
  groups gives the block-diagonal ``W = diag(K_1, ..., K_g)`` (mirrors
  :func:`fc2conv.core.conv_to_linear`).
"""

from __future__ import annotations

import numpy as np

from fc2conv.errors import Fc2ConvError


def linear_to_conv_kernel(weight: np.ndarray, spatial_dims: int) -> np.ndarray:
    """``(O, C)`` -> ``(O, C, 1, ..., 1)`` with ``spatial_dims`` trailing ones (a view)."""
    if weight.ndim != 2:
        raise Fc2ConvError(f"a fully connected weight must be 2-D (O, C), got shape {weight.shape}")
    return weight.reshape(*weight.shape, *([1] * spatial_dims))


def flatten_linear_to_conv_kernel(weight: np.ndarray, in_shape: tuple[int, ...]) -> np.ndarray:
    """``(O, C*prod(S))`` -> ``(O, C, *S)`` for ``in_shape = (C, *S)`` (a view)."""
    features = int(np.prod(in_shape))
    if weight.ndim != 2 or weight.shape[1] != features:
        raise Fc2ConvError(
            f"the weight {weight.shape} does not take the {features} features of a flattened "
            f"{'x'.join(map(str, in_shape))} map"
        )
    return weight.reshape(weight.shape[0], *in_shape)


def conv_kernel_to_linear(kernel: np.ndarray, groups: int) -> np.ndarray:
    """``(O, C/g, 1, ...)`` -> block-diagonal ``(O, C)`` with exact zeros off the blocks."""
    if any(k != 1 for k in kernel.shape[2:]):
        raise Fc2ConvError(f"the kernel {kernel.shape} is not 1x1")
    out_ch, in_per_group = kernel.shape[:2]
    if groups < 1 or out_ch % groups:
        raise Fc2ConvError(f"{out_ch} output channels do not split into {groups} groups")
    matrix = kernel.reshape(out_ch, in_per_group)
    if groups == 1:
        return matrix
    out_g = out_ch // groups
    dense = np.zeros((out_ch, in_per_group * groups), dtype=kernel.dtype)
    for g in range(groups):
        rows = slice(g * out_g, (g + 1) * out_g)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = matrix[rows]
    return dense
