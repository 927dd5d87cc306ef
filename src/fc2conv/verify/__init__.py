"""Verification: are two models the same function, up to floating-point rounding — and if not,
where do they part and why?

``compare(a, b)`` returns a :class:`Report` with a verdict (``identical``, ``equivalent`` or
``different``) judged against a forward-error bound (:mod:`fc2conv.verify.bound`), the first
diverging layer and a tested diagnosis. onnx/onnxruntime load only when an ONNX model is given.

``compare`` is a one-way pipeline. Each stage takes the values of the stages before it and
returns its own; none calls back up or changes a value it was given. A module imports only
modules listed before it here (module level and inside functions alike;
``tests/test_verify_pipeline.py`` checks it)::

    1 values     bound report values
    2 backends   capture torch_backend onnx_weights onnx_kernels onnx_lower onnx_segments
    3 engines    onnx_float64 onnx_backend
    4 load       models budget
    5 inputs     inputs
    6 reference  running reference spread onnx_noise noise
    7 judge      judge verdict
    8 localize   structure match localize
    9 diagnose   diagnose
    10 compare   compare

1. **values**: rounding arithmetic (``bound``: unit roundoffs, op counts, the closed-form bound)
   and the value types every later stage reads (``values``: ``InputSpec``, ``Run``, ``Layer``,
   ``Reference``, ``Pair``, ``Divergence``, ``Localization``, ``Diagnosis``; ``report``:
   ``Report`` and its rows).
2. **backends** run a model's module or graph on a draw in one of three modes (native, float64
   reference, float64 magnitude twin) and return a ``Run``: its outputs and, when captured, its
   per-layer tensors named as the user knows the layers (``capture``: PyTorch hooks and FX;
   ``torch_backend``: the float64 twins; ``onnx_weights``: an ONNX file's weights, read once;
   ``onnx_kernels``: onnxruntime sessions and float64 kernels; ``onnx_lower``: Conv as patches
   and a MatMul; ``onnx_segments``: onnxruntime around the ops it has no float64 kernel for).
3. **engines**: ``onnx_float64`` picks the first float64 engine that runs a graph, and
   ``onnx_backend`` runs ONNX models in every mode on it.
4. **load**: ``models.load`` turns what the user gave into a ``Model`` whose ``run`` hands it to
   its backend (the twins and sessions a backend builds are cached on the model);
   ``budget`` refuses a pair that cannot fit in memory before anything runs.
5. **inputs**: the user's inputs as draws, or random draws from the models' input specs.
6. **reference**: model A's float64 ``Reference`` per draw, with both models' error bounds
   (``running``: the op-by-op bound), and the rounding noise measured on A's float64 twin
   (``noise``, ``onnx_noise``; ``spread``: their shared statistic).
7. **judge**: the rule (``judge``), applied to the outputs alone (``verdict.judge_outputs``
   returns a ``Verdict``).
8. **localize** pairs both models' layers by provenance and graph structure (``structure``,
   ``match``) and returns a ``Localization``: the layer table and the first diverging pair.
9. **diagnose** tests causes on that pair and returns a ``Diagnosis``.
10. **compare** runs the stages in order and assembles the ``Report`` once, from their values.
"""

from fc2conv.verify.compare import compare
from fc2conv.verify.report import LayerStats, OutputStats, Report

__all__ = ["LayerStats", "OutputStats", "Report", "compare"]
