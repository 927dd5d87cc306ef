"""The ONNX front end: rewrite Gemm / MatMul <-> Conv in any ONNX model, at any size.

    import fc2conv.onnx
    converted = fc2conv.onnx.to_conv(onnx.load("model.onnx"))        # ModelProto in, out
    fc2conv.onnx.to_linear("big.onnx", "big_linear.onnx")            # paths: streams weights

Graphs are edited through onnx-ir (lazy, memory-mapped external tensors); the rules live in
:mod:`fc2conv.onnx.rules`, one file per family. Importing this package imports onnx and
onnx-ir; ``import fc2conv`` does not.
"""

from fc2conv.onnx.api import convert, convert_file, to_conv, to_linear
from fc2conv.onnx.convert import ConversionReport, Entry
from fc2conv.onnx.io import check_file, load, save

__all__ = [
    "ConversionReport",
    "Entry",
    "check_file",
    "convert",
    "convert_file",
    "load",
    "save",
    "to_conv",
    "to_linear",
]
