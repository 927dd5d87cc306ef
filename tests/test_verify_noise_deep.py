"""The PyTorch noise twin on a deep BatchNorm'd CNN: each weight, buffer and input is perturbed
with the reduction length of the ops that read it, so the measured noise stays near A's real
rounding error and a +1e-3 weight bug erring 10x-200x A's error is "different", while the
conversion and another summation order of every layer stay "identical"/"equivalent"."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fc2conv
from fc2conv.verify.models import load
from fc2conv.verify.noise import read_lengths


def deep_bn_cnn(seed: int, depth: int = 8, width: int = 8) -> nn.Module:
    """``depth`` blocks of 3x3 conv + BatchNorm (running variances 30-60, so every block shrinks
    its input's scale) + ReLU, then global average pooling and a Linear head with large weights
    and no bias (its output is the features' sum, which a changed weight shifts by ~1e-3 / 75
    relative: 10x-200x A's rounding error)."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        bn = nn.BatchNorm2d(width)
        with torch.no_grad():
            bn.running_var.uniform_(30.0, 60.0)
            bn.running_mean.uniform_(-0.01, 0.01)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.01, 0.01)
        blocks += [nn.Conv2d(cin, width, 3, padding=1), bn, nn.ReLU()]
        cin = width
    head = nn.Linear(width, 4)
    with torch.no_grad():
        head.weight.mul_(300.0)
        head.bias.zero_()
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


class HalvesConv(nn.Module):
    """A conv summing its input channels in two halves: the same function, another order."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, w = self.conv, self.conv.weight
        h = w.shape[1] // 2
        lo = F.conv2d(x[:, :h], w[:, :h], None, c.stride, c.padding)
        hi = F.conv2d(x[:, h:], w[:, h:], c.bias, c.stride, c.padding)
        return lo + hi


class HalvesLinear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = copy.deepcopy(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, h = self.lin.weight, self.lin.weight.shape[1] // 2
        return x[:, :h] @ w[:, :h].t() + (x[:, h:] @ w[:, h:].t() + self.lin.bias)


def reordered(model: nn.Sequential) -> nn.Sequential:
    """Every conv and the Linear summed in two halves (first conv: 3 channels, 1 + 2)."""
    return nn.Sequential(*[
        HalvesConv(m) if isinstance(m, nn.Conv2d) else
        HalvesLinear(m) if isinstance(m, nn.Linear) else copy.deepcopy(m)
        for m in model]).eval()


def errors(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """A's and B's largest error against an independent float64 forward of A (A's at least one
    unit roundoff of the output's scale)."""
    with torch.no_grad():
        r = copy.deepcopy(a).double()(x.double())
        ea = float((a(x).double() - r).abs().max())
        eb = float((b(x).double() - r).abs().max())
    return max(ea, 2.0**-24 * float(r.abs().max())), eb


@pytest.mark.parametrize("seed", [0, 3])
def test_a_weight_bug_in_a_deep_bn_cnn_is_different(seed: int) -> None:
    a = deep_bn_cnn(seed)
    x = torch.randn(2, 3, 12, 12)
    bad = copy.deepcopy(a)
    with torch.no_grad():
        alive = int(a[:-1](x).mean(0).argmax())  # a feature ReLU leaves alive
        bad[-1].weight[0, alive] += 1e-3
    b = fc2conv.to_conv(bad, (x,))
    ea, eb = errors(a, b, x)
    assert eb > 10 * ea  # the bug's effect is beyond rounding (how bench/verdicts.py counts)
    report = fc2conv.compare(a, b, inputs=(x,), layers=False)
    assert report.verdict == "different", str(report)


def test_the_clean_deep_bn_cnn_stays_identical_or_equivalent() -> None:
    a = deep_bn_cnn(1)
    x0 = torch.randn(2, 3, 12, 12)
    conv, order = fc2conv.to_conv(a, (x0,)), reordered(a)
    for _ in range(2):  # fresh draws
        x = torch.randn(2, 3, 12, 12)
        assert fc2conv.compare(a, conv, inputs=(x,), layers=False).verdict in (
            "identical", "equivalent")
        report = fc2conv.compare(a, order, inputs=(x,), layers=False)
        assert report.verdict == "equivalent", str(report)


def test_each_stored_tensor_gets_the_reduction_length_of_the_op_that_reads_it() -> None:
    model = nn.Sequential(nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 5, groups=4, bias=False), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval().double()
    n, inputs = read_lengths(model, (torch.randn(2, 6, 12, 12, dtype=torch.float64),),
                             graph=False)
    want = {model[0].weight: 6 * 9 + 1, model[0].bias: 6 * 9 + 1,
            model[3].weight: 2 * 25 + 1,  # groups: Cin / groups per output
            model[6].weight: 8 + 1, model[6].bias: 8 + 1}
    for t in [model[1].weight, model[1].bias, model[1].running_mean, model[1].running_var]:
        want[t] = 1  # BatchNorm: a few roundings per element
    assert {id(t): v for t, v in want.items()} == {k: v for k, v in n.items() if k in
                                                   {id(t) for t in want}}
    assert inputs == [6 * 9 + 1]  # the input is read by the first conv


def test_the_twin_reads_a_module_model_and_an_exported_one_alike() -> None:
    """Exported programs (get_attr weights, functional graph) are recorded like modules."""
    a = deep_bn_cnn(2, depth=2, width=4)
    x = torch.randn(1, 3, 8, 8)
    ep = torch.export.export(a, (x,))
    m = load(ep, "A")
    m.run((x,), "reference")
    n, _ = read_lengths(m._twins["reference"], (x.double(),), graph=True)
    assert sorted(n.values()) == sorted(read_lengths(copy.deepcopy(a).double(), (x.double(),),
                                                     graph=False)[0].values())
