"""The verdict of the outputs alone: :func:`judge_outputs` returns a :class:`Verdict`.

Given, per draw, A's outputs, B's outputs in A's layout and model A's float64
:class:`~fc2conv.verify.values.Reference` (with both models' error bounds):

1. Model A must be deterministic, and within its own bound; where A itself strays beyond it
   (ops the bound does not model), both bounds are scaled by 8x its excess and the verdict says
   "empirical" (the :class:`~fc2conv.verify.judge.Judge` is built once, with that scale).
2. Each output of each draw is judged by :meth:`Judge.check <fc2conv.verify.judge.Judge.check>`:
   bitwise equal is ``identical``, always; in the same precision an output differs when B's error
   against the float64 reference exceeds 10x A's own and rounding cannot explain it (B beyond
   its worst-case bound; or, decided here draw by draw, ``|A - B|`` beyond 4x the rounding
   noise measured on A there, op by op, :mod:`fc2conv.verify.noise`), or NaN/Inf appear in
   one model only.
3. The grey zone: where B's error exceeds 10x A's, yet B is within its worst-case bound and
   ``|A - B|`` within the measured noise, B's own float64 twin decides (``twin_b``, run only
   for those draws, so ordinary draws cost nothing more): B differs where ``|B64 - r|``, what B
   computes differently from A in near-exact arithmetic, is more than half of B's error
   ``|B32 - r|`` (:func:`~fc2conv.verify.judge.float64_split` has the math). Why: the noise
   envelope models naive summation, and A's blocked kernels (oneDNN, onnxruntime's MLAS) can
   round ~10x less than it on deep CNNs, so a bug at 12-33x A's error sits within 4x the noise
   (EfficientNet 3-D, +1e-3 on one head weight: 4 of 20 draws missed on the PyTorch path, 3 on
   the ONNX path), while lowering the factor would flag correct summation orders. B64 needs no
   model of anybody's kernels: B's rounding, whatever its order, is ``B32 - B64``. When B has
   no float64 twin (it fails to run, or an ONNX float64 engine runs some op in float32, for B or
   for A's reference), the grey zone stays "equivalent" as before and a note says why.
   Calibration: see :data:`~fc2conv.verify.judge.FLOAT64_SHARE` and the README (bench/verdicts.py).
4. ``suspect``: an output where B's error exceeds 10x A's though within both the worst-case
   bound and the measured noise, and B's float64 twin could not weigh it (when it did and found
   B's own rounding, that is the evidence: a layer beyond its bound, such as a conv that an
   exporter fused with its BatchNorm paired with A's bare conv, cannot overturn it); the layer
   table may confirm it
   (:mod:`fc2conv.verify.compare`), never overturn agreeing outputs otherwise.

Nothing given is changed; the notes are the sentences the report prints about the outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fc2conv.core.rounding import ulp_distance
from fc2conv.verify import bound as bnd
from fc2conv.verify.judge import (
    FLOAT64_SHARE,
    Judge,
    error_floor,
    exact_equal,
    float64_split,
    nonfinite_counts,
)
from fc2conv.verify.models import Model
from fc2conv.verify.noise import NOISE_FACTOR, elementwise_noise
from fc2conv.verify.report import OutputStats
from fc2conv.verify.values import Reference

log = logging.getLogger(__name__)

REL_FLOOR = 1e-3  # relative errors and ULPs are measured at >= 1e-3 x the output's scale


@dataclass(frozen=True, eq=False)
class DrawRun:
    """One draw: A's outputs, B's outputs aligned to A's layout, and the float64 reference."""

    ya: list[torch.Tensor]
    yb: list[torch.Tensor]
    ref: Reference


Gates = dict[tuple[int, int], torch.Tensor]  # (draw, output) -> elements where B err > 10x A's
# draw -> (B's float64 outputs on it, aligned to A's layout; the engine that ran them, "" for
# PyTorch)
TwinB = Callable[[int], tuple[list[torch.Tensor], str]]


@dataclass(frozen=True, eq=False)
class Verdict:
    """What the outputs say: ``verdict`` (identical / equivalent / different), per-output
    statistics, the judge that decided (its method and empirical scale final), whether A is
    deterministic, whether the verdict is ``suspect`` (see the module docstring), and notes."""

    verdict: str
    outputs: tuple[OutputStats, ...]
    judge: Judge
    deterministic: bool
    suspect: bool
    notes: tuple[str, ...]


