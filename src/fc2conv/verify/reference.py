"""Model ``a``'s float64 reference and the elementwise error bounds of both models around it.

Method, in order of preference:

1. ``running`` (PyTorch models): Higham's bound carried op by op through the float64 run
   (:mod:`fc2conv.verify.running`), once with model ``a``'s unit roundoffs and once with
   ``b``'s.
2. ``magnitude`` (ONNX models, or graphs with ops the running bound has no rule for): the
   closed-form bound ``((1+δ)^(L+1) - 1) M`` on the magnitude twin (:mod:`fc2conv.verify.bound`).

Either way ``bound_a[i]`` bounds ``|a_i - r_i|`` and ``bound_b[i]`` bounds ``|b_i - r_i|``
elementwise, so ``|a_i - b_i| <= bound_a[i] + bound_b[i]`` is what rounding allows.
"""

from __future__ import annotations

import torch

from fc2conv.verify import bound as bnd
from fc2conv.verify.models import Model
from fc2conv.verify.running import track
from fc2conv.verify.values import Reference

__all__ = ["Reference", "reference", "reference_notes"]


def _floor(r: bnd.Rounding, stats: bnd.OpStats) -> float:
    if not r.dtype.is_floating_point:
        return 0.0
    info = torch.finfo(r.dtype)
    return float((stats.reductions + 1) * (stats.longest + 2) * info.tiny * info.eps)


def reference(ma: Model, x: tuple[torch.Tensor, ...], ra: bnd.Rounding, rb: bnd.Rounding, *,
              capture: bool = False) -> Reference:
    """Run ``ma`` in float64 on ``x`` and bound both models' errors (see module docstring)."""
    unsupported: set[str] = set()
    if ma.kind == "torch":
        run_a, ta = track(lambda: ma.run(x, "reference", capture=capture), ra)
        run_b, tb = (run_a, ta) if rb == ra else track(
            lambda: ma.run(x, "reference", capture=capture), rb)
        unsupported = ta.unsupported | tb.unsupported
        stats = ta.stats
        ea = [ta.error_of(t) for t in run_a.outputs]
        eb = [tb.error_of(t) for t in run_b.outputs]
        finite = all(bool(torch.isfinite(e).all()) for e in ea + eb)
        if not unsupported and finite:
            fa, fb = _floor(ra, stats), _floor(rb, stats)
            lba = [ta.error_of(layer.output) + fa for layer in run_a.layers]
            lbb = [tb.error_of(layer.output) + fb for layer in run_b.layers]
            return Reference(
                outputs=run_a.outputs,
                bound_a=[_zero_if_exact(e + fa, t, ra) for e, t in zip(ea, run_a.outputs,
                                                                       strict=True)],
                bound_b=[_zero_if_exact(e + fb, t, rb) for e, t in zip(eb, run_a.outputs,
                                                                       strict=True)],
                method="running", stats=stats, layers=run_a.layers,
                layer_bound_a=lba, layer_bound_b=lbb, unsupported=unsupported)
        ref_run = run_a
    else:
        from fc2conv.verify import onnx_backend

        ref_run = ma.run(x, "reference", capture=capture)
        stats = bnd.OpStats()
        stats.reductions, stats.longest = onnx_backend.count_ops(ma.onnx_model, ma.cache)
    mag = ma.run(x, "magnitude", capture=capture)
    ca, cb = bnd.coefficient(ra, stats), bnd.coefficient(rb, stats)
    ba = [bnd.elementwise_bound(m, ca, ra, stats) for m in mag.outputs]
    bb = [bnd.elementwise_bound(m, cb, rb, stats) for m in mag.outputs]
    lba, lbb = [], []
    if len(mag.layers) == len(ref_run.layers):
        lba = [bnd.elementwise_bound(m.output, ca, ra, stats) for m in mag.layers]
        lbb = [bnd.elementwise_bound(m.output, cb, rb, stats) for m in mag.layers]
    return Reference(outputs=ref_run.outputs, bound_a=ba, bound_b=bb, method="magnitude",
                     stats=stats, layers=ref_run.layers, layer_bound_a=lba, layer_bound_b=lbb,
                     unsupported=unsupported, engine=ref_run.engine)


def _zero_if_exact(e: torch.Tensor, t: torch.Tensor, r: bnd.Rounding) -> torch.Tensor:
    return e if t.is_floating_point() and r.dtype.is_floating_point else torch.zeros_like(e)


def reference_notes(refs: list[Reference], budget_note: str | None) -> list[str]:
    """Which engine ran model A's float64 twin, when it is an ONNX graph (the report says it),
    and how memory was saved when it had to be (:mod:`fc2conv.verify.budget`)."""
    saved = [budget_note] if budget_note else []
    engines = list(dict.fromkeys(ref.engine for ref in refs if ref.engine))
    if not engines:
        return saved
    text = f"float64 reference: model A run by {' and '.join(engines)}"
    if any("in float32" in e for e in engines):
        text += " (exact only up to float32 rounding at those ops: they have no float64 kernel)"
    return [text, *saved]
