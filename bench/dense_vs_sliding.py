"""Dense map (one pass of the convolutionalized net) vs sliding window (every crop classified),
for the AlexNet-style reference net with and without padding.

Prints, side by side in one run: wall time of each way, the speedup, and the FLOP ratio
(counted with torch.utils.flop_counter), which is the speedup's ceiling: the dense pass shares
the features of overlapping windows. For the valid net the two maps are equal (checked); for the
padded net they differ (zero padding at a crop's border is not padding inside the image) and the
measured difference is printed.

    PYTHONPATH=src python bench/dense_vs_sliding.py --size 256     # CPU: smaller than 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import archs  # noqa: E402

from fc2conv import convolutionalize, receptive_field, sliding_window  # noqa: E402


def timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` times of ``a`` and ``b``, run alternately so that load from other
    processes on a shared machine hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((a, b)):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], best[1]


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side (1024 on a GPU)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--batch-size", type=int, default=256, help="crops per sliding batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image "
          f"{args.size}x{args.size}")
    header = (f"{'net':16} {'window':>7} {'stride':>6} {'cells':>8} {'dense s':>9} "
              f"{'sliding s':>10} {'speedup':>8} {'FLOP ratio':>11} {'max |dense-slid|':>17}")
    print(header)
    for padded in (False, True):
        model = archs.AlexNetStyle(padded=padded, width=args.width).eval()
        shape = model.INPUT_SHAPE
        dense = convolutionalize(model, shape)
        rf = receptive_field(dense, shape)
        image = torch.randn(1, 3, args.size, args.size)
        rows, cols = rf.windows_inside((args.size, args.size))

        def run_dense(dense=dense, image=image):
            return dense(image)

        def run_sliding(model=model, image=image, rf=rf):
            return sliding_window(model, image, rf.window_size, rf.stride,
                                  batch_size=args.batch_size, progress=False)

        run_dense()  # warm up
        t_dense, t_slide = timed_pair(run_dense, run_sliding, args.repeats)
        f_dense, f_slide = flops(run_dense), flops(run_sliding)
        diff = (run_dense()[..., :rows, :cols] - run_sliding()).abs().max().item()
        name = "alexnet_padded" if padded else "alexnet_valid"
        print(f"{name:16} {rf.window_size[0]:>7} {rf.stride[0]:>6} {rows * cols:>8} "
              f"{t_dense:>9.4f} {t_slide:>10.4f} {t_slide / t_dense:>7.1f}x "
              f"{f_slide / f_dense:>10.1f}x {diff:>17.3g}")


if __name__ == "__main__":
    main()
