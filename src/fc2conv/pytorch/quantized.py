"""Quantized dense layers (``torch.ao.nn.quantized``, dynamic and static): found and named.

A dynamically quantized Linear computes ``y = dequant(q(x) @ q(W)^T) + b`` with ``q(x)``
quantized on the fly per batch (scale and zero point from that batch's range), in an int8
kernel. No float convolution reproduces that rounding exactly, and a quantized conv with the
same per-batch activation quantization does not exist in torch, so these layers stay as they
are: fc2conv names each one and says why (and how to convert: before quantizing).
"""

from __future__ import annotations

from torch import nn


def is_quantized_layer(module: nn.Module) -> bool:
    """True for torch's quantized (int8 / float16-packed) dense and conv modules."""
    mod = type(module).__module__
    return mod.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                           "torch.ao.nn.intrinsic.quantized"))


def quantized_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``[(name, description)]`` of the quantized layers of ``model``, in module order."""
    out = []
    for name, module in model.named_modules():
        if name and is_quantized_layer(module):
            size = ""
            if hasattr(module, "in_features") and hasattr(module, "out_features"):
                size = f" {module.in_features}->{module.out_features}"
            dtype = getattr(module, "_packed_params", None)
            dtype = getattr(dtype, "dtype", None)
            out.append((name, f"{type(module).__name__}{size}"
                              + (f", {str(dtype).replace('torch.', '')}" if dtype else "")))
    return out


def why_unconverted(name: str, description: str) -> str:
    """The sentence logged for a quantized layer left as it is."""
    return (f"{name!r} ({description}) stays as it is: a quantized layer computes in int8 with "
            "activations quantized on the fly, which no float convolution reproduces exactly; "
            "convert the float model first and quantize the result")
