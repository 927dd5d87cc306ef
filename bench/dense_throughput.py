"""dense_map throughput, side by side in one run (best of --repeats, interleaved):

1. tiled (dense_map, default tile and --tiles) vs untiled (one call of the same net): the
   ratio untiled/tiled time, and whether the stitched map equals the untiled one by
   compare's rule against a float64 run (fc2conv.dense.check; TF32 allowed for on CUDA);
2. dense_map vs sliding_window (every crop classified) against the FLOP ratio
   (torch.utils.flop_counter): "of FLOP" is speedup / FLOP ratio;
3. dense_map on a LocalCluster of 2 worker processes vs 1 (with --workers).
MONAI's sliding_window_inference is compared in bench/dense_monai.py.

    PYTHONPATH=src python bench/dense_throughput.py                    # CPU, 384 px
    PYTHONPATH=src python bench/dense_throughput.py --device cuda --size 2048 --tiles auto 1024
"""

# ruff: noqa: B023  (closures are timed inside the loop iteration that made them)
from __future__ import annotations

import argparse
import copy
import sys
import time
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
from fc2conv.dense.pools import fast_pools  # noqa: E402


def best_of(fns: list, repeats: int) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


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


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--tiles", nargs="+", default=["auto", "256"],
                        help="tile sides to time ('auto': dense_map's default)")
    parser.add_argument("--tile", type=int, default=256, help="tile of the MONAI/worker parts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", action="store_true", help="also 2 vs 1 worker processes")
    parser.add_argument("--no-sliding", action="store_true")
    parser.add_argument("--no-fuse", action="store_true",
                        help="part 2 without the unfused (BatchNorm not folded) dense_map row")
    parser.add_argument("--batch", type=int, default=256, help="sliding_window's crops per call")
    args = parser.parse_args()
    began = time.perf_counter()
    dev = args.device
    image = np.random.default_rng(0).standard_normal((3, args.size, args.size)).astype(np.float32)
    x = torch.from_numpy(image)[None].to(dev)
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, image "
          f"{args.size}^2")
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def untiled(fcn: nn.Module) -> np.ndarray:
        # from the image in host memory to the map in host memory, as dense_map is timed
        out = fcn(torch.from_numpy(image)[None].to(dev))[0].float().cpu().numpy()
        sync()
        return out

    print("\n1. tiled (dense_map) vs untiled (one call of the same net): speed ratio = untiled "
          "s / tiled s; 'first s' includes tracing the net's geometry (cached afterwards);\n"
          "   exact: compare's rule vs a float64 run (fc2conv.dense.check)")
    print(f"{'net':15} {'tile':>6} {'chunks':>6} {'untiled s':>10} {'tiled s':>9} "
          f"{'first s':>8} {'tiled/untiled':>14} {'tiles/s':>8}  exact")
    models = nets()
    for name, (_, fcn, _) in models.items():
        plain = fast_pools(fcn, owned=False)
        ref = reference64(plain, image)  # the unfolded net in float64
        fast = fold_batchnorm(plain, owned=plain is not fcn).to(dev)  # the net dense_map runs
        fcn = fcn.to(dev)
        full = untiled(fast)
        for spec in args.tiles:
            tile = None if spec == "auto" else int(spec)
            dmodel._CACHE.clear()  # a cold first call
            start = time.perf_counter()
            lazy = dense_map(fcn, image, tile=tile, device=dev)
            got = np.asarray(lazy)
            first = time.perf_counter() - start
            chunks = int(np.prod(lazy.numblocks[1:]))
            t_full, t_tiled = best_of([lambda: untiled(fast), lambda: np.asarray(
                dense_map(fcn, image, tile=tile, device=dev))], args.repeats)
            verdict = check_stitched(got, full, ref, dev)
            print(f"{name:15} {spec:>6} {chunks:>6} {t_full:>10.3f} {t_tiled:>9.3f} "
                  f"{first:>8.3f} {t_full / t_tiled:>13.2f}x {chunks / t_tiled:>8.1f}  {verdict}")

    if not args.no_sliding:
        print("\n2. dense_map (default tile) vs sliding_window (every crop classified) against "
              "the FLOP ratio (conv/matmul FLOPs); 'of FLOP' = speedup / FLOP ratio")
        print(f"{'net':15} {'dense s':>9} {'sliding s':>10} {'speedup':>8} {'FLOP ratio':>11} "
              f"{'of FLOP':>8}")
        for name, (net, fcn, shape) in models.items():
            net, fcn = net.to(dev), fcn.to(dev)
            rf = receptive_field(fcn.cpu(), shape)
            fcn = fcn.to(dev)
            fast = fast_pools(fcn, owned=False)
            crops = x[0]

            def slide(net: nn.Module = net) -> None:
                sliding_window(net, crops, rf.window_size, rf.stride,
                               batch_size=args.batch, progress=False)
                sync()

            def dense() -> None:
                np.asarray(dense_map(fcn, image, device=dev))

            rows = [("dense_map", dense)]
            if not args.no_fuse:  # BatchNorm folded (the default) vs run as it is
                rows[0] = ("dense_map, BN folded", dense)
                other = copy.deepcopy(fcn)  # its own cache entry (one per model object)
                rows.append(("dense_map, unfused", lambda: np.asarray(
                    dense_map(other, image, device=dev, fuse=False))))
            if fast is not fcn:  # the pool as torch's AvgPool, for comparison
                rows.append(("(AvgPool2d, untiled)", lambda: untiled(fcn)))
            f_dense, f_slide = flops(lambda: untiled(fast)), flops(slide)
            ratio = f_slide / f_dense
            for fn in [*(fn for _, fn in rows), slide]:  # warm: geometry cache, kernels
                fn()
            times = best_of([fn for _, fn in rows] + [slide], max(1, args.repeats - 1))
            t_slide = times[-1]
            for (label, _), t_dense in zip(rows, times, strict=False):
                print(f"{name:15} {t_dense:>9.3f} {t_slide:>10.3f} {t_slide / t_dense:>7.1f}x "
                      f"{ratio:>10.1f}x {t_slide / t_dense / ratio:>7.0%}  {label}")

    if args.workers:
        from distributed import Client, LocalCluster

        _, fcn, _ = models["vgg-style"]
        times = {}
        for n in (1, 2):
            with LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=None) as c, \
                    Client(c) as client:
                np.asarray(dense_map(fcn, image, tile=args.tile, scheduler=client, device=dev))
                (times[n],) = best_of([lambda client=client: np.asarray(dense_map(
                    fcn, image, tile=args.tile, scheduler=client, device=dev))], args.repeats)
        print(f"\nvgg-style on a LocalCluster: 1 worker {times[1]:.2f} s, 2 workers "
              f"{times[2]:.2f} s, speedup {times[1] / times[2]:.2f}x, efficiency "
              f"{times[1] / times[2] / 2:.0%}")
    print(f"\n(whole run {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
