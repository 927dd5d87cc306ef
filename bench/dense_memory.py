"""Peak RSS of dense_map on large RGB uint8 images stored on disk (zarr), per image side.

Each side runs in a fresh child process (so its peak RSS is its own): the image is generated
chunk by chunk into an uncompressed zarr array or a tiled BigTIFF on disk, then a VGG-style
convolutionalized net maps it tile by tile (dense_map's default tile unless --tile) into a zarr
output. Prints side, image GB, map shape, chunks done, seconds, and peak RSS (GB). With
--max-seconds each map stops after that long (part of the tiles, in row order: the RSS of a
run whose every tile is alike). The files are deleted afterwards.

    PYTHONPATH=src python bench/dense_memory.py --sides 10000 20000 40000 --dir /tmp/dense-mem
    PYTHONPATH=src python bench/dense_memory.py --sides 40000 --width 4 --max-seconds 120
    PYTHONPATH=src python bench/dense_memory.py --sides 10000 20000 40000 --format tiff \
        --net stride4 --width 4                    # the complete 40k run (minutes)
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def vgg_stride4(width: int) -> Any:
    """A VGG-style classifier on 3x112x112 with a cheap stem: a 4x4 stride-4 conv (a patch
    embedding), then padded 3x3 convs and max pools, a flatten head (its first Linear becomes
    a 7x7 conv): stride 16; ~16x fewer FLOPs per pixel than VGGStyle's full-res
    first layers, so a 40k^2 image maps in minutes on two loaded cores."""
    import torch
    from torch import nn

    class VGGStride4(nn.Module):
        INPUT_SHAPE = (3, 112, 112)

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, width, 4, stride=4), nn.ReLU(inplace=True),
                nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(2))
            self.classifier = nn.Sequential(
                nn.Linear(2 * width * 49, 32), nn.ReLU(True), nn.Dropout(),
                nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.features(x), 1))

    return VGGStride4()


class _Stop(Exception):
    """Raised from the progress callback once --max-seconds have passed."""


def write_image(path: Path, side: int, fmt: str) -> None:
    """A random RGB uint8 image, generated and written 2048 rows x 2048 columns at a time."""
    import numpy as np

    rng = np.random.default_rng(0)
    step = 2048
    if fmt == "zarr":
        import zarr

        z = zarr.create_array(str(path), shape=(3, side, side), chunks=(3, step, step),
                              dtype="uint8", compressors=None)
        for r in range(0, side, step):
            for c in range(0, side, step):
                h, w = min(step, side - r), min(step, side - c)
                z[:, r:r + h, c:c + w] = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
        return
    import tifffile

    def tiles():  # row-major 1024x1024 tiles, channels last (BigTIFF, tiled, uncompressed)
        per_side = -(-side // 1024)
        for _ in range(per_side * per_side):
            yield rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype="uint8", tile=(1024, 1024),
                     bigtiff=True, photometric="rgb")


def child(side: int, folder: Path, tile: int | None, device: str, width: int, fmt: str,
          max_seconds: float | None, stem: str = "vgg") -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import archs

    from fc2conv import convolutionalize, dense_map

    image = folder / (f"rgb{side}.zarr" if fmt == "zarr" else f"rgb{side}.tif")
    start = time.perf_counter()
    write_image(image, side, fmt)
    made = time.perf_counter() - start
    torch.manual_seed(0)
    net = (vgg_stride4(width) if stem == "stride4" else archs.VGGStyle(width=width)).eval()
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    seen = [0, 0]
    start = time.perf_counter()
    log_every = [0.0]

    def progress(done: int, total: int) -> None:
        seen[:] = [done, total]
        now = time.perf_counter() - start
        if now - log_every[0] > 30 or done == total:  # progress on stderr for a nohup log
            log_every[0] = now
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"  side {side}: {done}/{total} chunks, {now:.0f} s, peak RSS {rss:.2f} GB",
                  file=sys.stderr, flush=True)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            raise _Stop

    try:
        out = dense_map(fcn, str(image), tile=tile, out=folder / f"map{side}.zarr",
                        device=device, mean=127.0, std=64.0, progress=progress)
        shape = str(tuple(out.shape))
    except _Stop:
        shape = "(stopped)"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    print(f"{side:>7} {fmt:>5} {3 * side * side / 1e9:>8.2f} {made:>7.0f} {shape:>20} "
          f"{seen[0]:>6}/{seen[1]:<6} {seconds:>9.1f} {peak:>10.2f}", flush=True)
    del np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--dir", default="/tmp/fc2conv-dense-memory")
    parser.add_argument("--tile", type=int, default=None, help="default: dense_map's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=8, help="VGGStyle width (4: a small net)")
    parser.add_argument("--format", choices=("zarr", "tiff"), default="zarr")
    parser.add_argument("--net", choices=("vgg", "stride4"), default="vgg",
                        help="VGGStyle, or the VGG-style net with a stride-4 stem (cheap)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop each map after this long (part of the tiles; RSS so far)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.dir)
    if args.child:
        child(args.child, folder, args.tile, args.device, args.width, args.format,
              args.max_seconds, args.net)
        return
    print(f"{'side':>7} {'fmt':>5} {'image GB':>8} {'write s':>7} {'map':>20} "
          f"{'chunks done':>13} {'map s':>9} {'peak RSS GB':>10}")
    for side in args.sides:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            extra = ["--tile", str(args.tile)] if args.tile else []
            extra += ["--max-seconds", str(args.max_seconds)] if args.max_seconds else []
            subprocess.run([sys.executable, __file__, "--child", str(side), "--dir", str(folder),
                            "--device", args.device, "--width", str(args.width), "--format",
                            args.format, "--net", args.net, *extra], check=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
