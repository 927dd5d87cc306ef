"""``compare(a, b)``: are two models the same function, up to floating-point rounding?

1. Draw inputs (or take the user's), run both models natively, and run model ``a`` twice more in
   float64: as is (the reference ``r``) and as its magnitude twin (``M``, the ``|W||x|`` sums).
2. Each model's error against ``r`` must lie within what rounding of *its* dtype can produce
   (:mod:`fc2conv.verify.bound`); then ``|a - b|`` is within the sum of the two bounds, which is
   what the report calls "allowed". All equal bit for bit: ``identical``; all within: ``equivalent``;
   anything else (including NaN/Inf in one model only): ``different``. Integer outputs: exact.
3. With ``layers=True``, capture both models' layer outputs, match them
   (:mod:`fc2conv.verify.match`), find the first layer beyond its own bound and test hypotheses
   about the cause there (:mod:`fc2conv.verify.diagnose`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fc2conv.core.rounding import ulp_distance
from fc2conv.errors import Fc2ConvError
from fc2conv.verify import bound as bnd
from fc2conv.verify.inputs import as_tensors, draw, resolve_specs
from fc2conv.verify.match import align, match_layers
from fc2conv.verify.models import Model, load
from fc2conv.verify.report import LayerStats, OutputStats, Report

log = logging.getLogger(__name__)

REL_FLOOR = 1e-3  # relative errors and ULPs are measured at >= 1e-3 x the output's scale


@dataclass
class Judge:
    """Elementwise allowed error for model a, model b, and a vs b, from magnitudes ``M``."""

    ra: bnd.Rounding
    rb: bnd.Rounding
    stats: bnd.OpStats
    method: str = "higham-magnitude"
    rho: float = 0.0  # empirical: max |a - r| / M
    coef_a: float = field(init=False)
    coef_b: float = field(init=False)

    def __post_init__(self) -> None:
        self.coef_a = bnd.coefficient(self.ra, self.stats)
        self.coef_b = bnd.coefficient(self.rb, self.stats)

    def bounds(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ba = bnd.elementwise_bound(m, self.coef_a, self.ra, self.stats)
        bb = bnd.elementwise_bound(m, self.coef_b, self.rb, self.stats)
        if self.method == "empirical":
            scale = self.rb.u_out / self.ra.u_out if self.ra.u_out else 1.0
            ba = torch.maximum(ba, bnd.EMPIRICAL_FACTOR * self.rho * m.double().abs())
            bb = torch.maximum(bb, bnd.EMPIRICAL_FACTOR * self.rho * scale * m.double().abs())
        return ba, bb

    def allowed(self, m: torch.Tensor) -> torch.Tensor:
        ba, bb = self.bounds(m)
        return ba + bb


def _tf32(model: Model, stats: bnd.OpStats) -> bool:
    if model.kind != "torch":
        return False
    flags = bnd.current_tf32_flags()
    return bnd.tf32_in_play(model.device.type, model.dtype, has_conv=stats.convs > 0,
                            has_matmul=stats.matmuls > 0, **flags)


def _exact_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.is_floating_point():
        return bool(((x == y) | (x.isnan() & y.isnan())).all())
    return bool((x == y).all())


def _check_draw(ya: torch.Tensor, yb: torch.Tensor, r: torch.Tensor, m: torch.Tensor,
                judge: Judge) -> dict[str, torch.Tensor]:
    """Elementwise verdict ingredients for one output of one draw (all float64)."""
    a64, b64, r64 = ya.double(), yb.double(), r.double()
    d = (a64 - b64).abs()
    if not (ya.is_floating_point() and yb.is_floating_point()):
        zero = torch.zeros_like(d)
        return {"d": d, "allowed": zero, "fail": d != 0, "nan": torch.zeros_like(d, dtype=torch.bool),
                "ea": (a64 - r64).abs(), "eb": (b64 - r64).abs(), "r": r64}
    ba, bb = judge.bounds(m)
    fin_a, fin_b = torch.isfinite(a64), torch.isfinite(b64)
    both_bad = ~fin_a & ~fin_b
    same_bad = both_bad & ((a64.isnan() & b64.isnan()) | (a64 == b64))
    nan = fin_a ^ fin_b | (both_bad & ~same_bad)
    ea, eb = (a64 - r64).abs(), (b64 - r64).abs()
    within = (ea <= ba) & (eb <= bb)
    fail = nan | (fin_a & fin_b & ~within)
    return {"d": torch.where(fin_a & fin_b, d, torch.zeros_like(d)), "allowed": ba + bb,
            "fail": fail, "nan": nan, "ea": ea, "eb": eb, "r": r64}


def compare(a: Any, b: Any, inputs: Any = None, *, input_shape: Sequence[int] | None = None,
            samples: int = 8, layers: bool = True, trust_pickle: bool = False) -> Report:
    """Compare models ``a`` and ``b`` and return a :class:`~fc2conv.verify.report.Report`.

    ``a``/``b``: ``nn.Module``, ``torch.export.ExportedProgram``, ``onnx.ModelProto`` or a path
    to ``.pt2``/``.onnx`` (``.pt``/``.pth`` pickles only with ``trust_pickle=True``).
    ``inputs``: a tensor/array or tuple of them; else ``samples`` random draws (the last one
    large-magnitude) shaped by ``input_shape`` or the models' input specs. Model ``a`` is the
    reference: its float64 twin defines the exact result.
    """
    ma = load(a, "A", trust_pickle=trust_pickle)
    mb = load(b, "B", trust_pickle=trust_pickle)
    if inputs is not None:
        draws = [as_tensors(inputs)]
        shown = ", ".join(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
                          for x in draws[0])
        input_text = f"the given inputs: {shown}"
    else:
        specs = resolve_specs(ma, mb, input_shape)
        draws = draw(specs, samples, ma.dtype)
        shapes = ", ".join(str(tuple(x.shape)) for x in draws[0])
        input_text = (f"{len(draws)} random normal draws of shape {shapes}"
                      + (", the last scaled to large magnitude" if len(draws) > 1 else ""))
    return _compare_loaded(ma, mb, draws, layers, input_text)


def _run_all(ma: Model, mb: Model, draws: list[tuple[torch.Tensor, ...]]) -> tuple[
        list[Any], bnd.OpStats]:
    runs = []
    stats = bnd.OpStats()
    for x in draws:
        try:
            ya = ma.run(x).outputs
        except Fc2ConvError:
            raise
        except Exception as err:
            raise Fc2ConvError(f"model A ({ma.label}) failed on inputs of shape "
                               f"{[tuple(t.shape) for t in x]}: {err}") from None
        try:
            yb = mb.run(x).outputs
        except Fc2ConvError:
            raise
        except Exception as err:
            raise Fc2ConvError(f"model B ({mb.label}) failed on inputs of shape "
                               f"{[tuple(t.shape) for t in x]}: {err}") from None
        if ma.kind == "torch":
            rrun, st = bnd.count_ops(lambda x=x: ma.run(x, "reference"))
            stats.reductions = max(stats.reductions, st.reductions)
            stats.longest = max(stats.longest, st.longest)
            stats.convs = max(stats.convs, st.convs)
            stats.matmuls = max(stats.matmuls, st.matmuls)
        else:
            from fc2conv.verify import onnx_backend

            rrun = ma.run(x, "reference")
            stats.reductions, stats.longest = onnx_backend.count_ops(ma.onnx_model)
        m = ma.run(x, "magnitude").outputs
        if len(ya) != len(yb):
            raise Fc2ConvError(f"model A returns {len(ya)} outputs and model B {len(yb)}; "
                               "they cannot be the same function")
        runs.append((ya, yb, rrun.outputs, m))
    return runs, stats


def _compare_loaded(ma: Model, mb: Model, draws: list[tuple[torch.Tensor, ...]], layers: bool,
                    input_text: str) -> Report:
    runs, stats = _run_all(ma, mb, draws)
    ra = bnd.rounding_for(ma.dtype, tf32=_tf32(ma, stats))
    rb = bnd.rounding_for(mb.dtype, tf32=_tf32(mb, stats))
    judge = Judge(ra, rb, stats)
    notes: list[str] = []

    # align B's outputs to A's layout
    aligned_runs = []
    for ya, yb, r, m in runs:
        yb_al = []
        for i, (ta, tb) in enumerate(zip(ya, yb, strict=True)):
            al = align(ta, tb)
            if al is None:
                raise Fc2ConvError(
                    f"output {i} of A has shape {tuple(ta.shape)} and of B {tuple(tb.shape)}: "
                    "they hold different numbers of values, so the models are not the same "
                    "function"
                )
            yb_al.append(al[0])
        aligned_runs.append((ya, yb_al, r, m))

    # model A must be deterministic, and within its own bound; else the empirical method
    deterministic = all(_exact_equal(t, u) for t, u in
                        zip(ma.run(draws[0]).outputs, runs[0][0], strict=True))
    if not deterministic:
        notes.append("model A gives different outputs on two runs of the same input "
                     "(a layer in training mode, such as dropout?)")
    elif ra.u_out > 0:
        rho, own_fail = 0.0, False
        for ya, _, r, m in aligned_runs:
            for ta, tr, tm in zip(ya, r, m, strict=True):
                if not ta.is_floating_point():
                    continue
                ba, _ = judge.bounds(tm)
                e = (ta.double() - tr.double()).abs()
                ok = torch.isfinite(e)
                if bool((e[ok] > ba[ok]).any()):
                    own_fail = True
                rho = max(rho, float((e[ok] / tm.double().abs()[ok].clamp_min(1e-300)).max())
                          if ok.any() else 0.0)
        if own_fail:
            judge.method, judge.rho = "empirical", rho
            notes.append("model A's own float error exceeds the Higham magnitude bound (its "
                         "graph has ops the bound does not cover, e.g. normalization or "
                         "softmax), so the empirical bound is used")

    outputs, identical = _output_stats(aligned_runs, judge, ma, mb)
    for ya, yb, _, _ in runs:
        identical = identical and all(_exact_equal(t, u) for t, u in zip(ya, yb, strict=True))
    different = any(o.mismatched for o in outputs) or not deterministic
    verdict = "identical" if identical and deterministic else (
        "different" if different else "equivalent")

    report = Report(
        verdict=verdict,
        max_abs_error=max((o.max_abs_error for o in outputs), default=0.0),
        max_rel_error=max((o.max_rel_error for o in outputs), default=0.0),
        ulp_error=max((o.ulp_error for o in outputs), default=0.0),
        bound=max((o.bound for o in outputs), default=0.0),
        bound_method=bnd.describe_method(judge.method, stats, [ra, rb]),
        tf32=ra.tf32 or rb.tf32,
        first_divergence=None, diagnosis=None, outputs=outputs,
        a=ma.describe(), b=mb.describe(), inputs=input_text, notes=notes,
    )
    if layers or verdict == "different":
        from fc2conv.verify.diagnose import localize

        localize(report, ma, mb, draws, judge, with_table=layers)
    return report


def _output_stats(aligned_runs: list[Any], judge: Judge, ma: Model, mb: Model) -> tuple[
        list[OutputStats], bool]:
    outputs: list[OutputStats] = []
    identical = True
    n_out = len(aligned_runs[0][0])
    for i in range(n_out):
        first = aligned_runs[0][0][i]
        st = OutputStats(name=f"output {i}" if n_out > 1 else "output",
                         shape=tuple(first.shape), dtype=str(first.dtype).replace("torch.", ""))
        for k, (ya, yb, r, m) in enumerate(aligned_runs):
            ta, tb, tr, tm = ya[i], yb[i], r[i], m[i]
            identical = identical and _exact_equal(ta, tb)
            c = _check_draw(ta, tb, tr, tm, judge)
            st.total += ta.numel()
            st.mismatched += int(c["fail"].sum())
            st.nan_mismatch += int(c["nan"].sum())
            st.a_error = max(st.a_error, _nanmax(c["ea"]))
            st.b_error = max(st.b_error, _nanmax(c["eb"]))
            st.bound = max(st.bound, _nanmax(c["allowed"]))
            if ta.numel() == 0:
                continue
            scale = float(c["r"].abs().nan_to_num(0, 0, 0).max()) * REL_FLOOR
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
    return outputs, identical


def _nanmax(t: torch.Tensor) -> float:
    t = t[~t.isnan()]
    return float(t.max()) if t.numel() else 0.0


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for dim in reversed(shape):
        idx.append(flat % dim)
        flat //= dim
    return tuple(reversed(idx))
