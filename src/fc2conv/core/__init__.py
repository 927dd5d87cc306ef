"""Floor 1 of fc2conv: pure math on tensors and single modules.

No I/O, no graph code, no CLI. Everything above (the PyTorch and ONNX front ends, verification,
the CLI) calls into here for every weight transformation, so the math lives in one place.
"""

from fc2conv.core.layers import (
    conv_to_flatten_linear,
    conv_to_linear,
    flatten_linear_to_conv,
    linear_to_conv,
)
from fc2conv.core.matrix import as_affine, as_matrix

__all__ = [
    "as_affine",
    "as_matrix",
    "conv_to_flatten_linear",
    "conv_to_linear",
    "flatten_linear_to_conv",
    "linear_to_conv",
]
