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
    2 backends   capture torch_backend onnx_weights onnx_float64 onnx_backend
    3 load       models budget
    4 inputs     inputs
    5 reference  running reference spread onnx_noise noise
    6 judge      judge verdict
    7 localize   structure match localize
    8 diagnose   diagnose
    9 compare    compare

1. **values**: rounding arithmetic (``bound``: unit roundoffs, op counts, the closed-form bound)
   and the value types every later stage reads (``values``: ``InputSpec``, ``Run``, ``Layer``,
   ``Reference``, ``Pair``, ``Divergence``, ``Localization``, ``Diagnosis``; ``report``:
   ``Report`` and its rows).
2. **backends** run a model's module or graph on a draw in one of three modes (native, float64
   reference, float64 magnitude twin) and return a ``Run``: its outputs and, when captured, its
   per-layer tensors named as the user knows the layers (``capture``: PyTorch hooks and FX;
   ``torch_backend``: the float64 twins; ``onnx_weights``/``onnx_float64``/``onnx_backend``:
   onnxruntime and the float64 engines).
3. **load**: ``models.load`` turns what the user gave into a ``Model`` whose ``run`` hands it to
   its backend (the twins and sessions a backend builds are cached on the model);
   ``budget`` refuses a pair that cannot fit in memory before anything runs.
4. **inputs**: the user's inputs as draws, or random draws from the models' input specs.
5. **reference**: model A's float64 ``Reference`` per draw, with both models' error bounds
   (``running``: the op-by-op bound), and the rounding noise measured on A's float64 twin
   (``noise``, ``onnx_noise``; ``spread``: their shared statistic).
6. **judge**: the rule (``judge``), applied to the outputs alone (``verdict.judge_outputs``
   returns a ``Verdict``).
7. **localize** pairs both models' layers by provenance and graph structure (``structure``,
   ``match``) and returns a ``Localization``: the layer table and the first diverging pair.
8. **diagnose** tests causes on that pair and returns a ``Diagnosis``.
9. **compare** runs the stages in order and assembles the ``Report`` once, from their values.
"""

from fc2conv.verify.compare import compare
from fc2conv.verify.report import LayerStats, OutputStats, Report

__all__ = ["LayerStats", "OutputStats", "Report", "compare"]
