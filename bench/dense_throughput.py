"""dense_map throughput, side by side in one run (interleaved repeats, medians and spreads):

1. tiled (dense_map) vs untiled (one call of the same net), at dense_map's default tile and at
   forced --tiles. Each repeat times, back to back in a rotating order, the untiled call, the
   same tiles run by a plain loop (no Dask: the inherent cost of tiling, the halo recomputed)
   and dense_map; the speed ratio untiled/tiled is the median of the per-repeat ratios, with
   its 10-90% spread. 'halo' is the tiles' conv/matmul FLOPs over the untiled call's (counted
   on fake tensors) and '1/px' the image's pixels over the tiles' input pixels: the first
   layers, at full resolution, recompute the whole pixel halo, so on nets whose time goes to
   them (pools and convs before the first stride) 1/px, not 1/halo, is the best tiled/untiled
   can be; 'loop/untiled' what the tiles
   reach without dense_map's machinery, 'batch=1' dense_map with one model call per tile (no
   batching of same-shaped tiles, fc2conv.dense.batch; timed in the same rotation),
   'stages=1' dense_map without staged tiling (fc2conv.dense.stages: the column 'dense_map'
   is dense_map's default, auto stages, or --stages N; 'st' is how many stages it ran), and
   'exact' compare's verdict on the stitched map
   against a float64 run (fc2conv.dense.check; TF32 allowed for on CUDA). Every run starts
   from the image in host memory and ends with the map in host memory.
2. dense_map vs sliding_window (every crop classified) against the FLOP ratio
   (torch.utils.flop_counter): "of FLOP" is speedup / FLOP ratio (medians, spread of it);
3. dense_map on a LocalCluster of 2 worker processes vs 1 (with --workers).
MONAI's sliding_window_inference is compared in bench/dense_monai.py.

On the CPU every row is printed twice: 'wall' (perf_counter) and 'CPU' (this process's CPU
time, all its threads: what a loaded machine inflates least). With --threads 1 both sides run
on one core in the calling thread (dense_map computes a one-chunk or threads=1 map there), so
the CPU ratios compare the work itself; wall ratios on a shared machine carry its load.

    PYTHONPATH=src python bench/dense_throughput.py                    # CPU, 384 px
    PYTHONPATH=src python bench/dense_throughput.py --size 768 --tiles auto 384 --threads 1
    PYTHONPATH=src python bench/dense_throughput.py --size 768 --tiles auto 384 --repeats 15 \
        --threads 1 --no-sliding                                          # staged vs not
    PYTHONPATH=src python bench/dense_throughput.py --device cuda --size 2048
    PYTHONPATH=src python bench/dense_throughput.py --size 768 1536 3072 --tiles auto 1024 384 \
        --repeats 5 --no-sliding            # images that fit: the default tile vs untiled

An explicit tile at least as large as the image is skipped (it is the untiled call); the
'auto' row's tile column shows the default tile ('a:HxW', dense_map's choice with --threads).
"""

# ruff: noqa: B023  (closures are timed inside the loop iteration that made them)
from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import archs  # noqa: E402

from fc2conv import convolutionalize, dense_map, receptive_field, sliding_window  # noqa: E402
from fc2conv.dense import model as dmodel  # noqa: E402
from fc2conv.dense.check import check_stitched  # noqa: E402
from fc2conv.dense.fuse import fold_batchnorm  # noqa: E402
from fc2conv.dense.plan import chunk_cells, plan_tiles  # noqa: E402
from fc2conv.dense.pools import fast_pools  # noqa: E402


def best_of(fns: list, repeats: int) -> list[float]:
    """The fastest of ``repeats`` interleaved runs of each function (wall seconds)."""
    return [min(ts) for ts in timed(fns, repeats)[0]]


