"""Verification: are two models the same function, up to floating-point rounding — and if not,
where do they part and why?

``compare(a, b)`` returns a :class:`Report` with a verdict (``identical``, ``equivalent`` or
``different``) judged against a forward-error bound (:mod:`fc2conv.verify.bound`), the first
diverging layer and a tested diagnosis. onnx/onnxruntime load only when an ONNX model is given.
"""

from fc2conv.verify.compare import compare
from fc2conv.verify.report import LayerStats, OutputStats, Report

__all__ = ["LayerStats", "OutputStats", "Report", "compare"]
