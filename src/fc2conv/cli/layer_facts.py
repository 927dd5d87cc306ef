"""The numbers behind ``fc2conv explain``: parameter counts, multiply-adds and equivalent forms
of one layer spec, as plain functions (no printing), so tests can check them against formulas.

Conventions: a *multiply-add* (MAC) is one ``a * b + c``; FLOPs = 2 x MACs; bias additions are
not counted. Convs are stride 1, no padding, dilation 1 (the specs ``explain`` accepts). Shapes
and the equivalent layers are obtained from the core on ``device="meta"`` modules, so a spec as
large as a VGG classifier costs no memory and a bad spec raises the core's own sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from fc2conv.core import conv_to_linear, flatten_linear_to_conv, linear_to_conv
from fc2conv.core.describe import describe, shape_str
from fc2conv.core.layers import conv_class
from fc2conv.core.matrix import conv_output_shape
from fc2conv.core.shapes import as_shape, check_order
from fc2conv.errors import Fc2ConvError


@dataclass
class LayerFacts:
    """What ``explain`` prints about one layer applied to one input (batch 1)."""

    description: str  # "Conv2d 2->1, kernel 1x1 on 2x2x2"
    module: nn.Module  # on the meta device: shapes only
    in_shape: tuple[int, ...]  # (C, *spatial), or (features,) for a plain Linear
    out_shape: tuple[int, ...]
    params: int
    macs: int
    matrix_rows: int  # the layer as one FC on the flattened input: rows x cols
    matrix_cols: int
    matrix_nonzeros: int  # entries the layer can make non-zero
    order: str = "chw"  # flatten order of in_shape (Linear over a map)
    forms: list[str] = field(default_factory=list)  # exactly equal layers, one sentence each
    notes: list[str] = field(default_factory=list)  # what it is NOT equal to, and why

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def matrix_entries(self) -> int:
        return self.matrix_rows * self.matrix_cols

    @property
    def sparsity(self) -> float:
        """Fraction of the one-FC matrix that is structurally zero."""
        return 1 - self.matrix_nonzeros / self.matrix_entries


def parse_dims(text: str, what: str, n: int | None = None) -> tuple[int, ...]:
    """``"256x6x6"`` -> ``(256, 6, 6)``; a sentence naming ``what`` when it is not that."""
    try:
        dims = tuple(int(p) for p in text.lower().replace("×", "x").split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims) or (n is not None and len(dims) != n):
        count = f"{n} " if n is not None else ""
        raise Fc2ConvError(f"{what} must be {count}positive integers joined by 'x' "
                           f"(e.g. {'x'.join(['6'] * (n or 2))}), got {text!r}")
    return dims


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_facts(in_channels: int, out_channels: int, spatial: tuple[int, ...],
               kernel: tuple[int, ...] | None = None, bias: bool = True) -> LayerFacts:
    """A ConvNd ``in_channels -> out_channels`` with ``kernel`` (default 1x..x1) on ``spatial``."""
    if not 1 <= len(spatial) <= 3:
        raise Fc2ConvError(f"--spatial must have 1 to 3 dimensions, got {shape_str(spatial)}")
    kernel = kernel or (1,) * len(spatial)
    if len(kernel) != len(spatial):
        raise Fc2ConvError(f"--kernel {shape_str(kernel)} has {len(kernel)} dimensions, "
                           f"--spatial {shape_str(spatial)} has {len(spatial)}")
    if in_channels <= 0 or out_channels <= 0:
        raise Fc2ConvError("--in-channels and --out-channels must be positive")
    conv = conv_class(len(spatial))(in_channels, out_channels, cast(Any, kernel), bias=bias,
                                    device="meta")
    in_shape = (in_channels, *spatial)
    out_shape = conv_output_shape(conv, in_shape)
    positions_in, positions_out = math.prod(spatial), math.prod(out_shape[1:])
    taps = math.prod(kernel)
    macs = out_channels * in_channels * taps * positions_out
    facts = LayerFacts(f"{describe(conv)} on {shape_str(in_shape)}", conv, in_shape, out_shape,
                       _params(conv), macs, out_channels * positions_out,
                       in_channels * positions_in, macs)
    rows, cols = facts.matrix_rows, facts.matrix_cols
    if taps == 1:
        lin = conv_to_linear(conv)
        facts.forms.append(
            f"{describe(lin)} applied at each of the {positions_in} positions with the same "
            f"weight (fc2conv.conv_to_linear): {positions_in} fully connected layers sharing one "
            f"{out_channels}x{in_channels} weight")
        facts.forms.append(
            f"one FC layer on the flattened input, weight {rows}x{cols}: block diagonal in hwc "
            f"order (I_{positions_in} ⊗ W, {positions_in} blocks of {out_channels}x"
            f"{in_channels}), W ⊗ I_{positions_in} in chw order (fc2conv.as_matrix)")
    if positions_out == 1:
        facts.forms.append(
            f"Linear {cols}->{out_channels} on the input flattened in chw order "
            f"(fc2conv.conv_to_flatten_linear); on a larger map the conv slides this Linear "
            f"over every {shape_str(kernel)} window")
    if taps > 1 and positions_out > 1:
        facts.forms.append(
            f"one FC layer on the flattened input, weight {rows}x{cols} (fc2conv.as_matrix): "
            f"each of the {positions_out} output positions reads {taps} of the {positions_in} "
            f"input positions, every weight repeated {positions_out} times")
    if taps > 1:
        facts.notes.append(
            f"not a 1x1 conv: a 1x1 conv {in_channels}->{out_channels} cannot mix positions "
            f"({in_channels * out_channels + (out_channels if bias else 0):,} parameters, "
            f"not {facts.params:,})")
    return facts


def linear_facts(in_features: int, out_features: int, in_shape: tuple[int, ...] | None = None,
                 order: str = "chw", bias: bool = True) -> LayerFacts:
    """A Linear ``in_features -> out_features``, optionally over a flattened ``in_shape`` map."""
    order = check_order(order)
    if in_features <= 0 or out_features <= 0:
        raise Fc2ConvError("--linear needs positive sizes IN x OUT, e.g. 9216x4096")
    linear = nn.Linear(in_features, out_features, bias=bias, device="meta")
    params = _params(linear)
    macs = in_features * out_features
    if in_shape is None:
        facts = LayerFacts(describe(linear), linear, (in_features,), (out_features,), params,
                           macs, out_features, in_features, macs)
        conv = linear_to_conv(linear, dims=1)
        facts.forms.append(
            f"{describe(conv)} on a single position (fc2conv.linear_to_conv); on (N, "
            f"{in_features}, L) it applies this Linear to each of the L positions, the same as "
            f"the Linear on the last axis of an (N, L, {in_features}) input")
        facts.forms.append(
            f"over a flattened (C, H, W) map it is a conv whose kernel is the whole map: pass "
            f"--in-shape, e.g. {_shape_hint(in_features)}")
        return facts
    shape = as_shape(in_shape, min_len=2, max_len=4)
    conv = flatten_linear_to_conv(linear, shape, order=order)  # the core names both shapes
    channels, spatial = shape[0], shape[1:]
    facts = LayerFacts(f"{describe(linear)} over a flattened {shape_str(shape)} map ({order})",
                       linear, shape, conv_output_shape(conv, shape), params, macs,
                       out_features, in_features, macs)
    how = ("W.reshape(O, C, *S)" if order == "chw" else "W.reshape(O, *S, C) moved to (O, C, *S)")
    facts.forms.append(
        f"{describe(conv)} on the {shape_str(shape)} map, kernel = {how} "
        f"(fc2conv.flatten_linear_to_conv(order={order!r})); output "
        f"{shape_str(facts.out_shape)}; on a larger map it slides over every "
        f"{shape_str(spatial)} window")
    facts.order = order
    one = channels * out_features + (out_features if bias else 0)
    facts.notes.append(
        f"not a 1x1 conv: a 1x1 conv {channels}->{out_features} ({one:,} parameters, not "
        f"{params:,}) never mixes the {math.prod(spatial)} positions")
    if order == "hwc":
        facts.notes.append(
            "the kernel must be built with order='hwc': reading a channels-last flatten as chw "
            "scrambles the weights (the demo shows errors as large as the outputs)")
    return facts


def _shape_hint(features: int) -> str:
    """A (C, H, W) with C*H*W == features and a small square spatial side, as in CNN heads."""
    for side in (7, 6, 5, 4, 3, 2):
        if features % (side * side) == 0:
            return f"{features // (side * side)}x{side}x{side}"
    return f"{features}x1x1"
