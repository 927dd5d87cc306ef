"""Judging model outputs against their rounding bounds, element by element.

``check_elements`` is the rule of ``compare``: an element agrees when both models are within
their own bound of the float64 reference (``|a - r| <= bound_a`` and ``|b - r| <= bound_b``), or
both are the same non-finite value; NaN or Inf in one model only is a disagreement. Integer
outputs must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fc2conv.verify import bound as bnd
from fc2conv.verify.reference import Reference


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
