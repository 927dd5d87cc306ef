"""Independent float64 references used by the tests: plain einsum/matmul, never fc2conv code."""

from __future__ import annotations

import math

import torch


def linear_per_position(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y[n, o, *p] = Σ_c W[o, c] x[n, c, *p] + b[o]`` in float64."""
    y = torch.einsum("oc,nc...->no...", weight.double(), x.double())
    if bias is not None:
        y = y + bias.double().reshape(1, -1, *([1] * (x.dim() - 2)))
    return y


def magnitude_per_position(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``|W| |x| + |b|`` per output, the scale of a per-position dot product's rounding error."""
    return linear_per_position(x.abs(), weight.abs(), None if bias is None else bias.abs())


def dot_tolerance(dtype: torch.dtype, n: int, magnitude: torch.Tensor) -> torch.Tensor:
    """Higham's ``γ_{n+1} (|W||x| + |b|)`` for a length-n dot product plus bias, in ``dtype``,
    plus a little slack for the final rounding of the output to ``dtype``."""
    u = torch.finfo(dtype).eps / 2
    gamma = (n + 1) * u / (1 - (n + 1) * u)
    return gamma * magnitude + 2 * u * magnitude + torch.finfo(dtype).tiny


def probe_matrix(fn, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of an affine map, column by column: ``M[:, i] = fn(e_i) - fn(0)`` in float64."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    zero = fn(torch.zeros(1, *in_shape, dtype=torch.float64)).reshape(-1)
    cols = fn(basis).reshape(n, -1) - zero
    return cols.T
