"""fc2conv: exact, automatic and verified translations between fully connected layers and
convolutions, for single layers, whole PyTorch models and ONNX graphs.

The package has three floors, and imports only point down:

1. ``fc2conv.core`` — the math: layer equivalences, exact conv matrices, rounding bounds,
   receptive-field arithmetic. Pure functions on tensors and modules.
2. front ends and verification — ``fc2conv.pytorch`` (torch.fx graph passes),
   ``fc2conv.onnx`` (ONNX rewrite rules, loaded only when used), ``fc2conv.verify``.
3. ``fc2conv.cli`` — the command line, reports and figures.

``import fc2conv`` imports neither torch, onnx nor onnxruntime; each loads on first use of a
feature that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fc2conv.errors import Fc2ConvError

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load on first use
    from fc2conv.core import (  # noqa: F401
        as_affine,
        as_matrix,
        conv_to_flatten_linear,
        conv_to_linear,
        flatten_linear_to_conv,
        linear_to_conv,
    )

__version__ = "0.1.0"

# Public names that live in heavier modules, imported on first attribute access:
# name -> "module" (a subpackage) or "module:attribute".
# Even torch loads lazily, so `fc2conv --help` starts fast.
_LAZY: dict[str, str] = {
    "as_affine": "fc2conv.core:as_affine",
    "as_matrix": "fc2conv.core:as_matrix",
    "conv_to_flatten_linear": "fc2conv.core:conv_to_flatten_linear",
    "conv_to_linear": "fc2conv.core:conv_to_linear",
    "flatten_linear_to_conv": "fc2conv.core:flatten_linear_to_conv",
    "linear_to_conv": "fc2conv.core:linear_to_conv",
    "onnx": "fc2conv.onnx",
    "to_conv": "fc2conv.pytorch:to_conv",
    "to_linear": "fc2conv.pytorch:to_linear",
    "convolutionalize": "fc2conv.pytorch:convolutionalize",
    "receptive_field": "fc2conv.pytorch:receptive_field",
    "is_window_exact": "fc2conv.pytorch:is_window_exact",
    "sliding_window": "fc2conv.pytorch:sliding_window",
    "ReceptiveField": "fc2conv.pytorch:ReceptiveField",
    "dense_map": "fc2conv.dense:dense_map",
    "compare": "fc2conv.verify:compare",
    "Report": "fc2conv.verify:Report",
}

__all__ = ["Fc2ConvError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'fc2conv' has no attribute {name!r}")
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
