"""The stride-1 average pool of a dense GAP head, computed as a box filter of running sums.

``convolutionalize(global_pool="dense")`` turns a global average pool over the training-size
feature map ``S`` into ``AvgPool(S, stride=1)``: cell ``p`` is the mean of the ``S`` window at
``p``. PyTorch's pooling kernel spends ``prod(S)`` additions per cell, so on a large image this
pool, not the convolutions, dominated the dense run (measured: 2/3 of a ResNet-style map).

:class:`BoxMean` computes the same means with a cumulative sum per axis (an integral image,
separable): along an axis of length ``n`` with window ``k``,

    c[0] = 0,  c[i] = x[0] + ... + x[i-1]        (float64)
    y[p] = c[p + k] - c[p]                       (p = 0 .. n - k)

applied axis after axis, then divided by ``prod(S)`` and rounded once to the input's dtype.
The sums run in float64, so each cell is the exact window mean up to float64 rounding
(relative ``~n * 2^-53``), far inside float32's own: it is never less accurate than the pool
it replaces, and costs O(1) per cell whatever ``S``.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)

_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
MIN_WINDOW = 16  # below this many pixels per window the plain pool is as fast


class BoxMean(nn.Module):
    """``AvgPoolNd(kernel, stride=1, padding=0)`` as float64 running sums (see the module)."""

    def __init__(self, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.kernel = tuple(int(k) for k in kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = len(self.kernel)
        y = x.to(torch.float64)
        for axis, k in zip(range(x.dim() - dims, x.dim()), self.kernel, strict=True):
            n = y.shape[axis]
            shape = list(y.shape)
            shape[axis] = n + 1
            c = y.new_empty(shape)  # c[0] = 0, c[i] = x[0] + ... + x[i-1]: no concatenation
            c.narrow(axis, 0, 1).zero_()
            torch.cumsum(y, dim=axis, out=c.narrow(axis, 1, n))
            y = c.narrow(axis, k, n + 1 - k) - c.narrow(axis, 0, n + 1 - k)
        return (y / math.prod(self.kernel)).to(x.dtype)


def _replaceable(module: nn.Module) -> tuple[int, ...] | None:
    """The kernel of a stride-1, unpadded average pool worth replacing, else ``None``."""
    if not isinstance(module, _AVG):
        return None
    dims = _AVG.index(type(module)) + 1

    def per_axis(v: object) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims  # type: ignore[call-overload]

    kernel, stride, padding = (per_axis(module.kernel_size), per_axis(module.stride),
                               per_axis(module.padding))
    if (any(s != 1 for s in stride) or any(p != 0 for p in padding)
            or getattr(module, "divisor_override", None) is not None
            or math.prod(kernel) < MIN_WINDOW):
        return None
    return kernel


def fast_pools(net: nn.Module, *, owned: bool) -> nn.Module:
    """``net`` with every large stride-1 average pool module a :class:`BoxMean`.

    ``owned``: ``net`` may be changed in place; otherwise a copy is changed (the caller's
    module is never touched) and only when there is something to replace."""
    found = [(name, k) for name, m in net.named_modules()
             if name and (k := _replaceable(m)) is not None]
    if not found:
        return net
    if not owned:
        net = copy.deepcopy(net)
    for name, kernel in found:
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, attr, BoxMean(kernel))
        log.info("dense map: the stride-1 average pool %r over %s runs as float64 running "
                 "sums (box filter)", name, kernel)
    return net
