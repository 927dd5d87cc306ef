"""The exact matrix of a convolution (or a Linear applied at every position).

For a module ``f`` and an input shape ``(C, *S)``, ``as_matrix`` returns ``M`` with

    f(x).flatten() == M @ x.flatten() + b        (b from :func:`as_affine`)

for every ``x`` of shape ``(C, *S)``. Rows index outputs ``(o, *p_out)`` and columns inputs
``(c, *p_in)`` in C order (channel-major, ``order="chw"``), or position-major with
``order="hwc"`` (channels-last flattening).

Entry by entry, for a conv with weight ``K`` of shape ``(O, C/g, *k)``, stride ``s``, padding
``l``, dilation ``d`` and ``g`` groups, output channel ``o`` in group ``γ(o)``:

    M[(o, p), (γ(o) C/g + c, i)] = Σ_t K[o, c, t]  over taps t with  pad(p s + t d - l) = i

where ``pad`` maps a padded coordinate into the input (zeros: dropped when outside; circular:
modulo; reflect/replicate: mirrored/clamped, which is why several taps may add up in one entry).
A 1x1 conv (or a Linear, treated as one) gives ``M = W ⊗ I_P`` in C order and the block diagonal
``I_P ⊗ W`` — one copy of ``W`` per position — in ``"hwc"`` order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fc2conv.core.describe import ConvNd, describe, shape_str
from fc2conv.core.shapes import as_shape, check_order
from fc2conv.errors import Fc2ConvError


def _paddings(conv: ConvNd) -> list[tuple[int, int]]:
    """(left, right) zero-padding per spatial dim, with PyTorch's rule for ``padding='same'``."""
    dims = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [(0, 0)] * dims
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in total]
    return [(int(p), int(p)) for p in conv.padding]


def _check_in_shape(module: nn.Module, shape: tuple[int, ...], dims: int, channels: int) -> None:
    if len(shape) != dims + 1:
        raise Fc2ConvError(
            f"{describe(module)} expects in_shape (C, *spatial) with {dims} spatial "
            f"dimension{'s' if dims != 1 else ''}, got {shape}"
        )
    if shape[0] != channels:
        raise Fc2ConvError(
            f"{describe(module)} expects {channels} input channels, in_shape {shape} has {shape[0]}"
        )


def conv_output_shape(conv: ConvNd, in_shape: Sequence[int]) -> tuple[int, ...]:
    """``(O, *out_spatial)`` of ``conv`` applied to an input of shape ``in_shape = (C, *S)``."""
    shape = as_shape(in_shape, min_len=2, max_len=4)
    _check_in_shape(conv, shape, len(conv.kernel_size), conv.in_channels)
    out = []
    for size, (left, right), k, s, d in zip(
        shape[1:], _paddings(conv), conv.kernel_size, conv.stride, conv.dilation, strict=True
    ):
        n = (size + left + right - d * (k - 1) - 1) // s + 1
        if n <= 0:
            raise Fc2ConvError(
                f"{describe(conv)} cannot run on in_shape {shape}: the (dilated) kernel is larger "
                f"than the padded input"
            )
        out.append(n)
    return (conv.out_channels, *out)


