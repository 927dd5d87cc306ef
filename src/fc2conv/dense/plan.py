"""The tiling plan of an exact dense map: pure integer arithmetic, no torch.

Per spatial axis the dense net is described by its receptive field (see
:mod:`fc2conv.core.receptive`): cell ``i`` of the full-image map depends on input pixels
``[start + i J, start + i J + size)`` (``J`` the product of all strides, ``start <= 0`` the
padding reach). The full map has ``M`` cells on an image of ``N`` pixels.

An output chunk of cells ``[i0, i1)`` is computed from the input tile ``[a, b)`` with

    a = max(0, floor((start + i0 J) / J) J)        (a multiple of J: every layer's grid aligns;
                                                    at most the last multiple below N)
    b = min(N, start + (i1 - 1) J + size)

Because ``a`` is a multiple of ``J``, tile cell ``j`` of every layer is full-image cell
``a / J_l + j``; a cell equals the full-image one when its field stays inside the tile, or
leaves it only through an image border (where the tile pads exactly as the full run does).
Both hold for ``[i0, i1)`` by construction, so the stitched chunks equal ``fcn(image)``;
tile cells ``[i0 - a / J, i1 - a / J)`` are kept and the rest (touched by the tile's own
border padding) cropped. The chunk holding an axis's last cell reads to the image's end
(``b = N``: the few pixels past its last cell's field, which no cell reads, come along; the
tile then ends where the image and the untiled run's input do), so a chunk that spans every
axis reads the image itself: the untiled call, no copy of the pixels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fc2conv.errors import Fc2ConvError


@dataclass(frozen=True)
class AxisChunk:
    """One chunk along one axis: output cells ``[i0, i1)`` from input pixels ``[a, b)``;
    the chunk is tile cells ``[j0, j0 + i1 - i0)``."""

    i0: int
    i1: int
    a: int
    b: int

    def crop(self, jump: int) -> tuple[int, int]:
        """The tile cells ``[j0, j1)`` that are this chunk."""
        j0 = self.i0 - self.a // jump
        return j0, j0 + self.i1 - self.i0


def axis_chunks(n: int, m: int, size: int, jump: int, start: int, cells: int
                ) -> list[AxisChunk]:
    """Chunks of ``cells`` output cells along one axis of ``n`` input pixels and ``m`` cells."""
    if min(n, m, size, jump, cells) < 1 or start > 0:
        raise Fc2ConvError(
            f"invalid tiling: {n} pixels, {m} cells, field {size}, stride {jump}, start {start}, "
            f"{cells} cells per chunk"
        )
    chunks = []
    for i0 in range(0, m, cells):
        i1 = min(m, i0 + cells)
        a = max(0, ((start + i0 * jump) // jump) * jump)
        a = min(a, ((n - 1) // jump) * jump)  # cells that read only the high padding
        b = min(n, max(start + (i1 - 1) * jump + size, a + size))  # a whole field at least
        if i1 == m:  # the last chunk reads to the image's end (see the module)
            b = n
        chunks.append(AxisChunk(i0, i1, a, b))
    return chunks


def cells_per_tile(tile: int, size: int, jump: int, start: int = 0) -> int:
    """How many output cells a ``tile``-pixel input tile yields (at least 1)."""
    return max(1, (tile - size) // jump + 1)


def chunk_cells(tile: Sequence[int], image_size: Sequence[int], map_size: Sequence[int],
                field_size: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """Output cells per chunk and axis for input tiles of at most ``tile`` pixels.

    A tile spanning an axis (``tile >= N``) is the whole axis: all ``M`` cells, border
    padding's included. Otherwise the axis needs ``k = ceil(M / c)`` chunks of up to
    ``c = cells_per_tile(tile)`` cells, and they are evened out: ``ceil(M / k)`` cells each,
    the last taking the rest (``M = 89``, ``c = 41``: 30 + 30 + 29, not 41 + 41 + 7). The halo
    is the same ``k - 1`` overlaps either way; a sliver's small convolutions run slower per
    pixel, and the largest tile (the memory a task needs) shrinks."""
    out = []
    for t, n, m, size, jump in zip(tile, image_size, map_size, field_size, stride,
                                   strict=True):
        if t >= n:
            out.append(m)
            continue
        k = -(-m // cells_per_tile(t, size, jump))
        out.append(-(-m // k))
    return tuple(out)


@dataclass(frozen=True)
class TilePlan:
    """The chunks of a dense map of an ``image_size`` image, per axis, and their product."""

    image_size: tuple[int, ...]
    map_size: tuple[int, ...]
    field_size: tuple[int, ...]
    stride: tuple[int, ...]
    start: tuple[int, ...]
    axes: tuple[tuple[AxisChunk, ...], ...]

    @property
    def chunk_cells(self) -> tuple[int, ...]:
        """The regular chunk shape of the map (the last chunk of an axis may be shorter)."""
        return tuple(ax[0].i1 - ax[0].i0 for ax in self.axes)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(ax) for ax in self.axes)

    def __len__(self) -> int:
        return math.prod(self.grid)

    def blocks(self) -> Iterator[tuple[tuple[int, ...], tuple[AxisChunk, ...]]]:
        """``(block index, chunk per axis)`` for every block, in C order."""
        for index in itertools.product(*(range(g) for g in self.grid)):
            yield index, tuple(ax[k] for ax, k in zip(self.axes, index, strict=True))

    def max_tile(self) -> tuple[int, ...]:
        """The largest input tile any block reads, per axis."""
        return tuple(max(c.b - c.a for c in ax) for ax in self.axes)


def plan_tiles(image_size: Sequence[int], map_size: Sequence[int], field_size: Sequence[int],
               stride: Sequence[int], start: Sequence[int], cells: Sequence[int]) -> TilePlan:
    """The :class:`TilePlan` of a map with ``cells`` output cells per chunk and axis."""
    dims = len(image_size)
    if not all(len(x) == dims for x in (map_size, field_size, stride, start, cells)):
        raise Fc2ConvError("image, map, field, stride, start and chunk sizes must have one "
                           "entry per spatial axis")
    axes = tuple(tuple(axis_chunks(*args)) for args in zip(
        image_size, map_size, field_size, stride, start, cells, strict=True))
    return TilePlan(tuple(image_size), tuple(map_size), tuple(field_size), tuple(stride),
                    tuple(start), axes)


MAX_HALO = 0.3
"""The most a speed tile adds to the image's pixels: its tiles read at most ``1.3 x`` them."""
WHOLE_CALLS = 8.0
"""A map is tiled for speed only when the image holds more than this many calls' pixels (with
calls of a quarter of a task's cache share: the whole image's largest activation is past twice
that share; on 2 cores, past the whole last-level cache). Measured on an idle 2-core EPYC
(32 MiB L3, 2 threads): at 27 MiB of largest activation (AlexNet-style, 1536^2) speed tiles ran
0.78-0.92x the untiled call, at 72-288 MiB (VGG-, ResNet-, AlexNet-style, 1536^2-3072^2)
1.2-3.4x; a ResNet at 18 MiB gained 2.2x from tiles, but the rule errs toward the untiled
call (4 here, the earlier value, tiled that AlexNet at 0.78x)."""
SPLITS = 2**16
"""The most chunk grids a speed tile is chosen among: ``SPLITS ** (1 / dims)`` chunk counts
per axis, at most (256 in 2-D, 40 in 3-D)."""


