"""Exact layer-level translations between fully connected layers and convolutions.

The maths, for a Linear ``y = W x + b`` with ``W`` of shape ``(O, C)``:

* **Linear -> 1x1 conv.** ``Conv(C, O, kernel=1)`` with ``K[o, c, 0..] = W[o, c]`` computes
  ``y[:, p] = W x[:, p] + b`` at every position ``p`` of an ``(N, C, *spatial)`` map: the same
  dense layer, shared across positions.
* **1x1 conv -> Linear.** The reverse; with ``groups = g`` the Linear weight is block diagonal,
  ``W = diag(K_1, ..., K_g)`` with ``K_i`` of shape ``(O/g, C/g)`` and exact zeros elsewhere.
* **Flattened map -> conv.** A Linear over ``flatten(x)`` of a ``(C, *S)`` map is a conv whose
  kernel is the whole map: ``K = W.reshape(O, C, *S)`` for PyTorch's ``"chw"`` flatten, or
  ``K = W.reshape(O, *S, C).movedim(-1, 1)`` for a channels-last (``"hwc"``) flatten. On an input
  of exactly ``S`` the conv output is ``(N, O, 1, ...)`` and equals the Linear output; on a
  larger input the kernel slides (OverFeat's "convolutionalized" classifier).
* **Conv covering its input -> Linear.** Its exact dense matrix (:func:`fc2conv.as_matrix`),
  with columns re-ordered for ``"hwc"``.

Every function returns a new module with new, independent parameters, on the same device and
dtype as its input, records its provenance (:mod:`fc2conv.core.provenance`) and leaves its input
untouched.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

from fc2conv.core.describe import ConvNd, describe, shape_str
from fc2conv.core.pointwise_conv import pointwise_class
from fc2conv.core.provenance import mark
from fc2conv.core.shapes import as_shape, check_order, mismatch_message
from fc2conv.errors import Fc2ConvError

_CONV_BY_DIMS: dict[int, type[ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_class(dims: int) -> type[ConvNd]:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` for ``dims`` in 1..3."""
    try:
        if isinstance(dims, bool):
            raise TypeError
        return _CONV_BY_DIMS[operator.index(dims)]
    except (KeyError, ValueError, TypeError):
        raise Fc2ConvError(f"dims must be 1, 2 or 3 (Conv1d/2d/3d), got {dims!r}") from None


def _require(module: nn.Module, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(module, kind) or isinstance(
        module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
    ):
        raise Fc2ConvError(f"expected {what}, got {type(module).__name__}")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        raise Fc2ConvError(
            f"{type(module).__name__} has uninitialized (lazy) parameters; run the model once "
            f"on an example input so their shapes are known, then convert"
        )


def _new_conv(
    cls: type[ConvNd], weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1
) -> ConvNd:
    out_ch, in_per_group, *kernel = weight.shape
    conv = cls(
        in_per_group * groups,
        out_ch,
        kernel_size=tuple(kernel),  # type: ignore[arg-type]
        bias=bias is not None,
        groups=groups,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)  # type: ignore[union-attr]
    conv.train(True)
    return conv


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _keep_grad(new: nn.Module, old: nn.Module) -> None:
    """Give ``new``'s weight and bias the ``requires_grad`` of ``old``'s (a frozen layer stays
    frozen)."""
    for name in ("weight", "bias"):
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, nn.Parameter):
            dst.requires_grad_(src.requires_grad)


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def linear_to_conv(linear: nn.Linear, dims: int = 2, *, source: str | None = None) -> ConvNd:
    """``nn.Linear(C, O)`` -> ``nn.Conv{dims}d(C, O, kernel_size=1)`` computing the same map at
    every position of an ``(N, C, *spatial)`` input: ``K[o, c, 0, ...] = W[o, c]``, same bias.

    The result is a :class:`~fc2conv.core.pointwise_conv.PointwiseConv2d` (``1d``, ``3d``): an
    ``nn.Conv{dims}d`` subclass (same parameters and state-dict keys) that in eager PyTorch
    runs ``F.linear`` on the free channels-last view of a channels-last input, and the plain
    convolution otherwise and in captured graphs.

    ``bias=None`` stays ``None``; dtype, device and ``requires_grad`` are kept; parameters are
    new copies.
    """
    _require(linear, nn.Linear, "an nn.Linear")
    conv_class(dims)  # refuses dims outside 1..3 in one sentence
    cls = pointwise_class(operator.index(dims))
    weight = linear.weight.detach().reshape(*linear.weight.shape, *([1] * int(dims)))
    conv = _new_conv(cls, weight, _bias(linear))
    conv.train(linear.training)
    _keep_grad(conv, linear)
    return mark(conv, source, describe(linear))  # type: ignore[return-value]


