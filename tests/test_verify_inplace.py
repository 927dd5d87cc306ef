"""Issue 9: a layer's recorded output is the value its forward returned, not what later
in-place ops made of it.

A ResNet block ends ``out = bn2(conv2(x)); out += residual; relu_(out)`` (torchvision, MONAI):
a forward hook's ``output`` is the live tensor, which the in-place add and ReLU then rewrite.
The eager model's ``bn2`` row read ``relu(bn2 + residual)`` while the converted GraphModule's
(functional) read ``bn2``, so every planted bug in the head was localized at ``bn2`` with a
"shared kernel" diagnosis (the MONAI ResNet 3-D sweep: 60 of 60 torch-path draws). Checked
against the block's own values recomputed here from the module's parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import fc2conv
from fc2conv.verify.capture import run_torch


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Net(nn.Module):
    def __init__(self, c: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.block(self.stem(x)))))


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net()
    for bn in (net.block.bn1, net.block.bn2):  # non-trivial statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_recorded_bn2_is_bn2s_output_not_the_in_place_sum() -> None:
    net = _net(0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    run = run_torch(net, (x,), capture=True, graph=False)
    row = next(layer for layer in run.layers if layer.name == "block.bn2")
    with torch.no_grad():
        n64 = copy.deepcopy(net).double()
        s = n64.stem(x.double())
        b = n64.block
        want = b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(s)))))
    err = (row.output.double() - want).abs().max().item()
    assert err <= 64 * torch.finfo(torch.float32).eps * want.abs().max().item()


def test_a_head_bug_behind_an_in_place_residual_is_named_at_the_head() -> None:
    net = _net(2)
    conv = fc2conv.to_conv(net, (torch.randn(2, 3, 8, 8),))
    with torch.no_grad():
        weight = dict(conv.named_parameters())["fc.weight"]
        weight[[0, 1]] = weight[[1, 0]].clone()  # two rows swapped in B's head
    report = fc2conv.compare(net, conv, input_shape=(2, 3, 8, 8), samples=3, seed=3)
    assert report.verdict == "different"
    assert report.first_divergence == "fc"
    assert "applies one kernel shared" not in (report.diagnosis or "")  # the wrong cause before
