"""Receptive-field arithmetic of sliding-window layers (convolutions and pools), per axis.

For one spatial axis a feature map is described by three integers, in input pixels:

* ``size``  — how many consecutive input pixels one cell depends on,
* ``jump``  — the distance in input pixels between two neighbouring cells (the product of the
  strides so far),
* ``start`` — the first input pixel that cell 0 depends on (negative when padding is involved).

Cell ``i`` depends on input pixels ``[start + i * jump, start + i * jump + size)``. A layer with
kernel ``k``, stride ``s``, padding ``p`` (on the low side) and dilation ``d`` maps
``(size, jump, start)`` to ``(size + d (k - 1) jump, jump s, start - p jump)``. Output lengths
follow PyTorch: ``floor((n + 2p - d (k - 1) - 1) / s) + 1``, with ``ceil`` in ``ceil_mode``
(and the last window must start inside the input or the low padding).

Pure functions; the graph walk that applies them to a model lives in
:mod:`fc2conv.pytorch.receptive_field`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fc2conv.errors import Fc2ConvError


@dataclass(frozen=True)
class AxisField:
    """Receptive field of a feature map along one axis: ``size``, ``jump``, ``start`` (pixels)."""

    size: int = 1
    jump: int = 1
    start: int = 0

    def through(self, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
                ) -> AxisField:
        """The field after a sliding window ``(kernel, stride, padding, dilation)``."""
        if kernel < 1 or stride < 1 or dilation < 1 or padding < 0:
            raise Fc2ConvError(
                f"invalid window: kernel {kernel}, stride {stride}, padding {padding}, "
                f"dilation {dilation}"
            )
        return AxisField(
            size=self.size + dilation * (kernel - 1) * self.jump,
            jump=self.jump * stride,
            start=self.start - padding * self.jump,
        )

    def padded(self, low: int) -> AxisField:
        """The field after ``low`` pixels of explicit padding on the low side (negative:
        cropping): cell 0 now starts ``low`` cells earlier, ``start - low * jump``."""
        return AxisField(size=self.size, jump=self.jump, start=self.start - low * self.jump)

    def through_transposed(self, kernel: int, stride: int = 1, padding: int = 0,
                           dilation: int = 1) -> AxisField:
        """The field after a transposed convolution, which computes ``out[o] += in[i] w[k]``
        for ``o = i s - p + k d``.

        With ``s = 1`` output cell ``o`` reads input cells ``o + p - d (k - 1) .. o + p``: the
        convolution with padding ``d (k - 1) - p`` (negative: a crop), so the field is defined.
        With ``s > 1`` output cells at different phases of the stride read different numbers
        of input cells and step by ``1/s`` of an input cell: no single field describes them.
        """
        if kernel < 1 or stride < 1 or dilation < 1:
            raise Fc2ConvError(
                f"invalid transposed window: kernel {kernel}, stride {stride}, dilation {dilation}"
            )
        if stride != 1:
            raise Fc2ConvError(
                f"a transposed convolution with stride {stride} spreads each input cell over "
                f"{stride} output cells whose windows differ in size and do not step by whole "
                f"input pixels, so its output has no receptive field"
            )
        reach = dilation * (kernel - 1)
        return AxisField(size=self.size + reach * self.jump, jump=self.jump,
                         start=self.start + (padding - reach) * self.jump)

    def union(self, other: AxisField) -> AxisField:
        """The field of a value combining two aligned maps (residual add, concat).

        Both maps must step by the same ``jump``: otherwise their cells do not correspond.
        """
        if self.jump != other.jump:
            raise Fc2ConvError(
                f"the branches do not align: one steps {self.jump} input pixels per cell, the "
                f"other {other.jump}"
            )
        start = min(self.start, other.start)
        end = max(self.start + self.size, other.start + other.size)
        return AxisField(size=end - start, jump=self.jump, start=start)


def output_length(n: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                  ceil_mode: bool = False) -> int:
    """PyTorch's output length of a conv or pool over ``n`` input pixels (at least 0)."""
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    if ceil_mode:
        out = -(-span // stride) + 1
        # PyTorch: the last window must start inside the input or the low padding.
        if (out - 1) * stride >= n + padding:
            out -= 1
        return out
    return span // stride + 1


def has_partial_window(n: int, kernel: int, stride: int = 1, padding: int = 0,
                       dilation: int = 1, ceil_mode: bool = False) -> bool:
    """Whether the last window of a ``ceil_mode`` pool hangs over the end of the input."""
    out = output_length(n, kernel, stride, padding, dilation, ceil_mode)
    return out > 0 and (out - 1) * stride + dilation * (kernel - 1) + 1 > n + 2 * padding


def adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` windows of PyTorch's adaptive pooling from ``n_in`` to ``n_out``."""
    return [
        (math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)) for i in range(n_out)
    ]


def adaptive_as_fixed(n_in: int, n_out: int) -> int | None:
    """The kernel (= stride) of the fixed pool equal to adaptive pooling ``n_in -> n_out``.

    ``1`` means the identity. ``None`` when no fixed pool is equal: the adaptive windows then
    have varying sizes or overlap (e.g. 13 -> 7 uses windows of 2 and 3 pixels).
    """
    if n_out <= 0 or n_in < n_out or n_in % n_out:
        return None
    return n_in // n_out


@dataclass(frozen=True)
class ReceptiveField:
    """Which input pixels each cell of a dense output map sees.

    Per spatial axis: ``size`` (pixels one cell depends on), ``stride`` (pixels between cells),
    ``padding`` (how far cell 0's field reaches before the input, ``-start``).
    ``window_size`` is the classifier's input size for a convolutionalized classifier (the
    ``input_shape`` it was trained on); ``window(i, j)`` is then the crop that cell ``(i, j)``
    classifies. ``exact`` says whether every cell equals the classifier run on its window
    (true without padding); ``reason`` names the layer that breaks it.
    ``output_size`` is the dense map's size on ``input_size``.
    """

    size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    window_size: tuple[int, ...]
    window_offset: tuple[int, ...]
    exact: bool
    reason: str | None = None

    def window(self, *index: int) -> tuple[int, ...]:
        """``window(i, j) -> (top, left, bottom, right)`` (bottom/right exclusive): the input
        window that cell ``(i, j)`` reports on. One index per spatial axis; in general the
        result is all starts followed by all ends."""
        if len(index) != len(self.stride):
            raise Fc2ConvError(
                f"window() takes {len(self.stride)} cell indices (one per spatial axis), "
                f"got {len(index)}"
            )
        starts = tuple(o + int(i) * s for i, s, o in zip(index, self.stride, self.window_offset,
                                                          strict=True))
        ends = tuple(a + w for a, w in zip(starts, self.window_size, strict=True))
        return starts + ends

    def cells_inside(self, input_size: tuple[int, ...]) -> tuple[range, ...]:
        """Per axis, the cell indices whose whole window lies inside an input of
        ``input_size``: ``0 <= offset + i * stride`` and ``offset + i * stride + window <= n``.

        With padding the offset is negative and the first cells' windows start before the
        image (over padding), so the range need not start at 0; the last cells may reach past
        the far edge, over pixels that the classifier ignores (valid nets) or padding replaces.
        """
        out = []
        for n, w, s, o in zip(input_size, self.window_size, self.stride, self.window_offset,
                              strict=True):
            first = max(0, -(o // s)) if o < 0 else 0  # ceil(-o / s) for negative o
            last = (n - w - o) // s  # floor
            out.append(range(first, max(first, last + 1)))
        return tuple(out)

    def windows_inside(self, input_size: tuple[int, ...]) -> tuple[int, ...]:
        """How many cells per axis have their whole window inside an input of ``input_size``
        (the cells a sliding window with this window and stride visits): the lengths of
        :meth:`cells_inside`, which says where they start. Windows that start before the image
        (negative offsets, from padding) or end past it are not counted."""
        return tuple(len(r) for r in self.cells_inside(input_size))

    def __str__(self) -> str:
        def fmt(v: tuple[int, ...]) -> str:
            return "x".join(str(x) for x in v)

        text = (
            f"receptive field {fmt(self.size)}, stride {fmt(self.stride)}, padding "
            f"{fmt(self.padding)}; window {fmt(self.window_size)}; dense map "
            f"{fmt(self.output_size)} on input {fmt(self.input_size)}"
        )
        if not self.exact:
            text += f"; cells are not window-exact ({self.reason})"
        return text
