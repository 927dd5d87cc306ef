"""Short human descriptions of layers, used in every error message and report.

``describe(nn.Linear(25088, 4096))`` -> ``"Linear 25088->4096"``;
``describe(nn.Conv2d(3, 64, 3, stride=2))`` -> ``"Conv2d 3->64, kernel 3x3, stride 2"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def shape_str(shape: Sequence[int]) -> str:
    """``(2, 3, 4)`` -> ``"2x3x4"``."""
    return "x".join(str(int(s)) for s in shape)


def describe(module: nn.Module) -> str:
    """One-line description of a Linear or Conv module (other modules: their class name)."""
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        parts = [
            f"Conv{len(module.kernel_size)}d {module.in_channels}->{module.out_channels}",
            f"kernel {shape_str(module.kernel_size)}",
        ]
        if any(s != 1 for s in module.stride):
            parts.append(f"stride {_compact(module.stride)}")
        if isinstance(module.padding, str):
            if module.padding != "valid":
                parts.append(f"padding '{module.padding}'")
        elif any(p != 0 for p in module.padding):
            parts.append(f"padding {_compact(module.padding)}")
        if any(d != 1 for d in module.dilation):
            parts.append(f"dilation {_compact(module.dilation)}")
        if module.groups != 1:
            parts.append(f"groups {module.groups}")
        return ", ".join(parts)
    return type(module).__name__


def _compact(values: Sequence[int]) -> str:
    vals = [int(v) for v in values]
    return str(vals[0]) if len(set(vals)) == 1 else shape_str(vals)
