"""1x1 convolutions that run as the Linear they are when the memory allows it.

A pointwise conv (kernel 1, stride 1, padding 0, dilation 1, groups 1) with weight
``K (O, C, 1, ...)`` and bias ``b`` computes, at every position ``p`` of an ``(N, C, *S)`` map,

    y[n, o, p] = sum_c K[o, c] x[n, c, p] + b[o]

which is ``F.linear`` over the channels-last view: ``y = linear(x.movedim(1, -1), K.view(O, C),
b).movedim(-1, 1)``. In eager PyTorch :class:`PointwiseConv2d` always runs it that way: the GEMM
of the original Linear, often bit-identical, without the fixed cost of a CPU convolution call
(about 100 us per oneDNN call at small sizes against ~10 us). When ``x``'s memory is
channels-last (what ``to_conv``'s move in and every 1x1 conv after it give) the view is free;
on NCHW-contiguous or other strides ``F.linear`` gathers the view first (one copy of ``x``),
which measured cheaper than the convolution call on every zoo model (Whisper's encoder, whose
activations stay NCHW-contiguous after its own conv front end, went from 2.06x to 1.24x the
original; ViT's classifier on a strided CLS-token slice from 1.25x to 1.08x;
``bench/converted_overhead.py --quick --plain``, 2 threads). Its output is channels-last, so
the next converted layer's view is free. A kernel that is not pointwise, an unbatched input,
and whenever a graph is being captured (:func:`capturing`: ``torch.export``, the ONNX
exporters, ``torch.compile``, ``torch.jit.trace``, ``fx`` proxies) run the plain convolution,
so exported graphs record a ``Conv``.

The classes are ``nn.Conv1d/2d/3d`` subclasses: same parameters, same state-dict keys,
``isinstance(m, nn.Conv2d)`` holds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv1d", "PointwiseConv2d", "PointwiseConv3d", "capturing",
           "pointwise_class"]


def capturing() -> bool:
    """Whether a graph is being captured (torch.export, dynamo, the ONNX tracer). Then the
    conv-layout modules record their transpose-free form (what a Neural-Engine converter
    reads); in eager PyTorch they may run a faster kernel on a free view of the same memory."""
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling()
                or torch.jit.is_tracing())


class _Pointwise:
    """The eager forward shared by :class:`PointwiseConv1d`, ``2d`` and ``3d``. The weight is
    the conv's ``(O, C/g, 1, ...)`` kernel or, for a tied weight
    (:class:`~fc2conv.pytorch.weights.SharedWeightConv2d`, ``tied_matrix = True``), the
    Linear's ``(O, C)`` matrix."""

    tied_matrix = False

    def is_pointwise(self) -> bool:
        """Kernel 1, stride 1, padding 0, dilation 1, groups 1: one ``(O, C)`` map per
        position."""
        me: Any = self
        ones = (1,) * len(me.kernel_size)
        return bool(me.groups == 1 and tuple(me.kernel_size) == ones
                    and tuple(me.stride) == ones and tuple(me.dilation) == ones
                    and (me.padding == "valid" or (not isinstance(me.padding, str)
                                                   and not any(me.padding))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        me: Any = self
        spatial = len(me.kernel_size)
        if isinstance(x, torch.Tensor) and x.dim() == spatial + 2 and self.is_pointwise() \
                and not capturing():
            # the conv is the Linear of the (N, *S, C) view: y = linear(view, K.view(O, C), b),
            # viewed back as (N, O, *S) (free on channels-last memory, one gather otherwise).
            # parameters read from _parameters when they live there: a dict look-up, not
            # the 0.6 us attribute path (.get(k, default) would take that path eagerly)
            params = me._parameters
            weight = params["weight"] if "weight" in params else me.weight  # noqa: SIM401
            bias = params["bias"] if "bias" in params else me.bias  # noqa: SIM401
            return F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)
        weight = me.weight
        if self.tied_matrix:  # a tied (O, C) weight: the kernel K = W.reshape(O, C, 1, ...)
            weight = weight.reshape(me.out_channels, me.in_channels, *([1] * spatial))
        return me._conv_forward(x, weight, me.bias)  # type: ignore[no-any-return]


class PointwiseConv1d(_Pointwise, nn.Conv1d):
    """:class:`nn.Conv1d` that runs as ``F.linear`` on the channels-last view of an ``(N, C, L)``
    input in eager when it is pointwise (see :mod:`fc2conv.core.pointwise_conv`)."""


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    """:class:`nn.Conv2d` that runs as ``F.linear`` on the channels-last view of an
    ``(N, C, H, W)`` input (free on ``to_conv``'s positions-major ``(B, C, 1, S)``) in eager when
    it is pointwise (see
    :mod:`fc2conv.core.pointwise_conv`)."""


class PointwiseConv3d(_Pointwise, nn.Conv3d):
    """:class:`nn.Conv3d` that runs as ``F.linear`` on the channels-last view of an
    ``(N, C, D, H, W)`` input in eager when it is pointwise (see
    :mod:`fc2conv.core.pointwise_conv`)."""


_BY_DIMS: dict[int, type[nn.Conv1d | nn.Conv2d | nn.Conv3d]] = {
    1: PointwiseConv1d, 2: PointwiseConv2d, 3: PointwiseConv3d}


def pointwise_class(dims: int) -> type[nn.Conv1d | nn.Conv2d | nn.Conv3d]:
    """``PointwiseConv{dims}d`` for ``dims`` in 1..3 (``KeyError`` otherwise)."""
    return _BY_DIMS[dims]
