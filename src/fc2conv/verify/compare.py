"""``compare(a, b)``: are two models the same function, up to floating-point rounding?

The pipeline, one stage per module (see :mod:`fc2conv.verify`), each taking the previous
stage's value and returning its own:

1. Load both models (:mod:`fc2conv.verify.models`), refuse before starting when they cannot fit
   in memory (:mod:`fc2conv.verify.budget`), and draw inputs or take the user's
   (:mod:`fc2conv.verify.inputs`).
2. Per draw, run both models natively on their backends and align B's outputs to A's layout;
   run model ``a`` in float64 (the reference ``r``) while bounding, op by op, how far each
   model's own precision can move every value (:mod:`fc2conv.verify.reference`).
3. The outputs alone decide the verdict (:mod:`fc2conv.verify.verdict`, by the rule of
   :class:`fc2conv.verify.judge.Judge`): bitwise equal is ``identical``, always; in the same
   precision an output differs when B's error against the float64 reference exceeds 10x A's own
   and rounding cannot explain it, or NaN/Inf appear in one model only. Where only the 10x rule
   fires (the grey zone), B's own float64 twin (:func:`_float64_b`, run for those draws only)
   tells B's rounding from another function.
4. With ``layers=True`` (or a "different" or suspect verdict), the layer table
   (:mod:`fc2conv.verify.localize`) pairs both models' layers and finds the first that parts;
   the layer table localizes, it never turns agreeing outputs into "different" (a suspect
   verdict, where B's error exceeds 10x A's within the bounds and the measured noise, is
   confirmed by a layer beyond its own bound).
5. For a "different" pair, :mod:`fc2conv.verify.diagnose` tests causes on the first diverging
   pair.
6. The :class:`~fc2conv.verify.report.Report` is assembled once, from those values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from fc2conv.errors import Fc2ConvError
from fc2conv.verify import bound as bnd
from fc2conv.verify import budget
from fc2conv.verify.diagnose import diagnose
from fc2conv.verify.inputs import (
    as_draws,
    draw,
    feedable,
    id_ranges,
    resolve_specs,
    with_id_ranges,
)
from fc2conv.verify.localize import localize
from fc2conv.verify.match import align
from fc2conv.verify.models import Model, load
from fc2conv.verify.reference import reference, reference_notes
from fc2conv.verify.report import Report
from fc2conv.verify.values import Diagnosis, Localization
from fc2conv.verify.verdict import DrawRun, judge_outputs

log = logging.getLogger(__name__)


def _op_kinds(model: Model) -> tuple[bool, bool]:
    """(has convs, has matmuls) — decides which TF32 switch applies."""
    if model.module is None:
        return False, False
    graph = getattr(model.module, "graph", None)
    if model.exported and isinstance(graph, torch.fx.Graph):
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        return (any("conv" in t for t in targets),
                any(k in t for t in targets for k in ("linear", "mm", "matmul")))
    mods = list(model.module.modules())
    return (any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in mods),
            any(isinstance(m, torch.nn.Linear | torch.nn.Bilinear | torch.nn.MultiheadAttention)
                for m in mods))


def _rounding(model: Model) -> bnd.Rounding:
    tf32 = False
    if model.kind == "torch":
        has_conv, has_matmul = _op_kinds(model)
        tf32 = bnd.tf32_in_play(model.device.type, model.dtype, has_conv=has_conv,
                                has_matmul=has_matmul, **bnd.current_tf32_flags())
    return bnd.rounding_for(model.dtype, tf32=tf32)


def compare(a: Any, b: Any, inputs: Any = None, *,
            input_shape: Sequence[int] | str | None = None, samples: int = 8,
            layers: bool = True, trust_pickle: bool = False, seed: int | None = None) -> Report:
    """Compare models ``a`` and ``b`` and return a :class:`~fc2conv.verify.report.Report`.

    ``a``/``b``: ``nn.Module``, ``torch.export.ExportedProgram``, ``onnx.ModelProto`` or a path
    to ``.pt2``/``.onnx`` (``.pt``/``.pth`` pickles only with ``trust_pickle=True``).
    ``inputs``: a tensor/array or tuple of them, a dict of named inputs (a tokenizer's
    output, ordered by the model's input names), or a list of such draws; else ``samples``
    random draws (the last one large-magnitude) shaped by ``input_shape`` or the models' input
    specs. Model ``a`` is the reference: its float64 twin defines the exact result.
    ``input_shape`` may also be a string
    ``"2,3,32,32"`` / ``"2x3x32x32"``. ``seed`` makes the random draws reproducible (the report
    states the seed it used either way).
    """
    input_shape = _parse_shape(input_shape)
    ma = load(a, "A", trust_pickle=trust_pickle)
    mb = load(b, "B", trust_pickle=trust_pickle)
    budget_note = budget.check(ma, mb)  # refuse before starting, not be killed half way
    if inputs is not None:
        draws = as_draws(inputs, ma)
        shown = ", ".join(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
                          for x in draws[0])
        input_text = f"the given inputs: {shown}" + (
            f" ({len(draws)} draws)" if len(draws) > 1 else "")
    else:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        specs = feedable(with_id_ranges(resolve_specs(ma, mb, input_shape), ma, mb), ma, seed)
        draws = draw(specs, samples, ma.dtype, seed)
        shapes = ", ".join(str(tuple(x.shape)) for x in draws[0])
        ids = id_ranges(specs)
        input_text = (f"{len(draws)} random normal draws of shape {shapes}"
                      + (", the last scaled to large magnitude" if len(draws) > 1 else "")
                      + f" (seed {seed})" + (f"; {ids}" if ids else ""))
    return _compare_loaded(ma, mb, draws, layers, input_text, budget_note)


def _parse_shape(shape: Sequence[int] | str | None) -> tuple[int, ...] | None:
    """``"2,3,32"``, ``"2x3x32"`` or a sequence of ints -> a tuple of positive ints."""
    if shape is None:
        return None
    parts: Sequence[Any] = (
        [p for p in re.split(r"[,x\s]+", shape.strip("()[] ")) if p]
        if isinstance(shape, str) else shape)
    try:
        dims = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise Fc2ConvError(f"input_shape must be integers like (2, 3, 32, 32) or '2,3,32,32', "
                           f"got {shape!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise Fc2ConvError(f"input_shape must be positive integers, got {shape!r}")
    return dims


def _run_all(ma: Model, mb: Model, draws: list[tuple[torch.Tensor, ...]],
             ra: bnd.Rounding, rb: bnd.Rounding) -> tuple[list[DrawRun], set[int]]:
    """Per draw: (A's outputs, B's outputs aligned to A's layout, the Reference); and the
    indices of outputs whose layout differs between the models."""
    runs = []
    relayout: set[int] = set()
    for x in draws:
        ya = _run_native(ma, x, "A")
        yb = _run_native(mb, x, "B")
        if len(ya) != len(yb):
            raise Fc2ConvError(f"model A returns {len(ya)} outputs and model B {len(yb)}; "
                               "they cannot be the same function")
        yb_al = []
        for i, (ta, tb) in enumerate(zip(ya, yb, strict=True)):
            al = align(ta, tb)
            if al is None:
                raise Fc2ConvError(
                    f"output {i} of A has shape {tuple(ta.shape)} and of B {tuple(tb.shape)}: "
                    "they hold different numbers of values, so the models are not the same "
                    "function")
            yb_al.append(al[0])
            if al[1].perm is not None:
                relayout.add(i)
        runs.append(DrawRun(ya, yb_al, reference(ma, x, ra, rb)))
    return runs, relayout


def _float64_b(mb: Model, x: tuple[torch.Tensor, ...],
               run: DrawRun) -> tuple[list[torch.Tensor], str]:
    """B's float64 twin on draw ``x`` (PyTorch: the float64 copy of the module; ONNX: the same
    engines, with the same fallbacks, as A's reference), its outputs aligned to A's layout, and
    the engine that ran it. Asked for only in the verdict's grey zone
    (:func:`fc2conv.verify.verdict.judge_outputs`); a PyTorch twin is dropped again after the
    call (unless it was there before), so B's float64 weights are not kept beside A's twins."""
    built = "reference" not in mb._twins
    try:
        b64 = mb.run(x, "reference")
    finally:
        if built:
            mb._twins.pop("reference", None)
    outs = []
    for ta, tb in zip(run.ref.outputs, b64.outputs, strict=True):
        al = align(ta, tb)
        outs.append(tb if al is None else al[0])
    return outs, b64.engine


def _run_native(model: Model, x: tuple[torch.Tensor, ...], which: str) -> list[torch.Tensor]:
    try:
        return model.run(x).outputs
    except Fc2ConvError:
        raise
    except Exception as err:
        raise Fc2ConvError(
            f"model {which} ({model.label}) failed on inputs of shape "
            f"{[tuple(t.shape) for t in x]}: {str(err).splitlines()[0] if str(err) else err!r}"
        ) from None


def _compare_loaded(ma: Model, mb: Model, draws: list[tuple[torch.Tensor, ...]], layers: bool,
                    input_text: str, budget_note: str | None = None) -> Report:
    ra, rb = _rounding(ma), _rounding(mb)
    runs, relayout = _run_all(ma, mb, draws, ra, rb)
    seen = judge_outputs(ma, draws, runs, relayout, ra, rb,
                         twin_b=lambda k: _float64_b(mb, draws[k], runs[k]))
    notes = [*reference_notes([run.ref for run in runs], budget_note), *seen.notes]
    verdict = seen.verdict
    loc: Localization | None = None
    diagnosis: Diagnosis | None = None
    if layers or verdict == "different" or seen.suspect:
        loc = localize(ma, mb, draws, seen.judge)
        notes += loc.notes
        if loc.captured:
            if verdict != "different" and loc.beyond is not None:
                if seen.suspect:
                    verdict = "different"
                    notes.append(
                        f"B's output error exceeds 10x A's, within the worst-case bound of the "
                        f"output, and layer '{loc.beyond.pair.a.name}' is beyond its own bound: "
                        "rounding does not explain it")
                else:
                    # the outputs decide; a layer that strays while they agree is only reported
                    notes.append(
                        f"the outputs agree, but layer '{loc.beyond.pair.a.name}' strays further "
                        "from its float64 reference in B than in A; the outputs decide the "
                        "verdict (a difference the layers after it damp away does not change "
                        "what the model computes)")
            if verdict == "different":
                diagnosis = diagnose(ma, mb, draws, seen.judge, loc.first)
    outputs = list(seen.outputs)
    judge = seen.judge
    return Report(
        verdict=verdict,
        max_abs_error=max((o.max_abs_error for o in outputs), default=0.0),
        max_rel_error=max((o.max_rel_error for o in outputs), default=0.0),
        ulp_error=max((o.ulp_error for o in outputs), default=0.0),
        bound=max((o.bound for o in outputs), default=0.0),
        bound_method=bnd.describe_method(judge.method, judge.stats, [ra, rb], judge.scale),
        tf32=ra.tf32 or rb.tf32,
        first_divergence=diagnosis.first_divergence if diagnosis else None,
        diagnosis=diagnosis.text if diagnosis else None,
        outputs=outputs,
        layers=list(loc.table) if loc is not None and layers and loc.captured else [],
        a=ma.describe(), b=mb.describe(), inputs=input_text, notes=notes,
        weight_shared_with=list(diagnosis.shared_with) if diagnosis else [],
    )
