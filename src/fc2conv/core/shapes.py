"""Validation and arithmetic of ``in_shape`` tuples ``(C, *spatial)`` shared by the core."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

from fc2conv.core.describe import shape_str
from fc2conv.errors import Fc2ConvError

ORDERS = ("chw", "hwc")


def as_shape(
    in_shape: Sequence[int] | int, *, min_len: int = 1, max_len: int = 4
) -> tuple[int, ...]:
    """Return ``in_shape`` as a tuple of positive ints or raise a sentence saying what is wrong."""
    if isinstance(in_shape, int):
        in_shape = (in_shape,)
    if isinstance(in_shape, str):
        raise Fc2ConvError(f"in_shape must be a tuple of integers (C, *spatial), got {in_shape!r}")
    try:
        shape = tuple(operator.index(s) for s in in_shape)  # ints only: 2.0 and "2" are refused
    except (TypeError, ValueError):
        raise Fc2ConvError(
            f"in_shape must be a tuple of integers (C, *spatial), got {in_shape!r}"
        ) from None
    if not min_len <= len(shape) <= max_len:
        raise Fc2ConvError(
            f"in_shape {shape} has {len(shape)} dimensions; expected (C, *spatial) with "
            f"{min_len - 1} to {max_len - 1} spatial dimensions"
        )
    if any(s <= 0 for s in shape):
        raise Fc2ConvError(f"in_shape {shape} has a dimension that is not positive")
    return shape


def check_order(order: str) -> str:
    """Validate a flatten order: ``"chw"`` (PyTorch NC*) or ``"hwc"`` (channels-last)."""
    if order not in ORDERS:
        raise Fc2ConvError(
            f"order must be 'chw' (PyTorch's flatten of an NCHW map) or 'hwc' (flatten of a "
            f"channels-last map), got {order!r}"
        )
    return order


def suggest_shape(features: int, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A plausible ``(C, *spatial)`` with ``prod == features`` close to ``shape``, or ``None``.

    Tries, in order: same channels with equal spatial sides; same spatial size with other channels.
    """
    channels, spatial = shape[0], shape[1:]
    if spatial and features % channels == 0:
        per = features // channels
        side = round(per ** (1.0 / len(spatial)))
        for cand in (side - 1, side, side + 1):
            if cand > 0 and cand ** len(spatial) == per:
                return (channels, *([cand] * len(spatial)))
    n_spatial = math.prod(spatial)
    if spatial and features % n_spatial == 0:
        return (features // n_spatial, *spatial)
    return None


def mismatch_message(features: int, shape: tuple[int, ...]) -> str:
    """``in_shape (512, 6, 6) flattens to 18432 features, the layer expects 25088. Did you ...``."""
    msg = (
        f"in_shape {shape} ({shape_str(shape)}) flattens to {math.prod(shape)} features, "
        f"the layer expects {features}"
    )
    hint = suggest_shape(features, shape)
    if hint is not None:
        msg += f". Did you mean in_shape={hint}?"
    return msg
