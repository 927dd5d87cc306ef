"""dense_map throughput, side by side in one run (best of --repeats, interleaved):

1. tiled (dense_map) vs untiled (one fcn(image) call), per net: the ratio untiled/tiled time;
2. dense (untiled) vs sliding_window (every crop classified) against the FLOP ratio
   (torch.utils.flop_counter): "of FLOP" is speedup / FLOP ratio;
3. MONAI sliding_window_inference vs dense_map on the same net and image: time and max abs
   difference to the full-image map;
4. dense_map on a LocalCluster of 2 worker processes vs 1 (with --workers).

    PYTHONPATH=src python bench/dense_throughput.py                    # CPU, 384 px
    PYTHONPATH=src python bench/dense_throughput.py --device cuda --size 2048 --tile 1024
"""

# ruff: noqa: B023  (closures are timed inside the loop iteration that made them)
from __future__ import annotations

import argparse
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


def gap_fcn(width: int = 8) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """ResNetStyle and its convolutionalized form (stride-1 average pool, 1x1 conv head)."""
    net = archs.ResNetStyle(width=width).eval()
    head = nn.Conv2d(2 * width, 10, 1)
    head.weight.data = net.fc.weight.data[:, :, None, None].clone()
    head.bias.data = net.fc.bias.data.clone()

    class Fcn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.pool, self.head = net, nn.AvgPool2d(16, 1), head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.net
            x = n.layer2(n.layer1(torch.relu(n.bn1(n.conv1(x)))))
            return self.head(self.pool(x))

    return net, Fcn().eval(), net.INPUT_SHAPE


def nets() -> dict[str, tuple[nn.Module, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    out = {}
    for name, net in (("alexnet-valid", archs.AlexNetStyle()), ("alexnet-padded",
                                                                 archs.AlexNetStyle(True)),
                      ("vgg-style", archs.VGGStyle())):
        net.eval()
        out[name] = (net, convolutionalize(net, net.INPUT_SHAPE), net.INPUT_SHAPE)
    out["resnet-gap"] = gap_fcn()
    return out


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", action="store_true", help="also 2 vs 1 worker processes")
    parser.add_argument("--no-sliding", action="store_true")
    args = parser.parse_args()
    dev = args.device
    image = np.random.default_rng(0).standard_normal((3, args.size, args.size)).astype(np.float32)
    x = torch.from_numpy(image)[None].to(dev)
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, image "
          f"{args.size}^2, tile {args.tile}")
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def untiled(fcn: nn.Module) -> np.ndarray:
        out = fcn(x)[0].float().cpu().numpy()
        sync()
        return out

    print(f"\n{'net':15} {'untiled s':>10} {'tiled s':>9} {'tiled/untiled speed':>20} "
          f"{'max |tiled-full|':>17} {'tiles/s':>8}")
    models = nets()
    for name, (_, fcn, _) in models.items():
        fcn = fcn.to(dev)
        full = untiled(fcn)
        got = np.asarray(dense_map(fcn, image, tile=args.tile, device=dev))
        tiles = int(np.prod([-(-n // c) for n, c in zip(got.shape[1:], dense_map(
            fcn, image, tile=args.tile, device=dev).chunksize[1:], strict=True)]))
        t_full, t_tiled = best_of([lambda: untiled(fcn), lambda: np.asarray(
            dense_map(fcn, image, tile=args.tile, device=dev))], args.repeats)
        print(f"{name:15} {t_full:>10.3f} {t_tiled:>9.3f} {t_full / t_tiled:>20.2f}x "
              f"{float(np.abs(got - full).max()):>17.2e} {tiles / t_tiled:>8.1f}")

    if not args.no_sliding:
        print(f"\n{'net':15} {'dense s':>9} {'sliding s':>10} {'speedup':>8} {'FLOP ratio':>11} "
              f"{'of FLOP':>8}")
        for name, (net, fcn, shape) in models.items():
            net, fcn = net.to(dev), fcn.to(dev)
            rf = receptive_field(fcn.cpu(), shape)
            fcn = fcn.to(dev)
            crops = x[0]

            def slide(net: nn.Module = net) -> None:
                sliding_window(net, crops, rf.window_size, rf.stride, batch_size=256,
                               progress=False)
                sync()

            f_dense, f_slide = flops(lambda: untiled(fcn)), flops(slide)
            t_dense, t_slide = best_of([lambda: untiled(fcn), slide], max(1, args.repeats - 1))
            ratio = f_slide / f_dense
            print(f"{name:15} {t_dense:>9.3f} {t_slide:>10.3f} {t_slide / t_dense:>7.1f}x "
                  f"{ratio:>10.1f}x {t_slide / t_dense / ratio:>7.0%}")

    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        print("\nMONAI not installed: skipping the comparison")
    else:
        print(f"\n{'net':15} {'tool':32} {'seconds':>8} {'max |x - full|':>15} {'shape':>14}")
        for name, (_, fcn, _) in models.items():
            fcn = fcn.to(dev)
            full = untiled(fcn)
            rows = [("dense_map", lambda: np.asarray(dense_map(fcn, image, tile=args.tile,
                                                               device=dev)))]
            for overlap, mode in ((0.0, "constant"), (0.5, "gaussian")):
                def monai(overlap: float = overlap, mode: str = mode) -> np.ndarray:
                    out = sliding_window_inference(x, (args.tile, args.tile), 4, fcn,
                                                   overlap=overlap, mode=mode)
                    sync()
                    return out[0].float().cpu().numpy()
                rows.append((f"MONAI overlap {overlap} {mode}", monai))
            for tool, fn in rows:
                try:
                    got = fn()
                    (t,) = best_of([fn], args.repeats)
                except Exception as exc:  # noqa: BLE001 - MONAI may refuse a shape; say so
                    print(f"{name:15} {tool:32} failed: {type(exc).__name__}: {exc}"[:150])
                    continue
                diff = (f"{float(np.abs(got - full).max()):.2e}" if got.shape == full.shape
                        else "shape differs")
                print(f"{name:15} {tool:32} {t:>8.3f} {diff:>15} {str(got.shape):>14}")

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


if __name__ == "__main__":
    main()
