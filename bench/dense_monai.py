"""dense_map vs MONAI's sliding_window_inference on the same model and image, side by side.

Per net: seconds (best of --repeats, the tools interleaved), the max abs difference to the
full-image run ``net(image)`` (and as a share of the map's scale), the map shape, and for
dense_map compare's verdict against a float64 run (fc2conv.dense.check).

* ``seg-dilated``: a segmentation-style net (stride 1, 'same' padding, dilations 1-2-4-8), whose
  map has the image's grid: both tools answer on the same grid, so every cell compares.
  MONAI blends overlapping tiles whose borders were zero-padded: it is not the full-image map.
* ``alexnet-cls``: a convolutionalized classifier (window 63, stride 8). MONAI cannot run the
  classifier itself (its output has no spatial axes: an error), and given the dense net it
  treats the per-tile map as a resampled image (zoom = map / tile) and returns that grid
  instead of one cell per window: the shapes differ, so only the time compares; the dense map
  is checked against the full-image run and against sliding_window, the crop-by-crop truth.

    PYTHONPATH=src python bench/dense_monai.py                       # 2-D, 512^2, tiles of 128
    PYTHONPATH=src python bench/dense_monai.py --dims 3 --size 96 --tile 48
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
from dense_throughput import best_of  # noqa: E402  (one timing loop for the dense benches)


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
    args = parser.parse_args()
    dev, dims = args.device, args.dims
    torch.manual_seed(0)
    image = np.random.default_rng(0).standard_normal((3, *(args.size,) * dims)).astype(
        np.float32)
    x = torch.from_numpy(image)[None].to(dev)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    roi = (args.tile,) * dims
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, image "
          f"{args.size}^{dims}, MONAI roi / dense_map tile {args.tile}")

    nets: dict[str, nn.Module] = {"seg-dilated": seg_net(dims).to(dev)}
    if dims == 2:
        cls = archs.AlexNetStyle().eval()
        nets["alexnet-cls"] = convolutionalize(cls, cls.INPUT_SHAPE).to(dev)

    print(f"\n{'net':12} {'tool':34} {'seconds':>8} {'max |x - full|':>15} {'of scale':>9} "
          f"{'shape':>16}  verdict")
    for name, net in nets.items():
        def full_run(net: nn.Module = net) -> np.ndarray:
            out = net(x)[0].float().cpu().numpy()
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
        for overlap, mode in ((0.0, "constant"), (0.5, "constant"), (0.5, "gaussian"),
                              (0.75, "gaussian")):
            def monai(overlap: float = overlap, mode: str = mode) -> np.ndarray:
                out = sliding_window_inference(x, roi, args.batch, net, overlap=overlap,
                                               mode=mode)
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
        times = best_of([fn for _, fn in ok], args.repeats)
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
        if name == "alexnet-cls":
            rf = receptive_field(cls, cls.INPUT_SHAPE)
            slid = sliding_window(cls.to(dev), x[0], rf.window_size, rf.stride,
                                  progress=False)[0].float().cpu().numpy()
            got = outs[f"dense_map tile {args.tile}"][:, :slid.shape[1], :slid.shape[2]]
            print(f"{'':12} dense_map vs sliding_window (every crop classified, the truth per "
                  f"window): max abs diff {float(np.abs(got - slid).max()):.2e} on "
                  f"{slid.shape[1:]} windows")
            try:
                sliding_window_inference(x, rf.window_size, args.batch, cls, overlap=0.75)
            except Exception as exc:  # noqa: BLE001 - the point: MONAI refuses a classifier
                print(f"{'':12} MONAI on the classifier itself: {type(exc).__name__}: "
                      f"{str(exc)[:110]}")


if __name__ == "__main__":
    main()
