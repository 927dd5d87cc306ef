"""Judging two models' tensors (outputs, or one layer's outputs) against a float64 reference.

``Judge.check`` is the rule of ``compare``, one tensor of one draw at a time:

- both models compute in the same precision (the usual case: a model and its conversion):
  an element disagrees when B's error against the float64 reference ``r`` exceeds
  :data:`B_ERROR_RATIO` (10) times A's largest error on that tensor (at least one unit roundoff
  of the tensor's scale; :func:`judge_relative`) *and* rounding cannot explain it: B is beyond
  its worst-case bound there, or (decided in ``compare``) ``|A - B|`` is beyond 4x the rounding
  noise measured on A, op by op (:mod:`fc2conv.verify.noise`, :mod:`fc2conv.verify.onnx_noise`). In
  the layer table, the first layer beyond both is the first divergence; where the worst-case
  bound singles out no layer, the first where B's error exceeds 10x A's. In the grey zone —
  the ratio fires, bound and noise do not — B's own float64 twin decides
  (:func:`float64_split`, in ``compare``): B's error splits into its own rounding
  ``|B32 - B64|`` and what it computes otherwise ``|B64 - r|``; an element differs when the
  latter is more than :data:`FLOAT64_SHARE` (half) of B's error. The ratio is a
  necessary condition, so an element whose worst-case bound happens to be ~0 raises no false
  alarm; the bound and the noise keep a B that merely sums in
  another, less accurate order (bfloat16 partial sums) equivalent. A bug whose effect on B
  exceeds 10x A's error is caught unless rounding could produce it.
- different precisions (float32 vs float16, TF32 vs not): :func:`check_elements` — each model
  within its own worst-case bound of ``r`` (``|a - r| <= bound_a``, ``|b - r| <= bound_b``),
  each bound at least one unit roundoff of the tensor's scale.

Everywhere: NaN or Inf in one model only (or different non-finite values) is a disagreement;
the same non-finite value in both agrees; integer tensors must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fc2conv.verify import bound as bnd
from fc2conv.verify.bound import B_ERROR_RATIO
from fc2conv.verify.reference import Reference

FLOAT64_SHARE = 0.5
"""In the grey zone, B differs where ``|B64 - r| > FLOAT64_SHARE x |B32 - r|``
(:func:`float64_split`)."""


@dataclass
class Judge:
    """How model errors are judged: the bound method and, for the empirical fallback, the
    factor by which the bounds are scaled."""

    ra: bnd.Rounding
    rb: bnd.Rounding
    method: str = "running"
    scale: float = 1.0
    stats: bnd.OpStats = field(default_factory=bnd.OpStats)

    def bounds(self, ref: Reference, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.bound_a[i] * self.scale, ref.bound_b[i] * self.scale

    @property
    def relative(self) -> bool:
        """Both models compute in the same precision: B's error is judged against A's
        (:func:`judge_relative`); else against the worst-case bounds (:func:`check_elements`)."""
        return (self.ra.dtype == self.rb.dtype and self.ra.tf32 == self.rb.tf32
                and self.ra.u_out > 0)

    def check(self, ya: torch.Tensor, yb: torch.Tensor, r: torch.Tensor, ba: torch.Tensor,
              bb: torch.Tensor, *, gated: bool = True) -> dict[str, torch.Tensor]:
        """The elementwise verdict for one tensor (an output or a layer) of one draw, given the
        (already scaled) worst-case bounds of A and B there. Same precision: an element fails
        when B's error exceeds 10x A's (:func:`judge_relative`) *and* (``gated``) the worst-case
        bound — a B that sums in another order may be less accurate than A, never beyond what
        rounding can do; ``c["gate"]`` holds the ratio rule alone."""
        if self.relative and ya.is_floating_point() and yb.is_floating_point():
            c = judge_relative(ya, yb, r, self.ra.u_out)
            if gated:
                w = self._bounded(ya, yb, r, ba, bb)
                c["fail"] = c["nan"] | (c["gate"] & w["fail"])
            return c
        return self._bounded(ya, yb, r, ba, bb)

    def _bounded(self, ya: torch.Tensor, yb: torch.Tensor, r: torch.Tensor, ba: torch.Tensor,
                 bb: torch.Tensor) -> dict[str, torch.Tensor]:
        if ya.is_floating_point() and yb.is_floating_point():
            # a bound of ~0 at one element (a value that cancels to ~0) is no evidence: each
            # model may always be off by one unit roundoff of the tensor's scale
            fin = torch.isfinite(r)
            scale = float(r.double()[fin].abs().max()) if bool(fin.any()) else 0.0
            ba = ba.clamp_min(self.ra.u_out * scale)
            bb = bb.clamp_min(self.rb.u_out * scale)
        c = check_elements(ya, yb, r, ba, bb)
        c["ratio"] = c["d"] / c["allowed"].clamp_min(1e-300)
        return c


def exact_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equal, NaNs in the same places counting as equal."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.is_floating_point():
        return bool(((x == y) | (x.isnan() & y.isnan())).all())
    return bool((x == y).all())


def check_elements(ya: torch.Tensor, yb: torch.Tensor, r: torch.Tensor, ba: torch.Tensor,
                   bb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Elementwise verdict ingredients for one output of one draw (all float64)."""
    a64, b64, r64 = ya.double(), yb.double(), r.double()
    d = (a64 - b64).abs()
    ea, eb = (a64 - r64).abs(), (b64 - r64).abs()
    if not (ya.is_floating_point() and yb.is_floating_point()):
        zero = torch.zeros_like(d)
        return {"d": d, "allowed": zero, "fail": d != 0,
                "nan": torch.zeros_like(d, dtype=torch.bool), "ea": ea, "eb": eb, "r": r64}
    fin_a, fin_b = torch.isfinite(a64), torch.isfinite(b64)
    both_bad = ~fin_a & ~fin_b
    same_bad = both_bad & ((a64.isnan() & b64.isnan()) | (a64 == b64))
    nan = fin_a ^ fin_b | (both_bad & ~same_bad)
    within = (ea <= ba) & (eb <= bb)
    fail = nan | (fin_a & fin_b & ~within)
    return {"d": torch.where(fin_a & fin_b, d, torch.zeros_like(d)), "allowed": ba + bb,
            "fail": fail, "nan": nan, "ea": ea, "eb": eb, "r": r64}


