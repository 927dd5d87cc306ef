"""compare's verdicts over the model zoo: false alarms, misses, localization, cost per draw.

For every zoo model (``tests/zoo/zoo_models.py``, small random configs) and ``--draws`` random
input draws:

- clean pairs, which must never be "different": ``A`` vs ``to_conv(A)`` (path ``to_conv``),
  ``A`` vs ``to_linear(to_conv(A))`` (path ``to_linear``);
- planted bugs, ``A`` vs ``to_conv(A')`` where ``A'`` is ``A`` with one Linear changed: +1e-3 on
  one weight, the square weight transposed, two rows swapped, the bias dropped, one row scaled by
  1.01 (and, on a small CNN with Flatten -> Linear, the Linear's input read in HWC order).

A bug must be caught ("different") on every draw where it is *significant*: B's largest error
against A's float64 twin exceeds 10x A's own largest error (floored at one unit roundoff of the
output's scale), measured here independently of compare (plain float64 forward of A). The first
divergence must name the planted layer. Printed per model and path: draws, false alarms, bug
draws, significant ones, misses, mislocalized; then compare's time per draw (ratio to the two
float32 forward passes, measured interleaved) and peak RSS against the models' weight size.

    PYTHONPATH=src:tests/zoo python bench/verdicts.py                 # full sweep, 20 draws
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --draws 3 --models bert,vit
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))

from zoo_models import ZOO, ZooModel, logits  # noqa: E402

import fc2conv  # noqa: E402

DEFAULT = ["bert", "roberta", "distilbert", "t5_encoder", "llama", "vit", "whisper_encoder",
           "resnet_hf", "cnn_flatten"]
RATIO = 10.0


class CnnFlatten(nn.Module):
    """A small CNN whose head flattens a C x H x W map (CHW order) into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build(name: str, seed: int = 0) -> nn.Module:
    if name == "cnn_flatten":
        torch.manual_seed(seed)
        return CnnFlatten().eval()
    return ZOO[name].build(seed)


def draw(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    if name == "cnn_flatten":
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(2, 3, 6, 6, generator=g),)
    z: ZooModel = ZOO[name]
    if z.family in ("text", "seq2seq"):
        return tuple(z.draw(seed, batch=2, length=8).values())
    return tuple(z.draw(seed, batch=2).values())


def planted_layer(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """A Linear in the middle of the model, square with a bias when there is one."""
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not lins:
        return None
    square = [(n, m) for n, m in lins if m.weight.shape[0] == m.weight.shape[1]
              and m.bias is not None] or [(n, m) for n, m in lins
                                          if m.weight.shape[0] == m.weight.shape[1]] or lins
    return square[len(square) // 2]


def bugs(name: str, lin: nn.Linear) -> dict[str, Any]:
    out: dict[str, Any] = {}
    w = lin.weight
    out["+1e-3 weight"] = lambda m: m.weight.data.__setitem__((0, 1), m.weight.data[0, 1] + 1e-3)
    if w.shape[0] == w.shape[1]:
        out["transposed"] = lambda m: m.weight.data.copy_(m.weight.data.t().clone())
    if w.shape[0] >= 2:
        order = [1, 0, *range(2, w.shape[0])]
        out["rows swapped"] = lambda m: m.weight.data.copy_(m.weight.data[order])
    if lin.bias is not None and bool(lin.bias.abs().max() > 0):
        out["bias dropped"] = lambda m: m.bias.data.zero_()
    out["row x1.01"] = lambda m: m.weight.data[0].mul_(1.01)
    if name == "cnn_flatten":
        def hwc(m: nn.Linear) -> None:
            m.weight.data.copy_(m.weight.data.view(10, 4, 6, 6).permute(0, 2, 3, 1).reshape(10, -1))
        out["flatten order"] = hwc
    return out


def errors(a: nn.Module, a64: nn.Module, b: nn.Module,
           x: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(A's error, B's error) against A's float64 twin, A's floored at u x scale."""
    with torch.no_grad():
        r = logits(a64(*[t.double() if t.is_floating_point() else t for t in x])).double()
        ya = logits(a(*x)).double()
        yb = logits(b(*x)).double().reshape(ya.shape)
    u = torch.finfo(torch.float32).eps / 2
    ea = max(float((ya - r).abs().max()), u * float(r.abs().max()))
    return ea, float((yb - r).abs().max())


def weight_bytes(*models: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--paths", default="to_conv,to_linear,bugs")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    names = [n for n in args.models.split(",") if n]
    paths = args.paths.split(",")
    rows = []
    cost = []
    for name in names:
        a = build(name)
        x0 = draw(name, 10_000)
        a64 = copy.deepcopy(a).double()
        pairs: list[tuple[str, nn.Module, str | None]] = []
        if "to_conv" in paths:
            pairs.append(("to_conv", fc2conv.to_conv(a, x0), None))
        if "to_linear" in paths:
            pairs.append(("to_linear", fc2conv.to_linear(fc2conv.to_conv(a, x0), x0), None))
        if "bugs" in paths and (pl := planted_layer(a)) is not None:
            lname, lin = pl
            for bug, change in bugs(name, lin).items():
                a_bug = copy.deepcopy(a)
                change(a_bug.get_submodule(lname))
                pairs.append((f"bug: {bug}", fc2conv.to_conv(a_bug, x0), lname))
        for path, b, planted in pairs:
            n = fa = sig = miss = misloc = 0
            for k in range(args.draws):
                x = draw(name, k)
                rep = fc2conv.compare(a, b, inputs=x, layers=planted is not None)
                n += 1
                if planted is None:
                    fa += rep.verdict == "different"
                    continue
                ea, eb = errors(a, a64, b, x)
                if eb > RATIO * ea:
                    sig += 1
                    miss += rep.verdict != "different"
                    if rep.verdict == "different" and planted not in (rep.first_divergence or ""):
                        misloc += 1
            rows.append((name, path, n, fa if planted is None else "-",
                         sig if planted else "-", miss if planted else "-",
                         misloc if planted else "-"))
            print(*rows[-1], sep="\t", flush=True)
        # cost of one draw, interleaved with the two float32 forward passes
        b = pairs[0][1]
        x = draw(name, 1)
        t_cmp = t_fwd = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            a(*x)
            b(*x)
            t_fwd += time.perf_counter() - t0
            t0 = time.perf_counter()
            fc2conv.compare(a, b, inputs=x, layers=False)
            t_cmp += time.perf_counter() - t0
        cost.append((name, weight_bytes(a, b) / 2**20, t_cmp / 3, t_cmp / max(t_fwd, 1e-9),
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10))
    print("\nmodel\tpath\tdraws\tfalse_alarms\tsignificant_bug_draws\tmisses\tmislocalized")
    for r in rows:
        print(*r, sep="\t")
    total_fa = sum(r[3] for r in rows if isinstance(r[3], int))
    total_miss = sum(r[5] for r in rows if isinstance(r[5], int))
    total_loc = sum(r[6] for r in rows if isinstance(r[6], int))
    total_sig = sum(r[4] for r in rows if isinstance(r[4], int))
    print(f"TOTAL false alarms {total_fa}, misses {total_miss} of {total_sig} significant bug "
          f"draws, mislocalized {total_loc}")
    print("\nmodel\tweights A+B (MiB)\tcompare s/draw (layers=False)\tx two fp32 forwards"
          "\tprocess peak RSS so far (MiB)")
    for c in cost:
        print(f"{c[0]}\t{c[1]:.2f}\t{c[2]:.3f}\t{c[3]:.1f}\t{c[4]:.0f}")


if __name__ == "__main__":
    main()
