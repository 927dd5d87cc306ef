"""The values that travel down ``compare``'s pipeline (see :mod:`fc2conv.verify`).

Each stage returns one of these and the next stage reads it; none is changed after it is made:

- :class:`InputSpec` (loading): what a model takes;
- :class:`Run` of :class:`Layer` (backends): a model's outputs on one draw and, when captured,
  its per-layer tensors named as the user knows the layers;
- :class:`Reference` (reference): model A's float64 outputs and the elementwise error bounds of
  both models around them;
- :class:`Alignment` / :class:`Pair` (localize): two corresponding layers, B's tensor put in A's
  layout; :class:`Divergence`, the first pair that parts, and :class:`Localization`, the layer
  table and what it found;
- :class:`Diagnosis` (diagnose): where the models part and the tested cause.

The verdict of the outputs (:class:`fc2conv.verify.verdict.Verdict`) holds the judge's rule and
is defined beside it; the :class:`~fc2conv.verify.report.Report` is assembled once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fc2conv.verify.bound import OpStats
from fc2conv.verify.report import LayerStats


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (``None`` for a dynamic axis) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype
    high: int | None = None  # integer inputs: ids are drawn in [0, high) (a table's rows)


@dataclass(eq=False)
class Layer:
    """One captured intermediate output, named as the user knows the layer."""

    name: str
    kind: str  # "Linear 256->64", "ReLU", "Gemm", ...
    output: torch.Tensor
    source: str | None = None  # fc2conv provenance: the user's layer this one replaces
    input: torch.Tensor | None = None
    module: nn.Module | None = None


@dataclass
class Run:
    """A model's outputs on one draw (flattened to a list of tensors) and, when captured, its
    layers in the order they ran."""

    outputs: list[torch.Tensor]
    layers: list[Layer] = field(default_factory=list)
    engine: str = ""  # ONNX: what ran it ("onnxruntime (float64)", "onnx reference evaluator")


@dataclass
class Reference:
    """Model A's float64 run on one draw, and elementwise bounds of each model's error around
    it: ``|a_i - r_i| <= bound_a[i]``, ``|b_i - r_i| <= bound_b[i]`` (see
    :mod:`fc2conv.verify.reference`)."""

    outputs: list[torch.Tensor]
    bound_a: list[torch.Tensor]
    bound_b: list[torch.Tensor]
    method: str
    stats: OpStats
    layers: list[Layer] = field(default_factory=list)
    layer_bound_a: list[torch.Tensor] = field(default_factory=list)  # per captured layer
    layer_bound_b: list[torch.Tensor] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    engine: str = ""  # what ran the float64 twin (ONNX: onnxruntime or the reference evaluator)


@dataclass(frozen=True)
class Alignment:
    """How B's tensor was rearranged to A's shape."""

    perm: tuple[int, ...] | None  # permutation applied to B's squeezed axes; None = as is
    b_shape: tuple[int, ...]

    def describe(self) -> str:
        if self.perm is None:
            return ""
        if list(self.perm) == sorted(self.perm):
            return f"B {tuple(self.b_shape)} reshaped"
        return f"B {tuple(self.b_shape)} permuted {self.perm}"


@dataclass(frozen=True, eq=False)
class Pair:
    """Two corresponding layers; ``b_aligned`` is B's output in A's layout."""

    a: Layer
    b: Layer
    b_aligned: torch.Tensor
    alignment: Alignment
    how: str  # "name", "provenance", "order", "value" or "structure"


@dataclass(frozen=True, eq=False)
class Divergence:
    """A pair of layers that parts: its position among the pairs of its draw, the pair, what
    rounding allows there (elementwise), and A's captured layers of that draw (the flatten-order
    test reads the layer feeding it)."""

    position: int
    pair: Pair
    allowed: torch.Tensor
    a_layers: tuple[Layer, ...]


@dataclass(frozen=True)
class Localization:
    """What the layer table found (see :mod:`fc2conv.verify.localize`).

    ``beyond``: the first pair judged different by the output rule (B's error beyond 10x A's
    *and* beyond its worst-case bound); ``ratio``: the first pair where B's error exceeds 10x
    A's alone. ``captured`` is false when the layers could not be captured (``notes`` says
    why); then nothing is localized."""

    table: tuple[LayerStats, ...] = ()
    beyond: Divergence | None = None
    ratio: Divergence | None = None
    notes: tuple[str, ...] = ()
    captured: bool = True

    @property
    def first(self) -> Divergence | None:
        """The first divergence of a "different" pair: the earlier of :attr:`ratio` (where the
        worst-case bound is too loose to single out a layer) and :attr:`beyond`."""
        if self.ratio is not None and (self.beyond is None
                                       or self.ratio.position < self.beyond.position):
            return self.ratio
        return self.beyond


@dataclass(frozen=True)
class Diagnosis:
    """Where two different models part (``first_divergence``, in the user's layer names) and
    the first tested cause that explains it (``text``)."""

    first_divergence: str | None
    text: str | None
    shared_with: tuple[str, ...] = ()  # the other layers that read its weight (tied weights)
