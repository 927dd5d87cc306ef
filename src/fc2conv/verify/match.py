"""Match layers of two models and align their output layouts.

Matching, in order of trust (:func:`match_layers`):
1. same name (``backbone.0`` in both; the k-th layer of a name with the k-th when a name occurs
   several times), or B's layer records A's name as its fc2conv provenance
   (``core.provenance.source_of``);
2. otherwise by order: the next unmatched B layer after the last match whose kind is compatible
   (Linear/Conv/Gemm/MatMul are all "affine"; activations by name) and whose output holds the
   same values up to layout.

Two ONNX graphs are paired by provenance and graph structure instead (:func:`match_graphs`,
with the :class:`~fc2conv.verify.structure.LayerNode` of each layer), never by names within a
module scope (an exporter gives a residual ``Add`` and a bias ``Add`` the same scope):
1. a value name both graphs hold (fc2conv keeps the names of the values it rewrites: B's Conv
   that absorbed A's ``MatMul`` and bias ``Add`` ends in the ``Add``'s output name);
2. B's node records an A node of the layer as its ``fc2conv.source``;
3. the same kind of op whose inputs come from layers already paired (or the same graph inputs),
   between the pairs around it.
A layer without a counterpart (a bias ``Add`` folded into B's Conv) stays unpaired.

Layout: a Linear's ``(B, S, C)`` output and a 1x1 conv's ``(B, C, S)`` output are the same
numbers. :func:`align` drops size-1 axes and tries the permutations of B's axes that give A's
shape, keeping the one closest to A's values.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from fc2conv.verify.structure import LayerNode
from fc2conv.verify.values import Alignment, Layer, Pair

__all__ = ["Alignment", "Pair", "align", "category", "compatible", "describe_pairs",
           "match_graphs", "match_layers"]

_AFFINE = {"linear", "conv1d", "conv2d", "conv3d", "gemm", "matmul", "conv", "bilinear"}


_KNOWN = {n.lower() for n in dir(nn) if isinstance(getattr(nn, n), type)} | {
    "gemm", "matmul", "conv", "relu", "tanh", "sigmoid", "add", "mul", "sub", "div", "maxpool",
    "averagepool", "globalaveragepool", "batchnormalization", "softmax", "gelu", "erf"}


def category(kind: str) -> str:
    """``"affine"`` for Linear/Conv/Gemm/MatMul, else the lower-cased op or class name."""
    head = kind.split(" ", 1)[0].lower()
    return "affine" if head in _AFFINE else head


def compatible(a_kind: str, b_kind: str) -> bool:
    """Same category, or at least one side a user-defined block (which may compute anything)."""
    ca, cb = category(a_kind), category(b_kind)
    if ca == cb:
        return True
    known = {"affine"} | _KNOWN
    return ca not in known or cb not in known


def align(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, Alignment] | None:
    """``b`` rearranged to ``a``'s shape (same values up to layout), or ``None`` if impossible."""
    if a.shape == b.shape:
        return b, Alignment(None, tuple(b.shape))
    if a.numel() != b.numel():
        return None
    a_sq = [d for d in a.shape if d != 1]
    b_sq = [d for d in b.shape if d != 1]
    if sorted(a_sq) != sorted(b_sq):
        return None
    bs = b.reshape(b_sq)
    best: tuple[float, torch.Tensor, tuple[int, ...]] | None = None
    ref = a.reshape(a_sq).double()
    for perm in itertools.permutations(range(len(b_sq))):
        if [b_sq[p] for p in perm] != a_sq:
            continue
        cand = bs.permute(perm)
        diff = (cand.double() - ref).abs()
        score = float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0
        if best is None or score < best[0]:
            best = (score, cand, perm)
        if len(b_sq) > 6:
            break
    if best is None:
        return None
    return best[1].reshape(a.shape), Alignment(best[2], tuple(b.shape))


