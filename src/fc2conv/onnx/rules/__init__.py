"""ONNX rewrite rules, one file per family; each opens with its weight math."""

from fc2conv.onnx.rules.base import Rule
from fc2conv.onnx.rules.conv_to_matmul import ConvToMatMul
from fc2conv.onnx.rules.flatten_gemm_to_conv import FlattenGemmToConv
from fc2conv.onnx.rules.gemm_to_conv import GemmToConv
from fc2conv.onnx.rules.matmul_to_conv import MatMulToConv

# Tried in order; the first rule whose check accepts a node rewrites it.
TO_CONV: tuple[Rule, ...] = (FlattenGemmToConv(), GemmToConv(), MatMulToConv())
TO_LINEAR: tuple[Rule, ...] = (ConvToMatMul(),)

__all__ = [
    "TO_CONV",
    "TO_LINEAR",
    "ConvToMatMul",
    "FlattenGemmToConv",
    "GemmToConv",
    "MatMulToConv",
]
