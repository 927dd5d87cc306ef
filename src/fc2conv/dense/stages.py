"""Staged (layer-group) tiling: where to split a dense net, and each stage's tile. No torch.

A tiled map recomputes, per tile, the halo its receptive field needs: ``field - stride``
pixels per axis and tile, *at the input's resolution*, through every layer. With a field of
~200 px and tiles of 384, the first (most expensive, full-resolution) layers redo a third of
their work. Staging splits the net at layer boundaries ``b_1 < ... < b_{S-1}`` where one
tensor carries everything (:mod:`fc2conv.dense.split`): stage ``k`` maps the output of stage
``k - 1`` (the image for ``k = 1``) to boundary ``b_k``'s tensor, tiled with only its own
field; the map between stages is held whole (a chunked array computed once). Each stage's
halo is then measured in its own input's cells: the first stage's field is the stem's (a few
pixels), the later stages' halo is in downsampled cells.

**Exactness.** A stage is a dense net of its own: with ``(size, J, start)`` the field of
``b_k`` over the image and ``(size', J', start')`` that of ``b_{k-1}``, stage ``k``'s field
over its input (``b_{k-1}``'s map) is

    J_k = J / J'        size_k = (size - size') / J' + 1        start_k = (start - start') / J'

(receptive fields compose: ``size = size' + (size_k - 1) J'``, ``start = start' + start_k J'``).
Its tiled map equals its untiled run by the tiling plan's argument
(:mod:`fc2conv.dense.plan`), and the untiled runs compose to the whole net's, so the staged
map equals ``fcn(image)`` up to rounding (bitwise where the single-stage map is: the same
kernels on the same values, see :func:`fc2conv.dense.model.run_tiles`).

**Tiles.** A tile is a memory budget: the given (or default) tile of ``t`` image pixels per
axis needs ``6 * beta * prod(t)`` bytes, ``beta`` the whole net's largest activation per image
pixel. Stage ``k`` gets the same budget: its largest activation per image pixel ``beta_k <=
beta``, so its tile covers ``t (beta / beta_k)^(1/d)`` image pixels per axis (``d`` axes),
``/ J'`` of its input's cells, at most its whole input. The stage holding the net's largest
activation keeps ``t`` itself; a later, cheaper stage often runs untiled.

**Cost** (:func:`stage_cost`, to rank splits, not to predict seconds): per tile and segment
(the layers between two candidate boundaries), the segment's work per output cell times the
cells it computes on that tile (``floor((L - size - 2 start) / J) + 1`` per axis of a tile of
``L`` cells, the segment's field relative to its stage's input), plus :data:`CALL` per model
call and :data:`COPY` per byte of every map between stages (written once, read by its tiles).
``stages=None`` (auto) splits only where this predicts at least :data:`MARGIN` less than one
stage, and only where each map between stages fits in memory (half the budget each: the map
a stage reads and the one it writes coexist); an image beyond memory is mapped in one stage,
which keeps the memory bound (peak RSS independent of the image size).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fc2conv.dense.plan import chunk_cells, plan_tiles
from fc2conv.errors import Fc2ConvError

CALL = 5e6
"""Cost of one model call in FLOP equivalents (tens of microseconds on one CPU core)."""
COPY = 20.0
"""Cost per byte of a map between stages (written, then copied into the tiles that read it)."""
MARGIN = 0.95
"""Auto stages only when the staged cost is below this fraction of one stage's."""
MAX_AUTO_STAGES = 3


@dataclass(frozen=True)
class Boundary:
    """A tensor of the net: its field over the image per axis (``size``, total ``stride``,
    ``start <= 0``), its ``channels`` and its size ``cells`` on the full image. The image
    itself is the boundary ``size 1, stride 1, start 0``."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    start: tuple[int, ...]
    channels: int
    cells: tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    """The layers between two consecutive boundaries: ``work`` (FLOP equivalents) and
    ``peak`` (bytes of the largest activation) per cell of the segment's output."""

    work: float
    peak: float


@dataclass(frozen=True)
class Profile:
    """A net cut into segments: ``boundaries[0]`` the image, ``boundaries[-1]`` the net's
    output, the others the candidate cuts; ``segments[s]`` runs from boundary ``s`` to
    ``s + 1``."""

    boundaries: tuple[Boundary, ...]
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if len(self.segments) != len(self.boundaries) - 1 or len(self.boundaries) < 2:
            raise Fc2ConvError("a profile needs one segment between each two boundaries")

    @property
    def dims(self) -> int:
        return len(self.boundaries[0].cells)