def _axis_index(
    size: int, out: int, k: int, stride: int, dilation: int, left: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one spatial axis: input index ``i[p, t]`` read by output ``p`` through tap ``t``,
    and whether that read is a real input (False where it falls on zero padding)."""
    pos = torch.arange(out).unsqueeze(1) * stride + torch.arange(k).unsqueeze(0) * dilation - left
    if mode == "zeros":
        valid = (pos >= 0) & (pos < size)
        return pos.clamp(0, size - 1), valid
    if mode == "circular":
        idx = pos % size
    elif mode == "replicate":
        idx = pos.clamp(0, size - 1)
    elif mode == "reflect":
        period = 2 * (size - 1) if size > 1 else 1
        idx = pos.abs() % period
        idx = torch.where(idx >= size, period - idx, idx)
    else:  # pragma: no cover - torch rejects other modes at construction
        raise Fc2ConvError(f"unsupported padding_mode {mode!r}")
    return idx, torch.ones_like(idx, dtype=torch.bool)


def _conv_entries(
    conv: ConvNd, shape: tuple[int, ...], order: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """COO entries ``(rows, cols, vals)`` of the conv's matrix and its size (may repeat)."""
    out_shape = conv_output_shape(conv, shape)
    channels, spatial, out_spatial = shape[0], shape[1:], out_shape[1:]
    dims = len(spatial)
    n_in, n_out = math.prod(spatial), math.prod(out_spatial)
    # Flat input index and validity over (p_1..p_d, t_1..t_d), built axis by axis.
    in_flat = torch.zeros([1] * (2 * dims), dtype=torch.int64)
    valid = torch.ones([1] * (2 * dims), dtype=torch.bool)
    for axis, (size, out, k, s, d, (left, _)) in enumerate(
        zip(
            spatial,
            out_spatial,
            conv.kernel_size,
            conv.stride,
            conv.dilation,
            _paddings(conv),
            strict=True,
        )
    ):
        idx, ok = _axis_index(size, out, k, s, d, left, conv.padding_mode)
        view = [1] * (2 * dims)
        view[axis], view[dims + axis] = out, k
        in_flat = in_flat * size + idx.reshape(view)
        valid = valid & ok.reshape(view)
    taps = math.prod(conv.kernel_size)
    in_flat = in_flat.expand(*out_spatial, *conv.kernel_size).reshape(n_out, taps)
    valid = valid.expand(*out_spatial, *conv.kernel_size).reshape(n_out, taps)
    pos, tap = valid.nonzero(as_tuple=True)  # pairs (output position, tap) that read an input
    src = in_flat[pos, tap]

    out_ch, groups = conv.out_channels, conv.groups
    in_g, out_g = channels // groups, out_ch // groups
    weight = conv.weight.detach().reshape(out_ch, in_g, taps)
    o = torch.arange(out_ch, device=weight.device).view(-1, 1, 1)
    c = (o // out_g) * in_g + torch.arange(in_g, device=weight.device).view(1, -1, 1)
    pos_d, src_d, tap_d = (t.to(weight.device).view(1, 1, -1) for t in (pos, src, tap))
    vals = weight[:, :, tap_d.view(-1)]  # (O, C/g, n)
    if order == "chw":
        rows = o * n_out + pos_d
        cols = c * n_in + src_d
    else:
        rows = pos_d * out_ch + o
        cols = src_d * channels + c
    size = (out_ch * n_out, channels * n_in)
    rows = rows.expand_as(vals).reshape(-1)
    return rows, cols.expand_as(vals).reshape(-1), vals.reshape(-1), size


def _module_as_conv(module: nn.Module, shape: tuple[int, ...]) -> ConvNd | None:
    """A Linear applied at every position of ``(C, *S)`` is a 1x1 conv; ``None`` when S is empty."""
    if isinstance(module, nn.Linear):
        _check_in_shape(module, shape, len(shape) - 1, module.in_features)
        if len(shape) == 1:
            return None
        from fc2conv.core.layers import linear_to_conv

        return linear_to_conv(module, dims=len(shape) - 1)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return module
    raise Fc2ConvError(
        f"as_matrix supports nn.Linear and nn.Conv1d/2d/3d, got {type(module).__name__}"
    )


def as_matrix(
    module: nn.Module, in_shape: Sequence[int], sparse: bool = False, *, order: str = "chw"
) -> torch.Tensor:
    """The exact matrix ``M`` with ``module(x).flatten() == M @ x.flatten() + bias_term``.

    ``module``: ``nn.Conv1d/2d/3d`` (any stride, padding and padding mode, dilation, groups,
    non-square kernel) or ``nn.Linear`` (applied at every position of ``in_shape = (C, *S)``,
    or plain ``W`` when ``in_shape = (C,)``). ``in_shape`` excludes the batch dimension.
    ``sparse=True`` returns a coalesced torch sparse COO tensor and never materialises the dense
    matrix, so it works where that would not fit in memory. ``order``: ``"chw"`` (C order,
    default) or ``"hwc"`` (channels-last flattening of inputs and outputs).
    The bias term is returned by :func:`as_affine`.
    """
    order = check_order(order)
    shape = as_shape(in_shape, min_len=1, max_len=4)
    conv = _module_as_conv(module, shape)
    if conv is None:  # Linear on a plain vector
        weight = torch.as_tensor(module.weight).detach()
        return weight.to_sparse_coo() if sparse else weight.clone()
    rows, cols, vals, size = _conv_entries(conv, shape, order)
    if sparse:
        indices = torch.stack([rows, cols])
        return torch.sparse_coo_tensor(indices, vals, size, check_invariants=False).coalesce()
    n_elements = size[0] * size[1]
    if n_elements > 2**31:
        raise Fc2ConvError(
            f"the dense matrix of {describe(module)} on {shape_str(shape)} would have "
            f"{size[0]} x {size[1]} entries; pass sparse=True"
        )
    dense = torch.zeros(size, dtype=vals.dtype, device=vals.device)
    dense.index_put_((rows, cols), vals, accumulate=True)
    return dense


def as_affine(
    module: nn.Module, in_shape: Sequence[int], sparse: bool = False, *, order: str = "chw"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, b)`` with ``module(x).flatten() == M @ x.flatten() + b``; ``b`` is the bias repeated
    at every output position (zeros without bias), flattened in the same ``order`` as ``M``."""
    matrix = as_matrix(module, in_shape, sparse, order=order)
    rows = matrix.shape[0]
    bias = getattr(module, "bias", None)
    channels = int(torch.as_tensor(module.weight).shape[0])  # Linear and Conv: (O, ...)
    positions = rows // channels
    if bias is None:
        vec = torch.zeros(rows, dtype=matrix.dtype, device=matrix.device)
    elif order == "chw":
        vec = bias.detach().repeat_interleave(positions)
    else:
        vec = bias.detach().repeat(positions)
    return matrix, vec