def judge_outputs(ma: Model, draws: list[tuple[torch.Tensor, ...]], runs: list[DrawRun],
                  relayout: set[int], ra: bnd.Rounding, rb: bnd.Rounding,
                  twin_b: TwinB | None = None) -> Verdict:
    """The verdict on ``runs`` (one per draw of ``draws``); ``relayout``: the outputs B returns
    in another layout (aligned to A's in ``runs``, so not identical); ``twin_b``: B's float64
    outputs on a draw, called only in the grey zone (without it the grey zone is
    "equivalent"). See the module docstring."""
    method = "running" if all(run.ref.method == "running" for run in runs) else "magnitude"
    stats = runs[0].ref.stats
    notes: list[str] = []
    unsupported = set().union(*(run.ref.unsupported for run in runs))
    if unsupported:
        notes.append("the running bound has no rule for " + ", ".join(sorted(unsupported))
                     + "; the magnitude bound is used")

    # model A must be deterministic, and within its own bound; else the empirical method
    deterministic = all(exact_equal(t, u) for t, u in
                        zip(ma.run(draws[0]).outputs, runs[0].ya, strict=True))
    scale = 1.0
    if not deterministic:
        notes.append("model A gives different outputs on two runs of the same input "
                     "(a layer in training mode, such as dropout?)")
    elif ra.u_out > 0:
        rho = _own_excess(runs)
        if rho > 1.0:
            scale = bnd.EMPIRICAL_FACTOR * rho
            notes.append(f"model A's own float error exceeds the {method} bound {rho:.3g}-fold "
                         "(ops the bound does not model), so the bounds are scaled "
                         f"{scale:.3g}-fold (empirical)")
            method = "empirical"
    judge = Judge(ra, rb, method=method, scale=scale, stats=stats)

    outputs, identical, gated = _output_stats(runs, judge)
    if relayout:
        identical = False  # equal values in another layout are equivalent, not identical
        notes.append("B returns " + ", ".join(f"output {i}" for i in sorted(relayout))
                     + " in another layout; it was aligned to A's before comparing")
    different = any(o.mismatched for o in outputs) or not deterministic
    cleared = False  # B's float64 twin showed B's excess is its own rounding
    if not different and deterministic and judge.relative and gated:
        found, note = _noise_note(ma, draws, runs, outputs, ra.u_out, gated)
        if note:
            notes.append(note)
        if not found and twin_b is not None:  # the grey zone: B's own float64 twin decides
            said, note = _twin_note(runs, outputs, ra.u_out, gated, twin_b)
            notes.append(note)
            found, cleared = bool(said), said is False
        different = found
    verdict = "identical" if identical and deterministic else (
        "different" if different else "equivalent")
    for o in outputs:
        bad_a, bad_b = o.nan_a + o.inf_a, o.nan_b + o.inf_b
        if (bad_a or bad_b) and not o.nan_mismatch:
            notes.append(f"{o.name}: both models output NaN/Inf at the same {bad_a} of "
                         f"{o.total} elements ({o.nan_a} NaN, {o.inf_a} Inf): they agree there, "
                         "but neither result is a number")
    return Verdict(verdict=verdict, outputs=tuple(outputs), judge=judge,
                   deterministic=deterministic,
                   suspect=verdict == "equivalent" and bool(gated) and not cleared,
                   notes=tuple(notes))


def _own_excess(runs: list[DrawRun]) -> float:
    """The largest ``|A - r| / bound_a`` over every floating output element of every draw."""
    rho = 0.0
    for run in runs:
        for i, (ta, tr) in enumerate(zip(run.ya, run.ref.outputs, strict=True)):
            if not ta.is_floating_point():
                continue
            e = (ta.double() - tr.double()).abs()
            ok = torch.isfinite(e)
            if ok.any():
                rho = max(rho, float((e[ok] / run.ref.bound_a[i][ok].clamp_min(1e-300)).max()))
    return rho


def _noise_note(ma: Model, draws: list[tuple[torch.Tensor, ...]], runs: list[DrawRun],
                outputs: list[OutputStats], u: float,
                gated: Gates) -> tuple[bool, str | None]:
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
        # only the gated draws, against the float64 outputs their references already hold
        noise = elementwise_noise(ma, draws, u,
                                  exact=[list(run.ref.outputs) for run in runs],
                                  only={k for k, _ in gated})
    except Exception as err:  # no estimate: B's error beyond 10x A's decides
        log.debug("rounding noise could not be measured: %s", err)
        k, i = min(gated)
        return True, (f"{outputs[i].name}: on draw {k} B's error against the float64 reference "
                      f"exceeds 10x A's; the rounding noise of A could not be measured to "
                      f"excuse it ({err})")
    worst_ratio = 0.0
    limit = NOISE_FACTOR
    # what the noise twin perturbs: ONNX graphs op by op (verify/onnx_noise.py) leave the
    # inputs as they are; PyTorch models perturb them too (verify/noise.py)
    shaken = ("every weight and op result" if ma.kind == "onnx"
              else "every weight, input and op result")
    for (k, i), gate in sorted(gated.items()):
        run = runs[k]
        if i not in floating or not isinstance(noise[k][i], torch.Tensor):
            continue
        d = (run.ya[i].double() - run.yb[i].double()).abs().nan_to_num(0, 0, 0)
        scale = float(run.ref.outputs[i].double().abs().nan_to_num(0, 0, 0).max())
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


