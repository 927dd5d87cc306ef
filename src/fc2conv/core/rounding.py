"""Floating-point rounding: unit roundoffs, Higham's forward-error bounds, ULP distances.

Model of arithmetic (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-3): each
operation is exact up to a relative error of at most the unit roundoff ``u``,
``fl(a op b) = (a op b)(1 + δ)`` with ``|δ| <= u``. For an inner product of length ``n``, in any
summation order,

    |fl(w·x) - w·x| <= γ_n |w|·|x|,        γ_n = n u / (1 - n u).

Propagated through an affine layer ``y = W x + b`` whose input already carries an absolute error
``e`` (``|x̂ - x| <= e``), the computed output satisfies, elementwise,

    |ŷ - y| <= |W| e + γ_{n+1} (|W| |x̂| + |b|)                            (``affine_bound``)

and a 1-Lipschitz pointwise op (ReLU, tanh, ...) passes ``e`` on unchanged plus ``u |ŷ|`` of its
own rounding. These are worst-case bounds: real errors are usually ~sqrt(n) u times the
magnitudes, so two correct implementations of the same layer differ by far less than the bound,
while a real bug (a wrong weight, a permuted input) exceeds it by orders of magnitude.

ULP distance: ``|a - b| / ulp(max(|a|, |b|, floor))`` where ``ulp(v)`` is the spacing of the
dtype at ``v``. Measuring against the spacing of the larger magnitude handles signs correctly
(reinterpreting floats as integers gives ~2e9 "ULPs" across zero), and the ``floor`` keeps values
that are zero up to rounding noise from counting denormal-sized ULPs.
"""

from __future__ import annotations

import math

import torch

# Unit roundoff u = 2^-p for a p-bit significand (round to nearest).
_UNIT_ROUNDOFF: dict[object, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    "tf32": 2.0**-11,  # TensorFloat-32: float32 range, 10 explicit significand bits
}


def unit_roundoff(dtype: torch.dtype | str) -> float:
    """``u`` of a floating dtype (``"tf32"`` for TensorFloat-32 matmuls/convs); 0 for integers
    and bool, whose arithmetic is exact."""
    if dtype in _UNIT_ROUNDOFF:
        return _UNIT_ROUNDOFF[dtype]
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        return 0.0
    if isinstance(dtype, torch.dtype):  # float8 and other floating types: from finfo
        return float(torch.finfo(dtype).eps) / 2
    raise ValueError(f"unknown dtype {dtype!r}")


def gamma(n: int, u: float) -> float:
    """Higham's ``γ_n = n u / (1 - n u)``; ``inf`` when ``n u >= 1`` (no bound exists)."""
    nu = n * u
    return math.inf if nu >= 1 else nu / (1 - nu)


def affine_bound(
    weight: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    in_error: torch.Tensor | None = None,
    u: float = 2.0**-24,
) -> torch.Tensor:
    """Elementwise bound on ``|ŷ - y|`` for ``y = x @ W.T + b`` (features on the last axis).

    ``|W| e + γ_{n+1} (|W| |x| + |b|)`` with ``n = W.shape[1]``; ``x`` is the computed input and
    ``in_error`` a bound on its absolute error (``None`` = exact). Computed in float64.
    """
    w_abs = weight.detach().double().abs()
    x_abs = x.detach().double().abs()
    magnitude = x_abs @ w_abs.T
    if bias is not None:
        magnitude = magnitude + bias.detach().double().abs()
    bound = gamma(weight.shape[1] + 1, u) * magnitude
    if in_error is not None:
        bound = bound + in_error.double() @ w_abs.T
    return bound


def conv_bound(
    weight: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    in_error: torch.Tensor | None = None,
    u: float = 2.0**-24,
    *,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Elementwise bound on ``|ŷ - y|`` for ``y = conv(x, W) + b`` (``x``: ``(N, C_in, *spatial)``).

    Each output is an inner product of length ``n = C_in/groups * prod(kernel)``, so
    ``|W| * e + γ_{n+1} (|W| * |x| + |b|)`` where ``*`` is the same convolution (zero padding
    adds exact zeros). Computed in float64.
    """
    import torch.nn.functional as F

    conv_fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]

    def conv(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return conv_fn(inp, w, None, stride, padding, dilation, groups)  # type: ignore[arg-type]

    w_abs = weight.detach().double().abs()
    magnitude = conv(x.detach().double().abs(), w_abs)
    if bias is not None:
        magnitude = magnitude + bias.detach().double().abs().reshape(1, -1, *[1] * (x.dim() - 2))
    n = weight[0].numel()
    bound = gamma(n + 1, u) * magnitude
    if in_error is not None:
        bound = bound + conv(in_error.double(), w_abs)
    return bound


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at ``|values|`` (float64 result): ``2^(floor(log2|v|)) * eps``,
    never below the spacing at the smallest normal number."""
    info = torch.finfo(dtype)
    mag = values.detach().double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def ulp_distance(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None, floor: float = 0.0
) -> torch.Tensor:
    """``|a - b|`` in units in the last place of ``dtype`` at ``max(|a|, |b|, floor)``.

    Sign-safe (``-x`` and ``x`` are ``2|x|/ulp(x)`` apart, not 2e9), and ``floor`` (e.g. the
    output scale times ``u``) stops near-zero values from counting tiny ULPs. Integer dtypes:
    the plain difference. NaN where either side is NaN.
    """
    dtype = dtype or a.dtype
    diff = (a.detach().double() - b.detach().double()).abs()
    if not dtype.is_floating_point:
        return diff
    mag = torch.maximum(a.detach().double().abs(), b.detach().double().abs()).clamp_min(floor)
    return diff / ulp(mag, dtype)


def relative_error(a: torch.Tensor, reference: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """``|a - ref| / max(|ref|, floor)``: the floor (e.g. a fraction of the output's scale) keeps
    outputs that are ~0 from producing huge relative errors."""
    ref = reference.detach().double()
    denom = ref.abs().clamp_min(floor if floor > 0 else torch.finfo(torch.float64).tiny)
    return (a.detach().double() - ref).abs() / denom
