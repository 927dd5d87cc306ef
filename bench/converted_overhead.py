"""Latency of ``to_conv(model)`` relative to the original, for the MLP and the transformer
encoder block of the reference architectures, measured side by side in one run.

    PYTHONPATH=src python bench/converted_overhead.py            # CPU
    PYTHONPATH=src python bench/converted_overhead.py --device cuda

A ratio above 1 is what the layout moves and 1x1 convs cost on this backend; accelerators that
prefer (B, C, 1, S) convolutions (Apple's ANE) are the reason to convert.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import archs  # noqa: E402

from fc2conv import to_conv  # noqa: E402


def latency(model: torch.nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x})
    return timer.blocked_autorange(min_run_time=min_run_time).median


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"input {args.batch}x{args.tokens}x{args.dim}")
    print(f"{'model':10} {'conv':>7} {'original ms':>12} {'to_conv ms':>11} {'ratio':>7} "
          f"{'max |diff|':>11}")
    models = {
        "mlp": archs.MLP(dim=args.dim, hidden=4 * args.dim),
        "encoder": archs.EncoderBlock(dim=args.dim, heads=4, hidden=4 * args.dim),
    }
    for name, model in models.items():
        model = model.to(device).eval()
        for dims in (1, 2):
            conv = to_conv(model, x, dims=dims).to(device)
            diff = (conv(x) - model(x)).abs().max().item()
            # alternate the two, best of rounds: load from other processes hits both alike
            base, t = float("inf"), float("inf")
            for _ in range(args.rounds):
                base = min(base, latency(model, x, args.min_run_time))
                t = min(t, latency(conv, x, args.min_run_time))
            print(f"{name:10} {f'{dims}d':>7} {base * 1e3:>12.3f} {t * 1e3:>11.3f} "
                  f"{t / base:>6.2f}x {diff:>11.3g}")


if __name__ == "__main__":
    main()
