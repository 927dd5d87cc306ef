"""Where dense_map's tiles run fastest on the CPU: a tile sweep, interleaved, in one run.

Part 1 (``--calls``): the per-pixel time of ONE untiled call of each bench net on a square
``s x s`` input, for ``s`` from about two fields to the largest image: per-call efficiency
against pixels per call (no halo: the tiles' own cost). Each repeat runs every size once,
sizes in a rotating order; ns/px is the median, 'rel' the per-pixel time over the best size's.

Part 2: dense_map at explicit tiles (the whole image down to about two fields) vs one untiled
call of the same net, per image size; each repeat runs the untiled call, dense_map's default
('auto') and every tile once, back to back in a rotating order; the ratio is untiled s /
tiled s, median of the per-repeat ratios [10-90%], wall and CPU (this process's, every
thread). 'px' = the tiles' input pixels over the image's (the pixel halo).

    PYTHONPATH=src python bench/dense_tile_sweep.py --threads 1 2 --sizes 768 1536 3072
    PYTHONPATH=src python bench/dense_tile_sweep.py --calls --threads 1 2
"""

# ruff: noqa: B023  (closures are timed inside the loop iteration that made them)
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dense_throughput import nets, ratios, spread, timed  # noqa: E402

from fc2conv import dense_map  # noqa: E402
from fc2conv.dense import model as dmodel  # noqa: E402
from fc2conv.dense.fuse import fold_batchnorm  # noqa: E402
from fc2conv.dense.plan import chunk_cells, plan_tiles  # noqa: E402
from fc2conv.dense.pools import fast_pools  # noqa: E402


def tiles_for(n: int, field: int) -> list[int]:
    """Tile sides from the image down to about two fields, roughly halving."""
    out, t = [], n
    while t >= 2 * field:
        out.append(t)
        t = t * 2 // 3 if t * 2 // 3 >= 2 * field else t // 2
    if out[-1] != 2 * field:
        out.append(2 * field)
    return out[1:]  # the image itself is the untiled call


@torch.inference_mode()
def calls(models: dict, sizes: list[int], threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    for name, (_, fcn, _) in models.items():
        fast = fold_batchnorm(fast_pools(fcn, owned=False), owned=False)
        xs = {s: torch.randn(1, 3, s, s) for s in sizes}
        fns = [lambda x=x: fast(x) for x in xs.values()]
        for fn in fns:
            fn()
        wall, cpu = timed(fns, repeats)
        per = [spread(w)[0] / s ** 2 * 1e9 for w, s in zip(wall, sizes, strict=True)]
        per_c = [spread(c)[0] / s ** 2 * 1e9 for c, s in zip(cpu, sizes, strict=True)]
        best = min(per)
        print(f"{name:15} {threads} thr  " + "  ".join(
            f"{s}:{p:.0f}ns({p / best:.2f};cpu {pc:.0f})" for s, p, pc in
            zip(sizes, per, per_c, strict=True)), flush=True)


@torch.inference_mode()
def sweep(models: dict, size: int, threads: int, repeats: int, budget: float) -> None:
    torch.set_num_threads(threads)
    image = np.random.default_rng(0).standard_normal((3, size, size)).astype(np.float32)
    for name, (_, fcn, _) in models.items():
        fast = fold_batchnorm(fast_pools(fcn, owned=False), owned=False)
        _, geo = dmodel.prepare(fcn, (3, 256, 256), image.shape, convert=False, device="cpu")
        tiles: list[int | None] = [None, *tiles_for(size, geo.size[0])]

        def untiled() -> np.ndarray:
            return fast(torch.from_numpy(image)[None])[0].numpy()

        fns = [untiled] + [lambda t=t: np.asarray(dense_map(fcn, image, tile=t,
                                                            threads=threads))
                           for t in tiles]
        for fn in fns:
            fn()
        wall, cpu = timed(fns, repeats, budget)
        from fc2conv.dense.api import _auto_tile

        auto = _auto_tile(geo, "cpu", threads)
        for t, w, c in zip(tiles, wall[1:], cpu[1:], strict=True):
            side = auto if t is None else (t, t)
            cells = chunk_cells(side, geo.image_size, geo.map_size, geo.size, geo.stride)
            plan = plan_tiles(geo.image_size, geo.map_size, geo.size, geo.stride, geo.start,
                              cells)
            px = sum(math.prod(c.b - c.a for c in ch) for _, ch in plan.blocks()) / size ** 2
            label = f"auto {auto[0]}" if t is None else str(t)
            print(f"{name:15} {size:>5} {threads} thr {label:>9} {len(plan):>4} tiles "
                  f"{math.prod(plan.max_tile()) / 1e6:6.2f} Mpx/tile px {px:4.2f}  "
                  f"wall {ratios(wall[0], w)}  cpu {ratios(cpu[0], c)}  "
                  f"(untiled {spread(wall[0])[0]:.3f} s, n={len(w)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1536, 3072])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--row-seconds", type=float, default=60.0)
    parser.add_argument("--nets", nargs="+", default=None)
    parser.add_argument("--calls", action="store_true", help="part 1 only")
    parser.add_argument("--call-sizes", type=int, nargs="+",
                        default=[128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072])
    args = parser.parse_args()
    began = time.perf_counter()
    models = nets()
    if args.nets:
        models = {k: v for k, v in models.items() if k in args.nets}
    print(f"torch {torch.__version__}, {args.repeats} interleaved repeats")
    for threads in args.threads:
        if args.calls:
            calls(models, args.call_sizes, threads, args.repeats)
            continue
        for size in args.sizes:
            sweep(models, size, threads, args.repeats, args.row_seconds)
    print(f"(whole run {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