def timed(fns: list[Callable[[], object]], repeats: int, budget: float | None = None
          ) -> tuple[list[list[float]], list[list[float]]]:
    """(wall seconds, CPU seconds) of ``repeats`` runs per function, interleaved: repeat ``r``
    runs every function once, back to back, starting from function ``r mod n`` (a rotating
    order, so that no function always runs first or right after the same neighbour). CPU is
    this process's (``time.process_time``: every thread of it, Dask's pool included), which
    other processes' load does not inflate the way it inflates wall time. With ``budget``
    (seconds) the repeats stop once it is spent, after 3 at least."""
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    began = time.perf_counter()
    for r in range(repeats):
        if budget is not None and r >= 3 and time.perf_counter() - began > budget:
            break
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[i]()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return wall, cpu


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile)."""
    qs = np.percentile(values, [50, 10, 90])
    return float(qs[0]), float(qs[1]), float(qs[2])


def ratios(num: list[float], den: list[float]) -> str:
    """The median of the per-repeat ratios num/den (paired: the two ran back to back) and its
    10-90% spread, as 'm [lo-hi]'."""
    m, lo, hi = spread([a / b for a, b in zip(num, den, strict=True)])
    return f"{m:.2f} [{lo:.2f}-{hi:.2f}]"


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def nets() -> dict[str, tuple[nn.Module, nn.Module, tuple[int, ...]]]:
    """(classifier, its convolutionalized net, training input shape) per reference net; the
    GAP net goes through convolutionalize(global_pool="dense"): a stride-1 16x16 average pool
    that dense_map runs as a box filter (fc2conv.dense.pools)."""
    torch.manual_seed(0)
    out = {}
    for name, net in (("alexnet-valid", archs.AlexNetStyle()), ("alexnet-padded",
                                                                 archs.AlexNetStyle(True)),
                      ("vgg-style", archs.VGGStyle()), ("resnet-gap", archs.ResNetStyle())):
        net.eval()
        out[name] = (net, convolutionalize(net, net.INPUT_SHAPE), net.INPUT_SHAPE)
    return out


def reference64(fcn: nn.Module, image: np.ndarray) -> np.ndarray:
    """The float64 CPU run of ``fcn`` (the judge's reference)."""
    with torch.inference_mode():
        net = copy.deepcopy(fcn).cpu().double()
        return net(torch.from_numpy(image).double()[None])[0].numpy()


def fake_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    """conv/matmul FLOPs of ``net`` on a ``(1, *shape)`` input, counted on fake tensors (no
    arithmetic is done: any size is free to count)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cpu = copy.deepcopy(net).cpu()
    with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as c:
        cpu(torch.empty(1, *shape))
    return c.get_total_flops()


def tile_loop(fcn: nn.Module, image: np.ndarray, tile: int | None, dev: str,
              stages: int | None = None, threads: int | None = None
              ) -> tuple[Callable[[], np.ndarray], int, float, float, int, tuple[int, ...]]:
    """(a plain loop over dense_map's own tiles -- the same windows and crops, no Dask, no
    progress, stitched with one copy --, the number of tiles, the halo FLOP factor: the tiles'
    FLOPs over the untiled call's, the pixel halo: the tiles' input pixels over the image's,
    the number of stages dense_map runs with ``stages``; the loop is one stage; the tile,
    dense_map's default for ``tile=None`` with ``threads``)."""
    from fc2conv.dense.api import _stages

    trace = (image.shape[0], *(min(n, 256) for n in image.shape[1:]))
    net, geo = dmodel.prepare(fcn, trace, image.shape, convert=False, device=dev)
    tiles = (tile,) * (image.ndim - 1) if tile else dmodel_tile(geo, dev, threads)
    staged = _stages(net, geo, trace, image.shape, tuple(tiles), stages, dev, False)
    cells = chunk_cells(tiles, geo.image_size, geo.map_size, geo.size, geo.stride)
    plan = plan_tiles(geo.image_size, geo.map_size, geo.size, geo.stride, geo.start, cells)
    jobs = [(tuple(slice(c.a, c.b) for c in chunks),
             tuple(c.crop(j) for c, j in zip(chunks, plan.stride, strict=True)),
             tuple(slice(c.i0, c.i1) for c in chunks)) for _, chunks in plan.blocks()]
    counted: dict[tuple[int, ...], int] = {}
    for window, _, _ in jobs:
        shape = (image.shape[0], *(w.stop - w.start for w in window))
        counted.setdefault(shape, fake_flops(net, shape))
    tiled = sum(counted[(image.shape[0], *(w.stop - w.start for w in window))]
                for window, _, _ in jobs)
    halo = tiled / fake_flops(net, image.shape)
    pixels = sum(math.prod(w.stop - w.start for w in window) for window, _, _ in jobs)
    px_halo = pixels / math.prod(image.shape[1:])

    def run() -> np.ndarray:
        out = np.empty((geo.classes, *geo.map_size), np.float32)
        for window, crop, cells_at in jobs:
            out[(slice(None), *cells_at)] = dmodel.run_tile(
                net, image[(slice(None), *window)], crop, None, None, dev)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return run, len(jobs), halo, px_halo, 1 if staged is None else len(staged), tuple(tiles)


def dmodel_tile(geo: dmodel.Geometry, dev: str, threads: int | None = None
                ) -> tuple[int, ...]:
    """dense_map's default tile with ``threads`` (default: every core)."""
    from fc2conv.dense.api import _auto_tile

    return _auto_tile(geo, dev, 1 if dev.startswith("cuda") else threads or os.cpu_count() or 1)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[384],
                        help="image sides of part 1 (parts 2 and 3: the first)")
    parser.add_argument("--tiles", nargs="+", default=["auto", "256"],
                        help="tile sides to time ('auto': dense_map's default)")
    parser.add_argument("--tile", type=int, default=256, help="tile of the worker part")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15,
                        help="interleaved repeats of part 1 (median)")
    parser.add_argument("--sliding-repeats", type=int, default=7,
                        help="interleaved repeats of part 2 (median)")
    parser.add_argument("--row-seconds", type=float, default=8.0,
                        help="stop a row's repeats once this is spent (3 repeats at least; "
                             "twice this in part 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, pinned for every row (default: all cores)")
    parser.add_argument("--nets", nargs="+", default=None,
                        help="only these nets (alexnet-valid alexnet-padded vgg-style "
                             "resnet-gap)")
    parser.add_argument("--workers", action="store_true", help="also 2 vs 1 worker processes")
    parser.add_argument("--no-sliding", action="store_true")
    parser.add_argument("--stages", type=int, default=None,
                        help="dense_map's stages in part 1's 'dense_map' column (default: auto)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="part 2 without the unfused (BatchNorm not folded) dense_map row")
    parser.add_argument("--batch", type=int, default=None,
                        help="sliding_window's crops per call (default 256, 4096 on CUDA)")
    args = parser.parse_args()
    began = time.perf_counter()
    dev = args.device
    args.batch = args.batch or (4096 if dev.startswith("cuda") else 256)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    first_image = np.random.default_rng(0).standard_normal(
        (3, args.size[0], args.size[0])).astype(np.float32)
    image = first_image
    print(f"torch {torch.__version__}, device {dev}, {threads} torch threads (pinned), images "
          f"{', '.join(f'{n}^2' for n in args.size)} in host memory, {args.repeats} "
          f"interleaved repeats (fewer past "
          f"{args.row_seconds:.0f} s a row, 3 at least)")
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def untiled(fcn: nn.Module) -> np.ndarray:
        # from the image in host memory to the map in host memory, as dense_map is timed
        out = fcn(torch.from_numpy(image)[None].to(dev))[0].float().cpu().numpy()
        sync()
        return out

    print("\n1. tiled vs untiled (one call of the same net); seconds are medians; ratios are "
          "untiled s / tiled s, median of the per-repeat ratios [10%-90%];\n   halo = tiles' "
          "FLOPs / untiled FLOPs; 1/px = image pixels / the tiles' input pixels (the full-"
          "resolution layers' floor);\n   loop = the same "
          "tiles in a plain loop (no Dask); batch=1 = dense_map without batched tiles")
    print(f"{'net':15} {'image':>5} {'tile':>9} {'tiles':>5} {'halo':>5} {'1/halo':>6} {'1/px':>5} "
          f"{'n':>3} {'':4} "
          f"{'untiled s':>8} {'loop s':>8} {'dense s':>8} {'loop/untiled':>17} "
          f"{'dense_map/untiled':>17} {'st':>2} {'stages=1/untiled':>17} "
          f"{'batch=1/untiled':>17} {'first s':>7}  exact")
    models = nets()
    if args.nets:
        models = {k: v for k, v in models.items() if k in args.nets}
    for size, (name, (_, fcn, _)) in itertools.product(args.size, models.items()):
        image = np.random.default_rng(0).standard_normal((3, size, size)).astype(
            np.float32)
        plain = fast_pools(fcn, owned=False)
        ref = reference64(plain, image)  # the unfolded net in float64
        fast = fold_batchnorm(plain, owned=plain is not fcn).to(dev)  # the net dense_map runs
        fcn = fcn.to(dev)
        full = untiled(fast)
        for spec in args.tiles:
            tile = None if spec == "auto" else int(spec)
            if tile is not None and tile >= size:
                continue
            dmodel._CACHE.clear()  # a cold first call
            start = time.perf_counter()
            lazy = dense_map(fcn, image, tile=tile, device=dev, threads=threads,
                             stages=args.stages)
            got = np.asarray(lazy)
            first = time.perf_counter() - start
            loop, chunks, halo, px_halo, n_stages, sides = tile_loop(fcn, image, tile, dev,
                                                                     args.stages, threads)
            shown = spec if tile else f"a:{'x'.join(map(str, sides))}"
            loop()  # warm
            unbatched = np.asarray(dense_map(fcn, image, tile=tile, device=dev,
                                             threads=threads, batch=1))
            single = np.asarray(dense_map(fcn, image, tile=tile, device=dev,
                                          threads=threads, stages=1))
            (t_full, t_loop, t_tiled, t_single, t_one), (
                c_full, c_loop, c_tiled, c_single, c_one) = timed(
                [lambda: untiled(fast), loop, lambda: np.asarray(
                    dense_map(fcn, image, tile=tile, device=dev, threads=threads,
                              stages=args.stages)),
                 lambda: np.asarray(dense_map(fcn, image, tile=tile, device=dev,
                                              threads=threads, stages=1)),
                 lambda: np.asarray(dense_map(fcn, image, tile=tile, device=dev,
                                              threads=threads, batch=1))],
                args.repeats, args.row_seconds)
            verdict = str(check_stitched(got, full, ref, dev))
            for label, other in (("stages=1", single), ("batch=1", unbatched)):
                if not check_stitched(other, full, ref, dev).equal:
                    verdict += f"; {label}: {check_stitched(other, full, ref, dev)}"
            print(f"{name:15} {size:>5} {shown:>9} {chunks:>5} {halo:>5.2f} {1 / halo:>6.2f} "
                  f"{1 / px_halo:>5.2f} "
                  f"{len(t_full):>3} wall {spread(t_full)[0]:>8.4f} {spread(t_loop)[0]:>8.4f} "
                  f"{spread(t_tiled)[0]:>8.4f} {ratios(t_full, t_loop):>17} "
                  f"{ratios(t_full, t_tiled):>17} {n_stages:>2} {ratios(t_full, t_single):>17} "
                  f"{ratios(t_full, t_one):>17} {first:>7.2f}  {verdict}", flush=True)
            if not dev.startswith("cuda"):  # CUDA work runs outside this process's CPU time
                print(f"{'':15} {'':>5} {'':>9} {'':>5} {'':>5} {'':>6} {'':>5} {'':>3} CPU  "
                      f"{spread(c_full)[0]:>8.4f} {spread(c_loop)[0]:>8.4f} "
                      f"{spread(c_tiled)[0]:>8.4f} {ratios(c_full, c_loop):>17} "
                      f"{ratios(c_full, c_tiled):>17} {'':>2} {ratios(c_full, c_single):>17} "
                      f"{ratios(c_full, c_one):>17}",
                      flush=True)

    image = first_image  # parts 2 and 3: the first size
    if not args.no_sliding:
        print("\n2. dense_map (default tile) vs sliding_window (every crop classified) against "
              "the FLOP ratio (conv/matmul FLOPs); seconds are medians; 'of FLOP' = speedup / "
              "FLOP ratio, median of the per-repeat values [10%-90%]")
        print(f"{'net':15} {'':>4} {'n':>3} {'dense s':>9} {'sliding s':>10} {'speedup':>8} "
              f"{'FLOP ratio':>11} {'of FLOP':>20}")
        x = torch.from_numpy(image)[None].to(dev)
        for name, (net, fcn, shape) in models.items():
            net, fcn = net.to(dev), fcn.to(dev)
            rf = receptive_field(fcn.cpu(), shape)
            fcn = fcn.to(dev)
            fast = fold_batchnorm(fast_pools(fcn, owned=False), owned=False)
            crops = x[0]

            def slide(net: nn.Module = net) -> None:
                sliding_window(net, crops, rf.window_size, rf.stride,
                               batch_size=args.batch, progress=False)
                sync()

            def dense() -> None:
                np.asarray(dense_map(fcn, image, device=dev, threads=threads))

            rows = [("dense_map", dense)]
            if not args.no_fuse:  # BatchNorm folded (the default) vs run as it is
                rows[0] = ("dense_map, BN folded", dense)
                other = copy.deepcopy(fcn)  # its own cache entry (one per model object)
                rows.append(("dense_map, unfused", lambda: np.asarray(
                    dense_map(other, image, device=dev, fuse=False, threads=threads))))
            if fast_pools(fcn, owned=False) is not fcn:  # the pool as torch's AvgPool
                rows.append(("(AvgPool2d, untiled)", lambda: untiled(fcn)))
            f_dense, f_slide = flops(lambda: untiled(fast)), flops(slide)  # slide's warm-up
            ratio = f_slide / f_dense
            for _, fn in rows:  # warm: geometry cache, kernels
                fn()
            walls, cpus = timed([fn for _, fn in rows] + [slide], args.sliding_repeats,
                                args.row_seconds * 2)
            for kind, times in (("wall", walls), ("CPU", cpus)):
                if kind == "CPU" and dev.startswith("cuda"):
                    continue
                t_slide = times[-1]
                for (label, _), t_dense in zip(rows, times, strict=False):
                    m, lo, hi = spread([b / a / ratio for a, b in zip(t_dense, t_slide,
                                                                       strict=True)])
                    print(f"{name:15} {kind:>4} {len(t_slide):>3} {spread(t_dense)[0]:>9.3f} "
                          f"{spread(t_slide)[0]:>10.3f} "
                          f"{spread(t_slide)[0] / spread(t_dense)[0]:>7.1f}x {ratio:>10.1f}x "
                          f"{m:>7.0%} [{lo:.0%}-{hi:.0%}]  {label}", flush=True)

    if args.workers:
        from distributed import Client, LocalCluster

        _, fcn, _ = models["vgg-style"]
        times = {}
        for n in (1, 2):
            with LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=None) as c, \
                    Client(c) as client:
                np.asarray(dense_map(fcn, image, tile=args.tile, scheduler=client, device=dev))
                (times[n],) = best_of([lambda client=client: np.asarray(dense_map(
                    fcn, image, tile=args.tile, scheduler=client, device=dev))],
                    max(3, args.repeats // 3))
        print(f"\nvgg-style on a LocalCluster: 1 worker {times[1]:.2f} s, 2 workers "
              f"{times[2]:.2f} s, speedup {times[1] / times[2]:.2f}x, efficiency "
              f"{times[1] / times[2] / 2:.0%}")
    print(f"\n(whole run {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