def _per_position_reason(conv: ConvNd) -> str | None:
    """Why ``conv`` is not one linear map applied independently at each position, or ``None``."""
    kernel = tuple(conv.kernel_size)
    if any(k != 1 for k in kernel):
        return (
            f"its {shape_str(kernel)} kernel mixes neighbouring positions, so it is not one "
            f"linear map per position"
        )
    if any(s != 1 for s in conv.stride):
        return f"its stride {shape_str(conv.stride)} skips positions, so the output grid differs"
    padding = conv.padding
    if not isinstance(padding, str) and any(p != 0 for p in padding):
        return f"its padding {shape_str(padding)} adds border positions that see only padding"
    return None


def conv_to_linear(conv: ConvNd, *, source: str | None = None) -> nn.Linear:
    """A per-position conv (kernel of ones, stride 1, no padding) -> the ``nn.Linear`` it applies
    at every position. With ``groups = g`` the weight is block diagonal with exact zeros off the
    blocks: ``W[o, c] = K[o, c - g(o) C/g]`` when ``c`` is in group ``g(o)``, else 0.

    Use it on a channels-last view: ``linear(x.movedim(1, -1)).movedim(-1, 1) == conv(x)``.
    Raises :class:`~fc2conv.errors.Fc2ConvError` (a ``ValueError``) for any other conv.
    """
    _require(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d), "an nn.Conv1d/2d/3d")
    reason = _per_position_reason(conv)
    if reason is not None:
        raise Fc2ConvError(
            f"Cannot convert {describe(conv)} to a Linear: {reason}. Use "
            f"fc2conv.as_matrix(conv, in_shape) for its exact dense matrix over a given input, "
            f"or conv_to_flatten_linear if the kernel covers the whole input"
        )
    groups = conv.groups
    weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels // groups)
    out_g = conv.out_channels // groups
    dense = torch.block_diag(*(weight[g * out_g : (g + 1) * out_g] for g in range(groups)))
    lin = _new_linear(dense, _bias(conv))
    lin.train(conv.training)
    _keep_grad(lin, conv)
    return mark(lin, source, describe(conv))  # type: ignore[return-value]


def flatten_linear_to_conv(
    linear: nn.Linear,
    in_shape: Sequence[int],
    order: str = "chw",
    *,
    source: str | None = None,
) -> ConvNd:
    """A Linear over a flattened ``(C, *S)`` map -> a conv with kernel ``S`` (1-3 spatial dims).

    ``order="chw"``: the input was ``x.flatten(1)`` of an ``(N, C, *S)`` map (PyTorch), so
    ``K = W.reshape(O, C, *S)``. ``order="hwc"``: it was the flatten of a channels-last
    ``(N, *S, C)`` map (TensorFlow/Keras, or a permute before flatten), so
    ``K = W.reshape(O, *S, C).movedim(-1, 1)``. The conv maps ``(N, C, *S)`` to ``(N, O, 1, ...)``
    equal to the Linear's output; on larger inputs it slides with stride 1.
    """
    _require(linear, nn.Linear, "an nn.Linear")
    order = check_order(order)
    shape = as_shape(in_shape, min_len=2, max_len=4)
    if math.prod(shape) != linear.in_features:
        reason = mismatch_message(linear.in_features, shape)
        raise Fc2ConvError(f"Cannot convert {describe(linear)} to a conv: {reason}")
    channels, spatial = shape[0], shape[1:]
    weight = linear.weight.detach()
    if order == "chw":
        kernel = weight.reshape(linear.out_features, channels, *spatial)
    else:
        kernel = weight.reshape(linear.out_features, *spatial, channels).movedim(-1, 1)
    conv = _new_conv(conv_class(len(spatial)), kernel.contiguous(), _bias(linear))
    conv.train(linear.training)
    _keep_grad(conv, linear)
    return mark(conv, source, describe(linear))  # type: ignore[return-value]


def conv_to_flatten_linear(
    conv: ConvNd,
    in_shape: Sequence[int],
    order: str = "chw",
    *,
    source: str | None = None,
) -> nn.Linear:
    """A conv whose output on ``in_shape = (C, *S)`` has spatial size 1 (its kernel covers the
    whole input) -> the Linear over the flattened input: ``W = as_matrix(conv, in_shape)``, whose
    columns are re-ordered to channels-last for ``order="hwc"``.
    ``linear(x.flatten(1)) == conv(x).flatten(1)`` for ``"chw"``.
    """
    from fc2conv.core.matrix import as_matrix, conv_output_shape

    _require(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d), "an nn.Conv1d/2d/3d")
    order = check_order(order)
    shape = as_shape(in_shape, min_len=2, max_len=4)
    out_shape = conv_output_shape(conv, shape)
    if any(s != 1 for s in out_shape[1:]):
        raise Fc2ConvError(
            f"Cannot convert {describe(conv)} to one Linear over the flattened input "
            f"{shape_str(shape)}: its output there has spatial size {shape_str(out_shape[1:])}, "
            f"not 1; only a conv whose kernel covers its whole input is one Linear "
            f"(use fc2conv.as_matrix for the general case)"
        )
    matrix = as_matrix(conv, shape, order=order)
    lin = _new_linear(matrix, _bias(conv))
    lin.train(conv.training)
    _keep_grad(lin, conv)
    return mark(lin, source, describe(conv))  # type: ignore[return-value]
