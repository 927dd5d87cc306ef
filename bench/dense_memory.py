"""Peak RSS of dense_map on large RGB uint8 images stored on disk (zarr), per image side.

Each side runs in a fresh child process (so its peak RSS is its own): the image is generated
chunk by chunk into a zarr array on disk, then a VGG-style convolutionalized net maps it tile by
tile into a zarr output. Prints side, image GB, map shape, seconds, and peak RSS (GB). The files
are deleted afterwards.

    PYTHONPATH=src python bench/dense_memory.py --sides 10000 20000 40000 --dir /tmp/dense-mem
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def child(side: int, folder: Path, tile: int, device: str) -> None:
    import numpy as np
    import torch
    import zarr

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import archs

    from fc2conv import convolutionalize, dense_map

    image = folder / f"rgb{side}.zarr"
    z = zarr.open_array(str(image), mode="w", shape=(3, side, side), chunks=(3, 2048, 2048),
                        dtype="uint8")
    rng = np.random.default_rng(0)
    for r in range(0, side, 2048):
        for c in range(0, side, 2048):
            h, w = min(2048, side - r), min(2048, side - c)
            z[:, r:r + h, c:c + w] = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    torch.manual_seed(0)
    net = archs.VGGStyle().eval()
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    start = time.perf_counter()
    out = dense_map(fcn, str(image), tile=tile, out=folder / f"map{side}.zarr", device=device,
                    mean=127.0, std=64.0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    print(f"{side:>7} {3 * side * side / 1e9:>8.2f} {str(tuple(out.shape)):>20} {seconds:>9.1f} "
          f"{peak:>10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--dir", default="/tmp/fc2conv-dense-memory")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.dir)
    if args.child:
        child(args.child, folder, args.tile, args.device)
        return
    print(f"{'side':>7} {'image GB':>8} {'map':>20} {'seconds':>9} {'peak RSS GB':>10}")
    for side in args.sides:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, __file__, "--child", str(side), "--dir", str(folder),
                            "--tile", str(args.tile), "--device", args.device], check=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
