"""The result of ``compare``: a verdict, the numbers behind it, and where and why it differs.

``str(report)`` reads like ``torch.testing.assert_close``: a header with the verdict, then per
output the mismatch count and the worst absolute and relative difference *with its index* and
what rounding allowed there; then the bound used, the first diverging layer, the diagnosis and a
per-layer table. ``report.to_json()`` holds the same as a JSON document. ``weight_shared_with``
lists the other layers that read the first diverging layer's weight (tied weights; the
diagnosis says so in one sentence).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fc2conv.verify.bound import B_ERROR_RATIO

VERDICTS = ("identical", "equivalent", "different")

_HEADLINE = {
    "identical": "IDENTICAL: the outputs are bitwise equal.",
    "equivalent": "EQUIVALENT: the outputs differ only by floating-point rounding.",
    "different": "DIFFERENT: the outputs differ by more than floating-point rounding can explain.",
}


@dataclass
class OutputStats:
    """Comparison of one model output over all input draws."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    mismatched: int = 0
    total: int = 0
    max_abs_error: float = 0.0
    abs_index: tuple[int, ...] | None = None
    abs_allowed: float = 0.0
    max_rel_error: float = 0.0
    rel_index: tuple[int, ...] | None = None
    rel_allowed: float = 0.0
    ulp_error: float = 0.0
    a_error: float = 0.0  # max |a - float64 reference|
    b_error: float = 0.0  # max |b - float64 reference|
    bound: float = 0.0  # the largest elementwise bound (|a-b| allowed) over the output
    nan_mismatch: int = 0
    nan_a: int = 0  # NaN / Inf counts in each model's output, summed over the draws
    inf_a: int = 0
    nan_b: int = 0
    inf_b: int = 0
    scale: float = 0.0  # max |float64 reference| over the output: the output's magnitude
    sample: int | None = None  # the draw holding the worst absolute difference


@dataclass
class LayerStats:
    a_name: str
    b_name: str
    kind: str
    matched_by: str
    layout: str
    max_abs_error: float
    allowed: float  # what rounding allows at the element of max_abs_error
    ok: bool
    ratio: float = 0.0  # max over elements of |A - B| / allowed


@dataclass
class Report:
    """Verdict of ``fc2conv.compare(a, b)``. See the module docstring."""

    verdict: str
    max_abs_error: float
    max_rel_error: float
    ulp_error: float
    bound: float
    bound_method: str
    tf32: bool
    first_divergence: str | None
    diagnosis: str | None
    outputs: list[OutputStats] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)
    a: str = "A"
    b: str = "B"
    inputs: str = ""
    notes: list[str] = field(default_factory=list)
    weight_shared_with: list[str] = field(default_factory=list)  # of first_divergence's layer

    def __bool__(self) -> bool:
        return self.verdict != "different"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return _finite(d)  # type: ignore[no-any-return]

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [_HEADLINE[self.verdict], f"  {self.a}", f"  {self.b}"]
        if self.inputs:
            lines.append(f"  Inputs: {self.inputs}")
        for o in self.outputs:
            lines.append("")
            lines.append(f"Output {o.name!r} ({'x'.join(map(str, o.shape))}, {o.dtype}):")
            pct = 100.0 * o.mismatched / max(o.total, 1)
            lines.append(f"  Mismatched elements: {o.mismatched} / {o.total} ({pct:.1f}%)")
            if o.nan_a or o.inf_a or o.nan_b or o.inf_b:
                lines.append(f"  Non-finite values: A {o.nan_a} NaN, {o.inf_a} Inf; "
                             f"B {o.nan_b} NaN, {o.inf_b} Inf")
            if o.nan_mismatch:
                lines.append(f"  NaN/Inf in one model only (or different): {o.nan_mismatch} "
                             "elements")
            where = f" (draw {o.sample})" if o.sample is not None else ""
            lines.append(
                f"  Greatest absolute difference: {_g(o.max_abs_error)} at index "
                f"{_idx(o.abs_index)}{where} (up to {_g(o.abs_allowed)} allowed)"
            )
            lines.append(
                f"  Greatest relative difference: {_g(o.max_rel_error)} at index "
                f"{_idx(o.rel_index)} (up to {_g(o.rel_allowed)} allowed)"
            )
            lines.append(f"  ULP distance: {_g(o.ulp_error)}; error vs float64 reference: "
                         f"A {_g(o.a_error)}, B {_g(o.b_error)}")
        lines.append("")
        lines.append(f"Bound: {self.bound_method}")
        lines.append(f"  largest allowed |A - B| over all outputs: {_g(self.bound)}")
        if self.tf32:
            lines.append("  TF32 was in play (CUDA, float32): judged by TF32's unit roundoff "
                         "2^-11, not float32's.")
        for note in self.notes:
            lines.append(f"Note: {note}")
        if self.verdict == "different" or self.first_divergence:
            lines.append("")
            lines.append(f"First divergence: {self.first_divergence or 'not localized'}")
            if self.diagnosis:
                lines.append(f"Diagnosis: {self.diagnosis}")
        if self.layers:
            lines.append("")
            lines.append(self.layer_table())
        return "\n".join(lines)

    def layer_table(self) -> str:
        """Per-layer errors as a fixed-width text table."""
        head = ("layer (A)", "layer (B)", "kind", "matched", "max |A-B|", "allowed there",
                "max ratio", "")
        rows = [head] + [
            (s.a_name, s.b_name + (f" [{s.layout}]" if s.layout else ""), s.kind, s.matched_by,
             _g(s.max_abs_error), _g(s.allowed), _g(s.ratio), "ok" if s.ok else "DIVERGES")
            for s in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        out = ["Layers:"]
        for r in rows:
            cells = (c.ljust(w) for c, w in zip(r, widths, strict=True))
            out.append(("  " + "  ".join(cells)).rstrip())
        out.append(f"  max ratio: B's error against the float64 reference over A's when both "
                   f"compute in one precision (a layer diverges above {B_ERROR_RATIO:g} and "
                   "beyond its worst-case bound), else |A-B| over what is allowed there (above 1)")
        return "\n".join(out)


def _g(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.3g}"


def _idx(index: tuple[int, ...] | None) -> str:
    return "-" if index is None else str(tuple(index))


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
