"""Dense map (one pass of the convolutionalized net) vs sliding window (every crop classified),
for the AlexNet-style reference net with and without padding.

Prints, side by side in one run: the time of each way, the speedup, and the FLOP ratio
(counted with torch.utils.flop_counter), which is the speedup's ceiling: the dense pass shares
the features of overlapping windows. 'of FLOP' is speedup / FLOP ratio, the median of the
per-repeat values with its 10-90% spread; the two ways run interleaved, in a rotating order,
with torch's threads pinned (--threads), and every row is printed for wall time and for this
process's CPU time (what a loaded machine inflates least). For the valid net the two maps are
equal (checked); for the padded net they differ (zero padding at a crop's border is not padding
inside the image) and the measured difference is printed.

    PYTHONPATH=src python bench/dense_vs_sliding.py --size 256 --threads 1   # CPU
    PYTHONPATH=src python bench/dense_vs_sliding.py --size 1024              # a GPU machine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import archs  # noqa: E402
from dense_throughput import spread, timed  # noqa: E402  (interleaved, rotating order)

from fc2conv import convolutionalize, receptive_field, sliding_window  # noqa: E402


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side (1024 on a GPU)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--batch-size", type=int, default=256, help="crops per sliding batch")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, pinned (default: all cores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (pinned), device {dev}, "
          f"image {args.size}x{args.size}, {args.repeats} interleaved repeats; times are "
          f"medians, 'of FLOP' = speedup / FLOP ratio, median [10%-90%] of the repeats")
    header = (f"{'net':16} {'time':>4} {'window':>7} {'stride':>6} {'cells':>8} {'dense s':>9} "
              f"{'sliding s':>10} {'speedup':>8} {'FLOP ratio':>11} {'of FLOP':>19} "
              f"{'max |dense-slid|':>17}")
    print(header)
    for padded in (False, True):
        model = archs.AlexNetStyle(padded=padded, width=args.width).eval()
        shape = model.INPUT_SHAPE
        dense = convolutionalize(model, shape).to(dev)
        rf = receptive_field(dense.cpu(), shape)
        dense, model = dense.to(dev), model.to(dev)
        image = torch.randn(1, 3, args.size, args.size, device=dev)
        rows, cols = rf.windows_inside((args.size, args.size))

        def run_dense(dense=dense, image=image):
            out = dense(image)
            sync()
            return out

        def run_sliding(model=model, image=image, rf=rf):
            out = sliding_window(model, image, rf.window_size, rf.stride,
                                 batch_size=args.batch_size, progress=False)
            sync()
            return out

        run_dense()  # warm up
        f_dense, f_slide = flops(run_dense), flops(run_sliding)
        ratio = f_slide / f_dense
        diff = (run_dense()[..., :rows, :cols] - run_sliding()).abs().max().item()
        name = "alexnet_padded" if padded else "alexnet_valid"
        walls, cpus = timed([run_dense, run_sliding], args.repeats)
        for kind, (t_dense, t_slide) in (("wall", walls), ("CPU", cpus)):
            if kind == "CPU" and dev.startswith("cuda"):
                continue
            m, lo, hi = spread([b / a / ratio for a, b in zip(t_dense, t_slide, strict=True)])
            d, sl = spread(t_dense)[0], spread(t_slide)[0]
            print(f"{name:16} {kind:>4} {rf.window_size[0]:>7} {rf.stride[0]:>6} "
                  f"{rows * cols:>8} {d:>9.4f} {sl:>10.4f} {sl / d:>7.1f}x {ratio:>10.1f}x "
                  f"{m:>6.0%} [{lo:.0%}-{hi:.0%}] {diff:>17.3g}", flush=True)


if __name__ == "__main__":
    main()
