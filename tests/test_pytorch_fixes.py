"""Regression tests for the PyTorch front end: shared layers, file formats, input checks."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch_refs import assert_matches_reference

from fc2conv import to_conv, to_linear
from fc2conv.cli.torch_commands import convert_pt2


class SharedLinear(nn.Module):
    """One Linear called twice: both calls must get the conv layout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


class SharedConv(nn.Module):
    """One 1x1 conv called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.c(x)))


def _calls(gm: fx.GraphModule, kind: type) -> int:
    return sum(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), kind)
               for n in gm.graph.nodes)


def test_to_conv_converts_every_call_of_a_shared_linear():
    torch.manual_seed(0)
    model = SharedLinear().eval()
    x = torch.randn(3, 8)
    for source in (model, torch.export.export(model, (x,))):
        conv = to_conv(source, (x,))
        assert _calls(conv, nn.Conv2d) == 2 and _calls(conv, nn.Linear) == 0
        for shape in [(3, 8), (5, 8)]:
            t = torch.randn(*shape)
            assert_matches_reference(conv(t), model, t)


def test_to_linear_converts_every_call_of_a_shared_conv():
    torch.manual_seed(0)
    model = SharedConv().eval()
    x = torch.randn(2, 8, 3, 3)
    for source in (model, torch.export.export(model, (x,))):
        lin = to_linear(source, (x,))
        assert _calls(lin, nn.Linear) == 2 and _calls(lin, nn.Conv2d) == 0
        t = torch.randn(4, 8, 5, 2)
        assert_matches_reference(lin(t), model, t)


def test_convert_pt2_shared_linear(tmp_path, capsys):
    torch.manual_seed(0)
    model = SharedLinear().eval()
    x = torch.randn(3, 8)
    src, dst = tmp_path / "shared.pt2", tmp_path / "shared_conv.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(src))
    assert convert_pt2(str(src), str(dst), to="conv", check=True, only=(), in_place=False) == 0
    conv = torch.export.load(str(dst)).module()
    assert not any(n.target == torch.ops.aten.linear.default for n in conv.graph.nodes)
    assert sum(n.target == torch.ops.aten.conv2d.default for n in conv.graph.nodes) == 2
    t = torch.randn(3, 8)
    assert_matches_reference(conv(t), model, t)