def error_floor(ya: torch.Tensor, r: torch.Tensor, u: float) -> float:
    """``max(max |A - r|, u · max |r|)`` over the finite elements: A's own largest error against
    the float64 reference, at least one unit roundoff of the output's scale (so that an output
    A happens to round perfectly cannot make any rounding of B look large)."""
    a64, r64 = ya.double(), r.double()
    fin = torch.isfinite(a64) & torch.isfinite(r64)
    if not bool(fin.any()):
        return float(torch.finfo(torch.float64).tiny)
    ea = float((a64[fin] - r64[fin]).abs().max())
    scale = float(r64[fin].abs().max())
    return max(ea, u * scale, float(torch.finfo(ya.dtype).tiny)
               if ya.is_floating_point() else 0.0, 1e-300)


def judge_relative(ya: torch.Tensor, yb: torch.Tensor, r: torch.Tensor,
                   u: float) -> dict[str, torch.Tensor]:
    """The rule when both models compute in the same precision: an element fails when B's
    error against the float64 reference exceeds :data:`B_ERROR_RATIO` times A's largest error
    (:func:`error_floor`), or holds NaN/Inf where A does not (or the other way round).

    Two float implementations of the same function err by similar amounts, whatever their
    summation order; a bug that moves B further from the exact result than rounding moves A is
    caught whatever the worst-case bound says (it can be 100x loose around softmax or layer
    norm), and an element whose worst-case bound happens to be ~0 cannot raise a false alarm.
    """
    c = check_elements(ya, yb, r, torch.zeros_like(r, dtype=torch.float64),
                       torch.zeros_like(r, dtype=torch.float64))
    if not (ya.is_floating_point() and yb.is_floating_point()):
        return c
    floor = error_floor(ya, r, u)
    eb = c["eb"]
    beyond = torch.isfinite(eb) & (eb > B_ERROR_RATIO * floor)
    c["gate"] = beyond
    c["fail"] = c["nan"] | beyond
    c["allowed"] = torch.full_like(eb, B_ERROR_RATIO * floor + floor)
    c["ratio"] = (eb.nan_to_num(0.0, 0.0, 0.0) / floor)
    return c


