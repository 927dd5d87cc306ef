"""``compare(a, b)``: are two models the same function, up to floating-point rounding?

1. Draw inputs (or take the user's), run both models natively, and run model ``a`` in float64
   (the reference ``r``) while bounding, op by op, how far each model's own precision can move
   every value (:mod:`fc2conv.verify.running`; the magnitude twin of
   :mod:`fc2conv.verify.bound` for ONNX and for ops without a rule).
2. Each model's error against ``r`` is measured, and bounded by what rounding of *its* dtype
   can produce (:mod:`fc2conv.verify.reference`); the bound is the judge when the two models
   compute in different precisions. Integer outputs: exact. If model ``a`` itself strays
   beyond its bound (ops the bound does not model), both bounds are scaled by 8x its excess
   and the report says "empirical".
3. The outputs alone decide the verdict (:class:`fc2conv.verify.judge.Judge`): bitwise equal
   is ``identical``, always; in the same precision an output differs when B's error against
   the float64 reference exceeds 10x A's own and rounding cannot explain it (B beyond its
   worst-case bound; or beyond 16x the rounding noise measured on A there; or, within both, a
   matched layer beyond its own bound; see :mod:`fc2conv.verify.judge`), or NaN/Inf appear in
   one model only. Every report counts the NaN/Inf of each output (and, with
   ``layers=True``, names the first layer where they appear).
4. With ``layers=True`` (or a "different" verdict), capture both models' layer outputs, match
   them (:mod:`fc2conv.verify.match`), find the first matched layer judged different by the same
   rule and test hypotheses about the cause there (:mod:`fc2conv.verify.diagnose`). The layer
   table localizes; it never turns agreeing outputs into "different".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from fc2conv.core.rounding import ulp_distance
from fc2conv.errors import Fc2ConvError
from fc2conv.verify import bound as bnd
from fc2conv.verify import budget
from fc2conv.verify.inputs import (
    as_draws,
    draw,
    feedable,
    id_ranges,
    resolve_specs,
    with_id_ranges,
)
from fc2conv.verify.judge import Judge, exact_equal, nonfinite_counts
from fc2conv.verify.match import align
from fc2conv.verify.models import Model, load
from fc2conv.verify.noise import elementwise_noise, noise_factor
from fc2conv.verify.reference import reference
from fc2conv.verify.report import OutputStats, Report

log = logging.getLogger(__name__)

Gates = dict[tuple[int, int], torch.Tensor]  # (draw, output) -> elements where B err > 10x A's
REL_FLOOR = 1e-3  # relative errors and ULPs are measured at >= 1e-3 x the output's scale


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
    budget.check(ma, mb)  # refuse before starting, not be killed half way
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
    return _compare_loaded(ma, mb, draws, layers, input_text)


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
             ra: bnd.Rounding, rb: bnd.Rounding) -> tuple[list[Any], set[int]]:
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
        runs.append((ya, yb_al, reference(ma, x, ra, rb)))
    return runs, relayout


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
                    input_text: str) -> Report:
    ra, rb = _rounding(ma), _rounding(mb)
    runs, relayout = _run_all(ma, mb, draws, ra, rb)
    method = "running" if all(ref.method == "running" for _, _, ref in runs) else "magnitude"
    judge = Judge(ra, rb, method=method, stats=runs[0][2].stats)
    notes: list[str] = []
    unsupported = set().union(*(ref.unsupported for _, _, ref in runs))
    notes += reference_notes(runs, ma)
    if unsupported:
        notes.append("the running bound has no rule for " + ", ".join(sorted(unsupported))
                     + "; the magnitude bound is used")

    # model A must be deterministic, and within its own bound; else the empirical method
    deterministic = all(exact_equal(t, u) for t, u in
                        zip(ma.run(draws[0]).outputs, runs[0][0], strict=True))
    if not deterministic:
        notes.append("model A gives different outputs on two runs of the same input "
                     "(a layer in training mode, such as dropout?)")
    elif ra.u_out > 0:
        rho = 0.0
        for ya, _, ref in runs:
            for i, (ta, tr) in enumerate(zip(ya, ref.outputs, strict=True)):
                if not ta.is_floating_point():
                    continue
                e = (ta.double() - tr.double()).abs()
                ok = torch.isfinite(e)
                if ok.any():
                    rho = max(rho, float((e[ok] / ref.bound_a[i][ok].clamp_min(1e-300)).max()))
        if rho > 1.0:
            judge.method, judge.scale = "empirical", bnd.EMPIRICAL_FACTOR * rho
            notes.append(f"model A's own float error exceeds the {method} bound {rho:.3g}-fold "
                         "(ops the bound does not model), so the bounds are scaled "
                         f"{judge.scale:.3g}-fold (empirical)")

    outputs, identical, gated = _output_stats(runs, judge)
    if relayout:
        identical = False  # equal values in another layout are equivalent, not identical
        notes.append("B returns " + ", ".join(f"output {i}" for i in sorted(relayout))
                     + " in another layout; it was aligned to A's before comparing")
    different = any(o.mismatched for o in outputs) or not deterministic
    if not different and deterministic and judge.relative and gated:
        found, note = _noise_note(ma, draws, runs, outputs, ra.u_out, judge.stats.longest,
                                  gated)
        different = found
        if note:
            notes.append(note)
    verdict = "identical" if identical and deterministic else (
        "different" if different else "equivalent")
    for o in outputs:
        bad_a, bad_b = o.nan_a + o.inf_a, o.nan_b + o.inf_b
        if (bad_a or bad_b) and not o.nan_mismatch:
            notes.append(f"{o.name}: both models output NaN/Inf at the same {bad_a} of "
                         f"{o.total} elements ({o.nan_a} NaN, {o.inf_a} Inf): they agree there, "
                         "but neither result is a number")

    report = Report(
        verdict=verdict,
        max_abs_error=max((o.max_abs_error for o in outputs), default=0.0),
        max_rel_error=max((o.max_rel_error for o in outputs), default=0.0),
        ulp_error=max((o.ulp_error for o in outputs), default=0.0),
        bound=max((o.bound for o in outputs), default=0.0),
        bound_method=bnd.describe_method(judge.method, judge.stats, [ra, rb], judge.scale),
        tf32=ra.tf32 or rb.tf32,
        first_divergence=None, diagnosis=None, outputs=outputs,
        a=ma.describe(), b=mb.describe(), inputs=input_text, notes=notes,
    )
    suspect = verdict == "equivalent" and bool(gated)
    if layers or verdict == "different" or suspect:
        from fc2conv.verify.diagnose import localize

        localize(report, ma, mb, draws, judge, with_table=layers, suspect=suspect)
    return report


def reference_notes(runs: list[Any], ma: Model) -> list[str]:
    """Which engine ran model A's float64 twin, when it is an ONNX graph (the report says it),
    and how memory was saved when it had to be (:mod:`fc2conv.verify.budget`)."""
    saved = [ma.cache["budget_note"]] if "budget_note" in ma.cache else []
    engines = list(dict.fromkeys(ref.engine for _, _, ref in runs if ref.engine))
    if not engines:
        return saved
    text = f"float64 reference: model A run by {' and '.join(engines)}"
    if any("in float32" in e for e in engines):
        text += " (exact only up to float32 rounding at those ops: they have no float64 kernel)"
    return [text, *saved]


def _noise_note(ma: Model, draws: list[tuple[torch.Tensor, ...]], runs: list[Any],
                outputs: list[OutputStats], u: float, longest: int,
                gated: dict[tuple[int, int], torch.Tensor]) -> tuple[bool, str | None]:
    """``(different, sentence)`` for the ``gated`` (draw, output) pairs, where B's error exceeds
    10x A's though B is within its worst-case bound: different when ``|A - B|`` is also far
    beyond the rounding noise measured on A for that draw (see :mod:`fc2conv.verify.noise`), or
    when that noise cannot be measured (then the 10x rule decides alone). Judged draw by draw,
    so a large-magnitude draw cannot mask a bug in the others. The sentence says what was
    measured."""
    floating = [i for i, o in enumerate(outputs) if o.dtype.startswith(("float", "bfloat"))]
    if not floating or u == 0:
        return False, None
    try:
        noise = elementwise_noise(ma, draws, u, longest)
    except Exception as err:  # no estimate: B's error beyond 10x A's decides
        log.debug("rounding noise could not be measured: %s", err)
        k, i = min(gated)
        return True, (f"{outputs[i].name}: on draw {k} B's error against the float64 reference "
                      f"exceeds 10x A's; the rounding noise of A could not be measured to "
                      f"excuse it ({err})")
    worst_ratio = 0.0
    limit = noise_factor(ma)
    # what the noise twin perturbs: ONNX graphs op by op (verify/onnx_noise.py) leave the
    # inputs as they are; PyTorch models perturb them too (verify/noise.py)
    shaken = ("every weight and op result" if ma.kind == "onnx"
              else "every weight, input and op result")
    for (k, i), gate in sorted(gated.items()):
        ya, yb, ref = runs[k]
        if i not in floating or not isinstance(noise[k][i], torch.Tensor):
            continue
        d = (ya[i].double() - yb[i].double()).abs().nan_to_num(0, 0, 0)
        scale = float(ref.outputs[i].double().abs().nan_to_num(0, 0, 0).max())
        # the noise of each element, at least the output's mean noise (three trials can land
        # near zero at one element by chance) and four units in the last place of its scale
        nz = noise[k][i].reshape(d.shape)
        level = nz.clamp_min(max(float(nz.mean()), 4 * u * scale / limit, 1e-300))
        ratio = torch.where(gate.reshape(d.shape), d / level, torch.zeros_like(d))
        flat = int(torch.argmax(ratio))
        worst = float(ratio.reshape(-1)[flat])
        worst_ratio = max(worst_ratio, worst)
        if worst > limit:
            at = _unravel(flat, d.shape)
            return True, (
                f"{outputs[i].name}: on draw {k} at index {at} the models differ by "
                f"{float(d.reshape(-1)[flat]):.3g}, B's error there exceeds 10x A's largest, "
                f"and it is {worst:.3g}x the rounding noise measured on A there "
                f"({float(level.reshape(-1)[flat]):.3g}: A's float64 twin with {shaken} "
                f"perturbed by ~sqrt(n)·u relative noise), above the "
                f"limit of {limit:g}x: rounding does not explain it")
    return False, (f"where B's error exceeds 10x A's, |A - B| is at most {worst_ratio:.2g}x the "
                   f"rounding noise measured on A there "
                   f"(its float64 twin with {shaken} perturbed by ~sqrt(n)·u; "
                   f"limit {limit:g}x)")


def _output_stats(aligned_runs: list[Any],
                  judge: Judge) -> tuple[list[OutputStats], bool, Gates]:
    """Per output: the statistics over all draws; whether all are bitwise equal; and the
    (draw, output) pairs where B's error exceeds 10x A's somewhere, with those elements."""
    outputs: list[OutputStats] = []
    gated: dict[tuple[int, int], torch.Tensor] = {}
    identical = True
    n_out = len(aligned_runs[0][0])
    for i in range(n_out):
        first = aligned_runs[0][0][i]
        st = OutputStats(name=f"output {i}" if n_out > 1 else "output",
                         shape=tuple(first.shape), dtype=str(first.dtype).replace("torch.", ""))
        for k, (ya, yb, ref) in enumerate(aligned_runs):
            ta, tb, tr = ya[i], yb[i], ref.outputs[i]
            identical = identical and exact_equal(ta, tb)
            c = judge.check(ta, tb, tr, *judge.bounds(ref, i))
            if "gate" in c and bool(c["gate"].any()) and not exact_equal(ta, tb):
                gated[(k, i)] = c["gate"]
            na, ia = nonfinite_counts(ta)
            nb, ib = nonfinite_counts(tb)
            st.nan_a, st.inf_a, st.nan_b, st.inf_b = (st.nan_a + na, st.inf_a + ia,
                                                      st.nan_b + nb, st.inf_b + ib)
            st.total += ta.numel()
            st.mismatched += int(c["fail"].sum())
            st.nan_mismatch += int(c["nan"].sum())
            st.a_error = max(st.a_error, _nanmax(c["ea"]))
            st.b_error = max(st.b_error, _nanmax(c["eb"]))
            st.bound = max(st.bound, _nanmax(c["allowed"]))
            if ta.numel() == 0:
                continue
            magnitude = float(c["r"].abs().nan_to_num(0, 0, 0).max())
            st.scale = max(st.scale, magnitude)
            scale = magnitude * REL_FLOOR
            flat = int(torch.argmax(c["d"]))
            d = float(c["d"].reshape(-1)[flat])
            if d > st.max_abs_error or st.abs_index is None:
                st.max_abs_error = d
                st.abs_index = _unravel(flat, ta.shape)
                st.abs_allowed = float(c["allowed"].reshape(-1)[flat])
                st.sample = k if len(aligned_runs) > 1 else None
            denom = c["r"].abs().clamp_min(max(scale, 1e-300))
            rel = (c["d"] / denom).nan_to_num(0.0)
            flat = int(torch.argmax(rel))
            rv = float(rel.reshape(-1)[flat])
            if rv > st.max_rel_error or st.rel_index is None:
                st.max_rel_error = rv
                st.rel_index = _unravel(flat, ta.shape)
                st.rel_allowed = float((c["allowed"] / denom).reshape(-1)[flat])
            if ta.is_floating_point() and tb.is_floating_point():
                low = ta.dtype if torch.finfo(ta.dtype).eps >= torch.finfo(tb.dtype).eps \
                    else tb.dtype
                fin = torch.isfinite(ta) & torch.isfinite(tb)
                if fin.any():
                    u = ulp_distance(ta[fin], tb[fin], low, floor=scale)
                    st.ulp_error = max(st.ulp_error, float(u.max()))
        outputs.append(st)
    return outputs, identical, gated


def _nanmax(t: torch.Tensor) -> float:
    t = t[~t.isnan()]
    return float(t.max()) if t.numel() else 0.0


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for dim in reversed(shape):
        idx.append(flat % dim)
        flat //= dim
    return tuple(reversed(idx))
