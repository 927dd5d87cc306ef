"""dense_map vs MONAI's sliding_window_inference on the same model and image, side by side.

Per net: seconds (median of --repeats, the tools interleaved, each warmed up once; every
tool starts from the image in host memory and ends with the map there), the max abs
difference to the full-image run ``net(image)`` (and as a share of the map's scale), the map
shape, and for dense_map compare's verdict against a float64 run (fc2conv.dense.check).

* ``seg-dilated``: a segmentation-style net (stride 1, 'same' padding, dilations 1-2-4-8), whose
  map has the image's grid: both tools answer on the same grid, so every cell compares.
  MONAI blends overlapping tiles whose borders were zero-padded: it is not the full-image map.
* ``alexnet-cls`` (2-D) / ``cls3d`` (3-D): a convolutionalized classifier (window 63,
  stride 8 / window 32^3, stride 4). MONAI cannot run the
  classifier itself (its output has no spatial axes: an error), and given the dense net it
  treats the per-tile map as a resampled image (zoom = map / tile) and returns that grid
  instead of one cell per window: the shapes differ, so only the time compares; the dense map
  is checked against the full-image run and against sliding_window, the crop-by-crop truth.

    PYTHONPATH=src python bench/dense_monai.py                       # 2-D, 512^2, tiles of 128
    PYTHONPATH=src python bench/dense_monai.py --dims 3 --size 64 --tile 32

In 3-D the nets are a segmentation net without upsampling and a convolutionalized classifier:
a U-Net (MONAI's BasicUNet) cannot be tiled exactly, because its upsampling path (transposed
convs, interpolation) has no finite receptive field per output cell that fc2conv can derive,
so no halo makes its tiles equal the full-volume run; a net without upsampling has one.
    PYTHONPATH=src python bench/dense_monai.py --device cuda --size 2048 --tile 512
"""

# ruff: noqa: B023  (closures are timed inside the loop iteration that made them)
from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import archs  # noqa: E402

from fc2conv import convolutionalize, dense_map, receptive_field, sliding_window  # noqa: E402
from fc2conv.dense.check import check_stitched  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_throughput import spread, timed  # noqa: E402  (one timing loop for the dense benches)


def seg_net(dims: int, classes: int = 4, width: int = 16) -> nn.Module:
    """Stride 1, 'same' padding: the map has the image's grid (field 35 per axis)."""
    conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
    layers: list[nn.Module] = []
    cin = 3
    for d in (1, 2, 4, 8, 1):
        layers += [conv(cin, width, 3, padding=d, dilation=d), nn.ReLU()]
        cin = width
    layers.append(conv(width, classes, 1))
    return nn.Sequential(*layers).eval()


class Cls3d(nn.Module):
    """A small 3-D classifier on 3x32^3 without padding (window-exact: every map cell is the
    classifier on one 32^3 crop), with a flatten head; convolutionalized: field 32, stride 4."""

    INPUT_SHAPE = (3, 32, 32, 32)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(3, 8, 3, stride=2), nn.ReLU(),
                                      nn.MaxPool3d(2), nn.Conv3d(8, 16, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 ** 3, 32), nn.ReLU(),
                                        nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def window_truth(cls: nn.Module, x: torch.Tensor, dense: np.ndarray, window: tuple[int, ...],
                 stride: tuple[int, ...], count: int = 24) -> float:
    """Max abs difference between ``count`` random cells of the dense map and the classifier
    run on each cell's own crop (the truth per window), for any number of spatial axes."""
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(count):
        cell = tuple(int(rng.integers(0, n)) for n in dense.shape[1:])
        crop = tuple(slice(c * j, c * j + w) for c, j, w in zip(cell, stride, window,
                                                                 strict=True))
        got = cls(x[(slice(None), slice(None), *crop)])[0].float().cpu().numpy()
        worst = max(worst, float(np.abs(got - dense[(slice(None), *cell)]).max()))
    return worst