def match_layers(a_layers: list[Layer], b_layers: list[Layer]) -> list[Pair]:
    """Pairs of corresponding layers, in A's order (see the module docstring)."""
    pairs: dict[int, Pair] = {}
    used: set[int] = set()
    # 1. names and provenance
    for i, la in enumerate(a_layers):
        candidates = [(j, "name") for j, lb in enumerate(b_layers)
                      if lb.name == la.name and compatible(la.kind, lb.kind)]
        occurrence = sum(layer.name == la.name for layer in a_layers[:i])
        if len(candidates) == sum(layer.name == la.name for layer in a_layers) > 1:
            candidates = [candidates[occurrence]]  # a name used several times: k-th with k-th
        candidates += [(j, "provenance") for j, lb in enumerate(b_layers)
                       if lb.source == la.name and lb.name != la.name]
        for j, how in reversed(candidates):  # the outermost/last module with that name wins
            if j in used:
                continue
            al = align(la.output, b_layers[j].output)
            if al is not None:
                pairs[i] = Pair(la, b_layers[j], al[0], al[1], how)
                used.add(j)
                break
    # 2. order and shape, between the anchors set by step 1
    last_j = -1
    for i, la in enumerate(a_layers):
        if i in pairs:
            last_j = max(last_j, b_layers.index(pairs[i].b))
            continue
        next_anchor = min((b_layers.index(p.b) for k, p in pairs.items() if k > i),
                          default=len(b_layers))
        for j in range(last_j + 1, next_anchor):
            if j in used or category(b_layers[j].kind) != category(la.kind):
                continue
            al = align(la.output, b_layers[j].output)
            if al is not None:
                pairs[i] = Pair(la, b_layers[j], al[0], al[1], "order")
                used.add(j)
                last_j = j
                break
    return [pairs[i] for i in sorted(pairs)]


def match_graphs(a_layers: list[Layer], b_layers: list[Layer], sa: list[LayerNode],
                 sb: list[LayerNode]) -> list[Pair]:
    """Pairs of corresponding layers of two ONNX graphs, in A's order, by shared value names,
    fc2conv provenance and graph structure (see the module docstring); ``sa``/``sb`` describe
    ``a_layers``/``b_layers`` one to one."""
    pairs: dict[int, Pair] = {}
    b_of: dict[int, int] = {}

    def pair(i: int, j: int, how: str) -> bool:
        if i in pairs or j in b_of.values():
            return False
        al = align(a_layers[i].output, b_layers[j].output)
        if al is None:
            return False
        pairs[i] = Pair(a_layers[i], b_layers[j], al[0], al[1], how)
        b_of[i] = j
        return True

    # 1. the same value, by name
    holder = {v: j for j, s in enumerate(sb) for v in s.values}
    for i, s in enumerate(sa):
        for v in [s.value, *sorted(s.values - {s.value})]:
            if v in holder and pair(i, holder[v], "value"):
                break
    # 2. fc2conv provenance: B's node replaces a node of A's layer
    layer_of = {node: i for i, s in enumerate(sa) for node in s.nodes}
    for j, s in enumerate(sb):
        for src in sorted(s.sources):
            if src in layer_of and pair(layer_of[src], j, "provenance"):
                break
    # 3. structure: same kind of op, inputs from paired layers, between the pairs around it
    for i, la in enumerate(a_layers):
        if i in pairs:
            continue
        lo = max((j for k, j in b_of.items() if k < i), default=-1)
        hi = min((j for k, j in b_of.items() if k > i), default=len(b_layers))
        want = sorted(str(b_of.get(x, "?")) if isinstance(x, int) else x for x in sa[i].inputs)
        if "?" in want:
            continue
        for j in range(lo + 1, hi):
            if j in b_of.values() or category(b_layers[j].kind) != category(la.kind):
                continue
            if sorted(str(x) for x in sb[j].inputs) == want and pair(i, j, "structure"):
                break
    return [pairs[i] for i in sorted(pairs)]


def describe_pairs(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Matched layer pairs as plain dicts (for debugging and JSON)."""
    return [{"a": p.a.name, "b": p.b.name, "how": p.how, "layout": p.alignment.describe()}
            for p in pairs]
