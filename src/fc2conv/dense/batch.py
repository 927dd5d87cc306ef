"""Batches of same-shaped tiles: several chunks of a dense map computed by ONE model call.

Most tiles of a plan have the same input window shape: along an axis every chunk but the
first and the last reads ``(start mod J) + (c - 1) J + size`` pixels (``c`` cells per chunk,
see :mod:`fc2conv.dense.plan`), so a 2-D grid has at most 3 x 3 window shapes and a 3-D one
3 x 3 x 3. The chunks of one shape are stacked along the batch axis and run as
``net(stack(tiles))`` (``(B, C, *tile)``); the output is split back per chunk and each is
cropped to its own cells. A batch is only a faster way to run the same tiles: every chunk
still reads exactly its window, is cropped exactly as alone, and lands in its own block.

How many (``B``): as many as fit the memory one task may use (``budget``), taken as 6x the
net's largest activation per tile (as the default tile is sized, :func:`fc2conv.dense.api.
_auto_tile`), and no more than spreads the chunks over the tasks that run at once
(``ceil(chunks / workers)``), so that batching never leaves a worker idle, and on the CPU
no more than :data:`CPU_PIXELS` input pixels a call. A shape group of
``n`` chunks is split into ``ceil(n / B)`` batches of even size.

Where it applies: a local map read through a :class:`~fc2conv.dense.readers.Reader` (the
default threaded schedule, in the calling thread or on the pool), with or without a zarr
``out``: each chunk of a batch is still written and committed whole on its own (its marker
after its data), so a run killed mid-batch resumes from its finished chunks. A map on a
``dask.distributed`` cluster keeps one task per chunk (batching off): a task is what the
cluster retries when a worker dies and what its progress counts, and a worker runs one task
at a time on its own cores, where a small net's batch gains little. A dask array image
(whose slices are graph dependencies) is not batched either.

Exactness: see :func:`fc2conv.dense.model.run_tiles` (each block equals its unbatched run up
to the rounding of torch's kernels, bitwise where those compute each sample alike).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Chunk = tuple[tuple[int, ...], tuple[slice, ...], tuple[tuple[int, int], ...], tuple[int, ...]]
"""``(index, window, crop, origin)`` of a pending chunk (see :func:`fc2conv.dense.api.
_pending`)."""

TILE_MEMORY = 6  # a tile's memory over the net's largest activation (as _auto_tile)
CPU_PIXELS = 2**19
"""The most input pixels one batched call takes on the CPU (about 724^2). Measured on 768^2
images, one thread, tiles of 128 px: 16-32 tiles a call (up to 2^19 pixels) ran 1.4-1.7x
faster than one call per tile, all 100-144 tiles in one call only 1.1-1.45x (a call's
activations spill out of the caches); at 256 px 8-32 tiles a call ran 1.0-1.17x faster. A
GPU has no such cap: its batch is what its memory holds."""


def batch_size(bytes_per_pixel: float, tile: Sequence[int], budget: float, chunks: int,
               workers: int, max_pixels: float | None = None) -> int:
    """Tiles per model call: ``floor(budget / (6 * bytes_per_pixel * prod(tile)))`` (at
    least 1), at most ``ceil(chunks / workers)``, and at most ``max_pixels`` input pixels a
    call when given (:data:`CPU_PIXELS`)."""
    pixels = math.prod(tile)
    per_tile = TILE_MEMORY * max(float(bytes_per_pixel), 1e-12) * pixels
    fit = max(1, int(budget // per_tile))
    if max_pixels is not None:
        fit = min(fit, max(1, int(max_pixels // pixels)))
    return max(1, min(fit, -(-chunks // max(1, workers))))


def batches(chunks: Iterable[Chunk], batch: int) -> list[list[Chunk]]:
    """``chunks`` grouped by input window shape, each group split into ``ceil(n / batch)``
    batches whose sizes differ by one at most (in the order the chunks came; the groups in
    the order of their first chunk)."""
    by_shape: dict[tuple[int, ...], list[Chunk]] = {}
    for chunk in chunks:
        shape = tuple(w.stop - w.start for w in chunk[1])
        by_shape.setdefault(shape, []).append(chunk)
    out: list[list[Chunk]] = []
    for group in by_shape.values():
        parts = -(-len(group) // max(1, batch))
        size, extra = divmod(len(group), parts)  # sizes differ by one at most
        at = 0
        for k in range(parts):
            n = size + (k < extra)
            out.append(group[at:at + n])
            at += n
    return out


def run_batch(source: Any, chunks: Sequence[Chunk], *, net: Any, mean: np.ndarray | None,
              std: np.ndarray | None, device: str, store: Any = None,
              threads: int | None = None) -> Any:
    """One task: read the chunks' tiles, run them as one batch, crop each; write and commit
    each chunk when ``store`` (then the number written), else the blocks in order."""
    from fc2conv.dense import model as dmodel

    tiles = [source.read(window) for _, window, _, _ in chunks]
    blocks = dmodel.run_tiles(net, tiles, [crop for _, _, crop, _ in chunks], mean, std,
                              device, threads)
    if store is None:
        return blocks
    for (index, _, _, origin), block in zip(chunks, blocks, strict=True):
        store.write(index, origin, block)
    return len(blocks)