@torch.inference_mode()
def main() -> None:
    from monai.inferers import sliding_window_inference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128, help="MONAI's roi and dense_map's tile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="MONAI's sw_batch_size")
    parser.add_argument("--width", type=int, default=16, help="seg-dilated's channels")
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.5, 0.75],
                        help="MONAI overlaps (0.5: constant and gaussian; others as below)")
    args = parser.parse_args()
    dev, dims = args.device, args.dims
    torch.manual_seed(0)
    image = np.random.default_rng(0).standard_normal((3, *(args.size,) * dims)).astype(
        np.float32)
    host = torch.from_numpy(image)[None]
    x = host.to(dev)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    roi = (args.tile,) * dims
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, image "
          f"{args.size}^{dims}, MONAI roi / dense_map tile {args.tile}")

    nets: dict[str, nn.Module] = {"seg-dilated": seg_net(dims, width=args.width).to(dev)}
    classifiers: dict[str, nn.Module] = {}
    if dims == 2:
        classifiers["alexnet-cls"] = archs.AlexNetStyle().eval()
    else:
        classifiers["cls3d"] = Cls3d().eval()
    for key, cls in classifiers.items():
        nets[key] = convolutionalize(cls, cls.INPUT_SHAPE).to(dev)

    print(f"\n{'net':12} {'tool':34} {'seconds':>8} {'max |x - full|':>15} {'of scale':>9} "
          f"{'shape':>16}  verdict")
    for name, net in nets.items():
        def full_run(net: nn.Module = net) -> np.ndarray:
            # from host memory to host memory, like dense_map and MONAI below
            out = net(torch.from_numpy(image)[None].to(dev))[0].float().cpu().numpy()
            sync()
            return out

        full = full_run()
        ref = copy.deepcopy(net).cpu().double()(torch.from_numpy(image).double()[None])[0]
        ref = ref.numpy()
        scale = float(np.abs(full).max())
        rows: list[tuple[str, Callable[[], np.ndarray]]] = [
            ("full image (one call)", full_run),
            (f"dense_map tile {args.tile}",
             lambda: np.asarray(dense_map(net, image, tile=args.tile, device=dev))),
            ("dense_map default tile", lambda: np.asarray(dense_map(net, image, device=dev)))]
        modes = {0.0: ("constant",), 0.5: ("constant", "gaussian")}
        for overlap, mode in ((o, m) for o in args.overlaps for m in modes.get(o, ("gaussian",))):
            def monai(overlap: float = overlap, mode: str = mode) -> np.ndarray:
                # the volume in host memory, windows run on dev (MONAI's sw_device)
                out = sliding_window_inference(host, roi, args.batch, net, overlap=overlap,
                                               mode=mode, sw_device=dev, device=dev)
                sync()
                return out[0].float().cpu().numpy()  # type: ignore[index]
            rows.append((f"MONAI overlap {overlap} {mode}", monai))
        outs = {}
        for tool, fn in rows:
            try:
                outs[tool] = fn()
            except Exception as exc:  # noqa: BLE001 - MONAI may refuse a shape: say so
                print(f"{name:12} {tool:34} failed: {type(exc).__name__}: {exc}"[:160])
        ok = [(t, fn) for t, fn in rows if t in outs]
        times = [spread(t)[0] for t in timed([fn for _, fn in ok], args.repeats)[0]]
        for (tool, _), t in zip(ok, times, strict=True):
            got = outs[tool]
            if got.shape == full.shape:
                d = float(np.abs(got - full).max())
                diff, share = f"{d:.2e}", f"{d / scale:.1%}"
                verdict = str(check_stitched(got, full, ref, dev)) if tool != ok[0][0] else ""
            else:
                diff, share, verdict = "shape differs", "-", ""
            print(f"{name:12} {tool:34} {t:>8.3f} {diff:>15} {share:>9} "
                  f"{str(got.shape):>16}  {verdict}")
        if name in classifiers:
            cls = classifiers[name].to(dev)
            rf = receptive_field(cls, cls.INPUT_SHAPE)
            got = outs[f"dense_map tile {args.tile}"]
            if dims == 2:
                slid = sliding_window(cls, x[0], rf.window_size, rf.stride,
                                      progress=False)[0].float().cpu().numpy()
                got = got[:, :slid.shape[1], :slid.shape[2]]
                print(f"{'':12} dense_map vs sliding_window (every crop classified, the truth "
                      f"per window): max abs diff {float(np.abs(got - slid).max()):.2e} on "
                      f"{slid.shape[1:]} windows")
            else:
                worst = window_truth(cls, x, got, rf.window_size, rf.stride)
                print(f"{'':12} dense_map vs the classifier on each cell's own crop (24 random "
                      f"cells, the truth per window): max abs diff {worst:.2e}")
            try:
                sliding_window_inference(x, rf.window_size, args.batch, cls, overlap=0.75)
            except Exception as exc:  # noqa: BLE001 - the point: MONAI refuses a classifier
                print(f"{'':12} MONAI on the classifier itself: {type(exc).__name__}: "
                      f"{str(exc)[:110]}")


if __name__ == "__main__":
    main()