def default_tile(image_size: Sequence[int], field_size: Sequence[int], bytes_per_pixel: float,
                 whole: float, per_task: float, *, stride: Sequence[int] | None = None,
                 start: Sequence[int] | None = None, map_size: Sequence[int] | None = None,
                 call_bytes: float | None = None, tasks: int = 1,
                 max_halo: float = MAX_HALO) -> tuple[int, ...]:
    """Input pixels per tile side when the caller gives none, from memory, speed and the field.

    **Memory** (every device). ``bytes_per_pixel``: a tile's memory per input pixel (the
    caller's multiple of the net's largest activation). When the whole image fits in
    ``whole`` bytes the memory tile is the image; otherwise each tile gets ``per_task`` bytes,
    shared out over the axes from the shortest up (an axis shorter than its share is taken
    whole and leaves more to the others), and never less than two fields per axis, so that
    the halo (``field - stride`` pixels a tile shares with its neighbour) stays a small part.

    **Speed** (when ``call_bytes`` is given, with the plan's ``stride``, ``start`` and
    ``map_size``: the CPU). A model call runs fastest per pixel while its working set stays in
    the cache: ``P = call_bytes / bytes_per_pixel`` pixels a call (the caller gives each of
    the ``tasks`` that run at once a quarter of its share of the last-level cache). Measured on
    a 2-core EPYC (L3 32 MiB; ``bench/dense_tile_sweep.py --calls``: one untiled call per
    size): the cost per pixel of one call is flat from ~256^2 pixels up to where the net's
    largest activation passes ~16-32 MiB, then rises 1.2-3.5x (at 1 thread: VGG-style past
    768^2, AlexNet-style past 1024-1536^2, a ResNet past 512^2), and below ~2 fields it
    doubles. Tiles run as independent tasks, one torch thread each, which also beats torch's
    threads inside one call (0.82 parallel efficiency at 2 threads). So at 1536^2 and 3072^2
    tiles near ``P`` ran 1.0-2.9x faster than the untiled call (2 threads, CPU time, a loaded
    machine; ``bench/dense_tile_sweep.py``), and this rule's tiles 1.25-3.4x on an idle
    machine (``bench/dense_throughput.py --size 768 1536 3072``), while on a 768^2 image
    four tiles of an AlexNet-style net ran 0.6-0.7x: its 15 ms call already runs in the
    cache, and each tile adds its halo and a fixed cost. The rule, per axis ``a`` with
    ``k_a`` chunks of the plan (:func:`chunk_cells`, :func:`axis_chunks`), in pixels
    (voxels) per call, the field and the stride:

    - the whole image while it holds at most ``WHOLE_CALLS * P`` pixels (the largest
      activation within twice one task's cache share; the memory tile when that is smaller);
    - else, among the chunk grids ``k`` with at least ``tasks`` chunks (fewer leave cores
      idle), no tile larger than the memory tile on any axis (never more memory than the
      memory rule) nor smaller than two fields, and tiles that read at most ``1 + max_halo``
      times the image's pixels (``prod_a R_a / N_a``, ``R_a`` the pixels the axis's chunks
      read: each of the ``k_a - 1`` seams re-reads ``~field - stride``): the one whose largest
      tile is nearest to ``P`` from above (any within ``P`` counts as there), then the fewest
      pixels read, then the fewest chunks. That is the largest tiles that stay in the cache
      when their halo is within the bound, else the smallest tiles the bound allows;
    - the memory tile when no grid qualifies (fields too wide for the image).

    Pure arithmetic: the tile returned is what :func:`chunk_cells` turns into those chunks."""
    dims = len(image_size)
    if len(field_size) != dims or min(image_size) < 1:
        raise Fc2ConvError("image and field sizes must have one positive entry per axis")
    bpp = max(float(bytes_per_pixel), 1e-12)
    mem = _memory_tile(image_size, field_size, bpp, whole, per_task)
    if call_bytes is None or stride is None or start is None or map_size is None:
        return mem
    tasks = max(1, tasks)
    speed = _speed_tile(tuple(image_size), tuple(field_size), tuple(stride), tuple(start),
                        tuple(map_size), call_bytes / bpp, mem, tasks, max_halo)
    return mem if speed is None else speed