def relative(outer: Boundary, inner: Boundary) -> tuple[tuple[int, int, int], ...]:
    """``(size, stride, start)`` per axis of ``outer``'s field over ``inner``'s cells (see the
    module); :class:`Fc2ConvError` when the fields do not compose exactly."""
    out = []
    for s, j, a, s0, j0, a0 in zip(outer.size, outer.stride, outer.start, inner.size,
                                   inner.stride, inner.start, strict=True):
        if j % j0 or (s - s0) % j0 or (a - a0) % j0 or s < s0:
            raise Fc2ConvError(f"field {s}/{j}/{a} does not compose over {s0}/{j0}/{a0}")
        out.append(((s - s0) // j0 + 1, j // j0, (a - a0) // j0))
    return tuple(out)


def _bpp(profile: Profile, u: int, v: int) -> float:
    """The largest activation of the segments ``[u, v)`` per image pixel (bytes)."""
    return max(seg.peak / math.prod(profile.boundaries[s + 1].stride)
               for s, seg in enumerate(profile.segments[u:v], start=u))


def stage_tiles(profile: Profile, cuts: Sequence[int], tile: Sequence[int]
                ) -> list[tuple[int, ...]]:
    """The tile of each stage in its input's cells (see the module): ``tile`` (image pixels)
    scaled by ``(beta / beta_k)^(1/d)``, over the stage input's stride, at most the input."""
    bounds = [0, *cuts, len(profile.boundaries) - 1]
    dims = profile.dims
    beta = _bpp(profile, 0, bounds[-1])
    out = []
    for u, v in itertools.pairwise(bounds):
        scale = max(1.0, beta / max(_bpp(profile, u, v), 1e-30)) ** (1 / dims)
        inner = profile.boundaries[u]
        out.append(tuple(min(n, max(1, int(t * scale) // j))
                         for t, j, n in zip(tile, inner.stride, inner.cells, strict=True)))
    return out


def stage_cost(profile: Profile, u: int, v: int, tile: Sequence[int]) -> float:
    """The cost of mapping boundary ``u``'s map to ``v``'s with tiles of ``tile`` cells of
    ``u`` (see the module; the copy of ``v``'s map is the caller's)."""
    inner, outer = profile.boundaries[u], profile.boundaries[v]
    field = relative(outer, inner)
    size, stride, start = (tuple(f[i] for f in field) for i in range(3))
    cells = chunk_cells(tile, inner.cells, outer.cells, size, stride)
    plan = plan_tiles(inner.cells, outer.cells, size, stride, start, cells)
    segs = [(relative(profile.boundaries[s + 1], inner), profile.segments[s])
            for s in range(u, v)]
    cost = 0.0
    for _, chunks in plan.blocks():
        lengths = [c.b - c.a for c in chunks]
        cost += CALL
        for rel, seg in segs:
            n = math.prod(max(0, (L - s - 2 * a) // j + 1)
                          for L, (s, j, a) in zip(lengths, rel, strict=True))
            cost += seg.work * n
    return cost


@dataclass(frozen=True)
class Staging:
    """A choice of stages: the boundary indices cut at (empty: one stage), each stage's tile
    in its input's cells, and the predicted costs of this choice and of one stage."""

    cuts: tuple[int, ...]
    tiles: tuple[tuple[int, ...], ...]
    cost: float
    single: float

    @property
    def stages(self) -> int:
        return len(self.cuts) + 1


def staging_cost(profile: Profile, cuts: Sequence[int], tile: Sequence[int]
                 ) -> tuple[float, list[tuple[int, ...]]]:
    """``(cost, tiles)`` of cutting at ``cuts`` (sorted boundary indices)."""
    tiles = stage_tiles(profile, cuts, tile)
    bounds = [0, *cuts, len(profile.boundaries) - 1]
    cost = sum(stage_cost(profile, u, v, t)
               for (u, v), t in zip(itertools.pairwise(bounds), tiles, strict=True))
    for c in cuts:
        b = profile.boundaries[c]
        cost += COPY * 4 * b.channels * math.prod(b.cells)
    return cost, tiles


def choose_stages(profile: Profile, tile: Sequence[int], stages: int | None, memory: float
                  ) -> Staging:
    """The cheapest staging with ``stages`` stages (``None``: any number up to
    :data:`MAX_AUTO_STAGES`, and more than one only when it costs below :data:`MARGIN` of
    one stage). A cut whose map exceeds ``memory / 2`` bytes is never chosen; asking for more
    stages than the net has usable cuts is a :class:`Fc2ConvError`."""
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int)
                               or stages < 1):
        raise Fc2ConvError(f"stages must be a positive number, got {stages!r}")
    single, one_tile = staging_cost(profile, (), tile)
    best = Staging((), tuple(one_tile), single, single)
    if stages == 1:
        return best
    usable = [c for c in range(1, len(profile.boundaries) - 1)
              if 4 * profile.boundaries[c].channels * math.prod(profile.boundaries[c].cells)
              <= memory / 2]
    counts = range(2, MAX_AUTO_STAGES + 1) if stages is None else [stages]
    if stages is not None and stages - 1 > len(usable):
        raise Fc2ConvError(
            f"{stages} stages need {stages - 1} places to split the net; it has "
            f"{len(usable)} (after a layer that downsamples, where one tensor carries "
            f"everything, and whose map fits in memory)")
    found: Staging | None = None
    for n in counts:
        for cuts in itertools.combinations(usable, n - 1):
            cost, tiles = staging_cost(profile, cuts, tile)
            if found is None or cost < found.cost:
                found = Staging(tuple(cuts), tuple(tiles), cost, single)
    if found is None:
        return best
    if stages is None and found.cost >= MARGIN * single:
        return best
    return found
