"""Where two models part: the layer table.

:func:`localize` captures both models' layer outputs on the first and the large-magnitude draw
(:meth:`~fc2conv.verify.models.Model.run` with ``capture=True``, and model A's float64
reference of each layer, :func:`~fc2conv.verify.reference.reference`), pairs them
(:func:`pair_layers`: two ONNX graphs by provenance and graph structure, else by names and
order, :mod:`fc2conv.verify.match`) and judges each pair by the rule that judges the outputs
(:class:`~fc2conv.verify.judge.Judge`, against that layer's float64 reference and bounds). It
returns a :class:`~fc2conv.verify.values.Localization`:

- ``beyond``: the first pair judged different (B's error beyond 10x A's *and* beyond the
  layer's worst-case bound);
- ``ratio``: the first pair where B's error exceeds 10x A's alone: where the worst-case bound is
  too loose to single out a layer (the magnitude bound through a deep stack of batch norms or
  attention can exceed the values themselves), it localizes a difference the outputs already
  decided, when it comes first;
- the table (one row per pair, the worst of the two draws) and notes (where NaN/Inf first
  appear).

The layers only localize: the verdict is the outputs' (:mod:`fc2conv.verify.verdict`); what a
straying layer means for the report is decided when it is assembled (:mod:`fc2conv.verify.compare`).
Nothing given to :func:`localize` is changed.
"""

from __future__ import annotations

from typing import Any

import torch

from fc2conv.verify.bound import EMPIRICAL_FACTOR
from fc2conv.verify.judge import Judge, exact_equal
from fc2conv.verify.match import match_graphs, match_layers
from fc2conv.verify.models import Model
from fc2conv.verify.reference import reference
from fc2conv.verify.report import LayerStats
from fc2conv.verify.values import Divergence, Layer, Localization, Pair

__all__ = ["localize", "pair_layers"]


def localize(ma: Model, mb: Model, draws: list[tuple[torch.Tensor, ...]],
             judge: Judge) -> Localization:
    """The layer table of ``ma`` against ``mb`` on the first and the last draw (see the module
    docstring). Capture is best effort: when it fails, ``captured`` is false and a note says
    why."""
    chosen = [draws[0]] + ([draws[-1]] if len(draws) > 1 else [])
    table: dict[tuple[str, str], LayerStats] = {}
    beyond: Divergence | None = None
    ratio: Divergence | None = None
    notes: list[str] = []
    nonfinite: dict[str, str] = {}
    for k, x in enumerate(chosen):
        try:
            la = ma.run(x, capture=True).layers
            lb = mb.run(x, capture=True).layers
            ref = reference(ma, x, judge.ra, judge.rb, capture=True)
        except Exception as err:  # capture is best effort: the verdict stands without it
            notes.append(f"layer outputs could not be captured: {err}")
            return Localization(notes=tuple(notes), captured=False)
        usable = len(ref.layer_bound_a) == len(la) == len(ref.layers)
        per_layer = {id(layer): (ref.layers[i].output, ref.layer_bound_a[i] * judge.scale,
                                 ref.layer_bound_b[i] * judge.scale)
                     for i, layer in enumerate(la)} if usable else {}
        for who, layers_ in (("A", la), ("B", lb)):
            bad = _first_nonfinite(layers_)
            if bad is not None and who not in nonfinite:
                nonfinite[who] = bad
                notes.append(f"NaN/Inf first appear in {who} at layer '{bad}' (draw {k})")
        for pos, p in enumerate(pair_layers(ma, mb, la, lb)):
            entry = per_layer.get(id(p.a))
            if entry is None or entry[0].shape != p.a.output.shape:
                continue  # no reference for this layer: it cannot be judged
            c = _judge_layer(judge, p.a.output, p.b_aligned, *entry)
            allowed = c["allowed"]
            d = c["d"]
            ok = not bool(c["fail"].any())
            flat = int(torch.argmax(d)) if d.numel() else 0
            dmax = float(d.reshape(-1)[flat]) if d.numel() else 0.0
            there = float(allowed.reshape(-1)[flat]) if d.numel() else 0.0
            worst = float(c["ratio"].max()) if d.numel() else 0.0
            key = (p.a.name, p.b.name)
            row = table.get(key)
            if row is None or dmax > row.max_abs_error:
                table[key] = LayerStats(p.a.name, p.b.name, p.a.kind, p.how,
                                        p.alignment.describe(), dmax, there,
                                        ok and (row is None or row.ok),
                                        max(worst, row.ratio if row else 0.0))
            else:
                row.ok = row.ok and ok
                row.ratio = max(row.ratio, worst)
            if not ok and (beyond is None or pos < beyond.position):
                beyond = Divergence(pos, p, allowed, tuple(la))
            gate = c.get("gate")
            if (gate is not None and bool(gate.any()) and not exact_equal(p.a.output, p.b_aligned)
                    and (ratio is None or pos < ratio.position)):
                ratio = Divergence(pos, p, allowed, tuple(la))
    return Localization(table=tuple(table.values()), beyond=beyond, ratio=ratio,
                        notes=tuple(notes))


def pair_layers(ma: Model, mb: Model, la: list[Layer], lb: list[Layer]) -> list[Pair]:
    """Corresponding layers of ``ma`` and ``mb``: two ONNX graphs by provenance and graph
    structure (:func:`~fc2conv.verify.match.match_graphs`), else by names and order."""
    if ma.kind == "onnx" and mb.kind == "onnx":
        from fc2conv.verify import onnx_backend
        from fc2conv.verify.structure import describe_layers

        ca = onnx_backend._layer_nodes(ma.onnx_model)
        cb = onnx_backend._layer_nodes(mb.onnx_model)
        if [c[0] for c in ca] == [x.name for x in la] and [c[0] for c in cb] == [x.name
                                                                          for x in lb]:
            sa = describe_layers(ma.onnx_model, ca, onnx_backend.LAYOUT_OPS)
            sb = describe_layers(mb.onnx_model, cb, onnx_backend.LAYOUT_OPS)
            return match_graphs(la, lb, sa, sb)
    return match_layers(la, lb)


def _judge_layer(judge: Judge, ya: torch.Tensor, yb: torch.Tensor, r: torch.Tensor,
                 ba: torch.Tensor, bb: torch.Tensor) -> dict[str, Any]:
    """``judge.check`` for one layer (same precision: B's error beyond 10x A's *and* beyond
    the worst-case bound). Bitwise-equal layers agree. Where model A itself exceeds its bound on
    this layer (an op the bound does not model, e.g. layer norm), both bounds are scaled by the
    empirical factor times A's excess, as ``compare`` does for outputs."""
    c = judge.check(ya, yb, r, ba, bb)
    if exact_equal(ya, yb):
        c["fail"] = torch.zeros_like(c["fail"])
        return c
    if not ya.is_floating_point() or not bool(c["fail"].any()):
        return c
    ea = c["ea"]
    fin = torch.isfinite(ea)
    if fin.any():
        rho = float((ea[fin] / ba[fin].clamp_min(1e-300)).max())
        if rho > 1.0:
            k = EMPIRICAL_FACTOR * rho
            c = judge.check(ya, yb, r, ba * k, bb * k)
    return c


def _first_nonfinite(layers: list[Layer]) -> str | None:
    for layer in layers:
        t = layer.output
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return layer.name
    return None