def _memory_tile(image_size: Sequence[int], field_size: Sequence[int], bpp: float,
                 whole: float, per_task: float) -> tuple[int, ...]:
    """The memory rule of :func:`default_tile`."""
    dims = len(image_size)
    if math.prod(image_size) * bpp <= whole:
        return tuple(int(n) for n in image_size)
    pixels = max(1.0, per_task / bpp)
    tile = [0] * dims
    order = sorted(range(dims), key=lambda a: image_size[a])
    for k, axis in enumerate(order):
        share = pixels ** (1 / (dims - k))
        t = int(min(image_size[axis], max(share, 2 * field_size[axis])))
        tile[axis] = t
        pixels = max(1.0, pixels / t)
    return tuple(tile)


@dataclass(frozen=True)
class _Split:
    """One axis cut in ``chunks`` chunks by an input tile of ``tile`` pixels: ``read`` pixels
    read in all, ``largest`` the largest chunk's."""

    chunks: int
    tile: int
    read: int
    largest: int


def _splits(n: int, m: int, size: int, jump: int, start: int, cap: int, most: int
            ) -> list[_Split]:
    """The distinct ways to cut one axis in at most ``most`` chunks, by chunk count, whose
    largest tile is at most ``cap`` pixels (and at least two fields, unless the axis is
    whole)."""
    out: list[_Split] = []
    seen = set()
    for k in range(1, min(m, most) + 1):
        t = n if k == 1 else min(n, (-(-m // k) - 1) * jump + size)
        (cells,) = chunk_cells((t,), (n,), (m,), (size,), (jump,))
        chunks = axis_chunks(n, m, size, jump, start, cells)
        if len(chunks) in seen:
            continue
        seen.add(len(chunks))
        largest = max(c.b - c.a for c in chunks)
        if len(chunks) > 1 and largest < 2 * size:
            break
        if largest <= cap:
            out.append(_Split(len(chunks), t, sum(c.b - c.a for c in chunks), largest))
    return out


def _speed_tile(image_size: tuple[int, ...], field_size: tuple[int, ...],
                stride: tuple[int, ...], start: tuple[int, ...], map_size: tuple[int, ...],
                pixels: float, mem: tuple[int, ...], tasks: int, max_halo: float
                ) -> tuple[int, ...] | None:
    """The speed rule of :func:`default_tile` (``None``: keep the memory tile)."""
    if math.prod(image_size) <= WHOLE_CALLS * pixels:
        return None
    cap = int(SPLITS ** (1 / len(image_size)))
    axes = [_splits(n, m, size, jump, first, t, cap) for n, m, size, jump, first, t in zip(
        image_size, map_size, field_size, stride, start, mem, strict=True)]
    if any(not a for a in axes):
        return None
    limit = (1 + max_halo) * math.prod(image_size)
    best: tuple[tuple[float, int, int], tuple[_Split, ...]] | None = None
    for head in itertools.product(*axes[:-1]):
        largest = math.prod(s.largest for s in head)
        read = math.prod(s.read for s in head)
        count = math.prod(s.chunks for s in head)
        for last in axes[-1]:  # by chunk count: more chunks read more
            total = read * last.read
            if total > limit:
                break
            if count * last.chunks < tasks:
                continue
            key = (max(1.0, largest * last.largest / pixels), total, count * last.chunks)
            if best is None or key < best[0]:
                best = key, (*head, last)
    return None if best is None else tuple(s.tile for s in best[1])