def _twin_note(runs: list[DrawRun], outputs: list[OutputStats], u: float, gated: Gates,
               twin_b: TwinB) -> tuple[bool | None, str]:
    """``(different, sentence)`` for the grey zone's ``gated`` (draw, output) pairs: True
    when, at an element where B's error exceeds 10x A's, B's own float64 twin is further from
    A's than half of B's error (:func:`~fc2conv.verify.judge.float64_split`); False when it is
    not anywhere (B's excess is its own rounding: the verdict is not ``suspect``, the layer
    table cannot overturn it). None, the measured noise having decided, when B's float64 twin
    cannot run, or when it or A's reference ran an op in float32 (then ``B64 - r`` holds
    float32 rounding too)."""
    worst: tuple[float, str] = (-1.0, "")
    for k in sorted({k for k, _ in gated}):
        run = runs[k]
        if "in float32" in (run.ref.engine or ""):
            return None, ("B's float64 twin was not consulted: A's float64 reference ran some "
                           f"ops in float32 ({run.ref.engine}); the measured noise decided")
        try:
            b64, engine = twin_b(k)
        except Exception as err:
            log.debug("B's float64 twin could not run: %s", err)
            return None, (f"B's float64 twin could not be run ({str(err).splitlines()[0][:200]}"
                           "); the measured noise decided")
        if "in float32" in engine:
            return None, ("B's float64 twin was not consulted: it ran some ops in float32 "
                           f"({engine}); the measured noise decided")
        for (kk, i), gate in sorted(gated.items()):
            if kk != k or not isinstance(b64[i], torch.Tensor) or \
                    not b64[i].is_floating_point():
                continue
            s = float64_split(run.yb[i], b64[i], run.ref.outputs[i], gate)
            flat = int(torch.argmax(s["share"]))
            share = float(s["share"].reshape(-1)[flat])
            floor = error_floor(run.ya[i], run.ref.outputs[i], u)
            at = _unravel(flat, s["share"].shape)
            text = (f"{outputs[i].name}: on draw {k} at index {at} B's error against A's "
                    f"float64 reference is {float(s['eb'].reshape(-1)[flat]) / floor:.3g}x A's "
                    f"largest, within the rounding noise; B's own float64 twin is "
                    f"{float(s['d64'].reshape(-1)[flat]):.3g} from A's "
                    f"({100 * share:.3g}% of B's error; B's own float32 rounding there "
                    f"{float(s['own'].reshape(-1)[flat]):.3g})")
            if share > FLOAT64_SHARE:
                return True, (text + f", more than {100 * FLOAT64_SHARE:g}%: B computes "
                              "something else, not the same function rounded worse")
            if share > worst[0]:
                worst = (share, text)
    if not worst[1]:
        return None, "B's float64 twin gave no floating output to weigh; the measured noise decided"
    return False, (worst[1] + f", at most {100 * FLOAT64_SHARE:g}%: B's excess is its own "
                   "rounding (another summation order), not another function")


def _output_stats(aligned_runs: list[DrawRun],
                  judge: Judge) -> tuple[list[OutputStats], bool, Gates]:
    """Per output: the statistics over all draws; whether all are bitwise equal; and the
    (draw, output) pairs where B's error exceeds 10x A's somewhere, with those elements."""
    outputs: list[OutputStats] = []
    gated: Gates = {}
    identical = True
    n_out = len(aligned_runs[0].ya)
    for i in range(n_out):
        first = aligned_runs[0].ya[i]
        st = OutputStats(name=f"output {i}" if n_out > 1 else "output",
                         shape=tuple(first.shape), dtype=str(first.dtype).replace("torch.", ""))
        for k, run in enumerate(aligned_runs):
            ref = run.ref
            ta, tb, tr = run.ya[i], run.yb[i], ref.outputs[i]
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