def float64_split(yb: torch.Tensor, b64: torch.Tensor, r: torch.Tensor,
                  gate: torch.Tensor) -> dict[str, torch.Tensor]:
    """B's error against A's float64 reference ``r``, split by B's own float64 twin ``b64``:
    ``|B32 - r| <= |B32 - B64| + |B64 - r|``, B's own rounding (whatever its summation order,
    blocking or fused kernels: those change B32, not B64) plus what B computes differently from
    A in near-exact arithmetic. Returned (float64, shaped like ``r``): ``eb = |B32 - r|``,
    ``own = |B32 - B64|``, ``d64 = |B64 - r|`` and ``share = d64 / eb`` on the ``gate``
    elements (B's error beyond 10x A's, :func:`judge_relative`; 0 elsewhere and where a value
    is not finite); ``fail``: the gate elements where ``share > FLOAT64_SHARE``.

    Why half. A correct B (a conversion, another summation order) has ``|B64 - r|`` at float64
    rounding (~1e-16 relative, 1e-9 of a float32 error) plus at most the one-time float32
    rounding of constants its exporter or converter computed and stored (folded BatchNorm
    scales, ``1/sqrt(d)``): relative ``u`` once per constant, propagated like a perturbation of
    the weights, which is of the order of A's own float32 forward error (that rounds every op
    result at least once) or below. On a gate element ``eb > 10 e_A`` (``e_A``: A's largest
    error), so ``share > 1/2`` means ``|B64 - r| > 5 e_A``: five times what a one-time rounding
    of every constant typically moves the output, and a B whose excess is its own float32
    rounding (a worse order) has ``share ~ 0``. A planted bug moves B64 by the bug's effect,
    which is B's whole excess: ``share >= 1 - |B32 - B64| / eb``, above 0.7 even when B rounds
    three times worse than A at the lowest gate (``eb = 10 e_A``).

    Calibration. The zoo's MONAI EfficientNet 3-D, +1e-3 on one head weight, the draws the
    noise rule missed (PyTorch path: draws 2, 13, 16, 17 of ``bench/verdicts.py``; ONNX: 2, 13,
    17), B erring 11-33x A's: share 97-102% (B's own float32 rounding 1-3% of its error); a
    pooling summed position by position, or shifted by a constant, erring >10x A's, and the
    export of the shifted one with its BatchNorm folded in float32
    (``tests/test_verify_float64_split.py``): share a few % (3.2% on the export). The zoo's clean
    rows: see the README.
    """
    r64, b32, bt = r.double(), yb.double(), b64.double().reshape(r.shape)
    eb, own, d64 = (b32 - r64).abs(), (b32 - bt).abs(), (bt - r64).abs()
    ok = gate.reshape(r.shape) & torch.isfinite(eb) & torch.isfinite(d64) & (eb > 0)
    share = torch.where(ok, d64 / eb.clamp_min(1e-300), torch.zeros_like(eb))
    return {"eb": eb, "own": own, "d64": d64, "share": share, "fail": share > FLOAT64_SHARE}


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a tensor (0, 0 for integers)."""
    if not t.is_floating_point():
        return 0, 0
    return int(t.isnan().sum()), int(t.isinf().sum())
