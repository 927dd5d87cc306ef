"""ONNX conversions check themselves: the converted model against the original, with
:func:`fc2conv.compare`'s judgement (onnxruntime against a float64 reference), on a fresh
random draw shaped by the model's input specs.

A rewrite rule that is right in its own test can still meet a graph it gets wrong (a layout it
did not expect, a shared initializer). :func:`self_check` runs both models; a ``"different"``
verdict raises :class:`~fc2conv.errors.Fc2ConvError` naming the first node whose outputs
diverge (from compare's layer-by-layer walk). Models whose inputs ``compare`` cannot draw
(symbolic dimensions without a size, inputs that are not tensors) are not checked, with a
warning that says why; but a converted model that onnxruntime cannot load while it loads the
original is a broken conversion and raises. ``verify=False`` on the public functions skips
the check; the CLI's ``convert --check`` runs its own compare and passes ``verify=False``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import onnx
import onnx_ir as ir

from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)

#: One fresh normal draw (the conversion's cost is dominated by this check on small models;
#: ``fc2conv compare`` runs 8 draws, the last one large-magnitude, when asked).
SAMPLES = 1


def _as_compare_input(model: Any) -> Any:
    """What ``compare`` loads: a ModelProto or a path (an ``onnx_ir.Model`` is serialized)."""
    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)
    if isinstance(model, onnx.ModelProto | str | os.PathLike):
        return model
    raise Fc2ConvError(f"cannot check a {type(model).__name__}")


def _ort_load_error(model: Any) -> str | None:
    """The first line of onnxruntime's error when it cannot build a CPU session for ``model``
    (None when it can)."""
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def self_check(original: Any, converted: Any, *, what: str = "converted model",
               seed: int = 0) -> None:
    """Raise :class:`Fc2ConvError` when ``converted`` computes another function than
    ``original`` on a fresh random draw (``compare``'s verdict ``"different"``), naming the
    first diverging node. ``original``/``converted``: ``onnx.ModelProto``, ``onnx_ir.Model``
    or paths to ``.onnx`` files."""
    from fc2conv.verify import compare

    a, b = _as_compare_input(original), _as_compare_input(converted)
    try:
        report = compare(a, b, samples=SAMPLES, layers=False, seed=seed)
    except Fc2ConvError as err:  # e.g. a symbolic input dimension compare cannot size
        broken = _ort_load_error(b)
        if broken is not None and _ort_load_error(a) is None:
            raise Fc2ConvError(
                f"onnxruntime loads the original but not the {what}: {broken}; please report "
                f"this model (verify=False skips the check)") from err
        log.warning("could not check the %s: %s (verify=False skips the check)", what, err)
        return
    if report.verdict != "different":
        log.info("self-check of the %s: %s", what, report.verdict)
        return
    where = ""
    try:
        located = compare(a, b, samples=SAMPLES, layers=True, seed=seed)
        if located.first_divergence:
            where = f" (first diverging at node {located.first_divergence!r})"
    except Exception as exc:  # the layer walk is a diagnosis, not the check itself
        log.info("layer-by-layer comparison failed: %s", exc)
    raise Fc2ConvError(
        f"the {what} computes another function than the original on a fresh random draw"
        f"{where}: max abs error {report.max_abs_error:.3g} (rounding bound "
        f"{report.bound:.3g}); please report this model (verify=False skips the check)"
    )
