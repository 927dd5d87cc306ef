"""Issue 10, fast tier: every conversion checks itself; keyword inputs; ModelOutput; CLI.

The self-check tests break a conversion on purpose (a weight scaled by 1.01 inside the core
function the pass calls) and expect a sentence naming the layer; ``verify=False`` skips it.
"""

from __future__ import annotations

import dataclasses
import sys

import archs
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_refs import assert_matches_reference, reference

import fc2conv.pytorch  # noqa: F401  (loads the submodules patched below)
from fc2conv import convolutionalize, sliding_window, to_conv, to_linear
from fc2conv.cli.main import main
from fc2conv.core.layers import conv_to_linear, linear_to_conv
from fc2conv.errors import Fc2ConvError

TO_CONV = sys.modules["fc2conv.pytorch.to_conv"]
TO_LINEAR = sys.modules["fc2conv.pytorch.to_linear"]
CONVOLUTIONALIZE = sys.modules["fc2conv.pytorch.convolutionalize"]


def _bent(fn):
    def wrong(*args, **kwargs):
        layer = fn(*args, **kwargs)
        with torch.no_grad():
            layer.weight[0].mul_(1.01)
        return layer
    return wrong


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_to_conv_self_check_names_the_wrong_layer(monkeypatch):
    monkeypatch.setattr(TO_CONV, "linear_to_conv", _bent(linear_to_conv))
    x = torch.randn(3, 5, 8)
    with pytest.raises(Fc2ConvError, match=r"to_conv result computes another function.*'0'"):
        to_conv(_mlp(), x)
    conv = to_conv(_mlp(), x, verify=False)  # skipped: the wrong model comes back
    assert not torch.allclose(conv(x), _mlp()(x), atol=1e-4)


def test_to_linear_self_check(monkeypatch):
    model = _mlp()
    x = torch.randn(3, 5, 8)
    conv = to_conv(model, x)
    monkeypatch.setattr(TO_LINEAR, "conv_to_linear", _bent(conv_to_linear))
    with pytest.raises(Fc2ConvError, match="to_linear result computes another function"):
        to_linear(conv, x)


def test_convolutionalize_self_check(monkeypatch):
    model = archs.classifiers()["resnet"]
    monkeypatch.setattr(CONVOLUTIONALIZE, "linear_to_conv", _bent(linear_to_conv))
    with pytest.raises(Fc2ConvError, match=r"convolutionalized model computes another function"):
        convolutionalize(model, model.INPUT_SHAPE)


def test_self_check_catches_a_trace_that_branches_differently():
    """torch.jit.isinstance is False on an fx Proxy: the traced graph takes the other branch
    (MONAI's UpCat); the result must be refused, not returned."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            if torch.jit.isinstance(x, torch.Tensor):
                return y
            return -y

    with pytest.raises(Fc2ConvError, match="computes another function"):
        to_conv(Branchy().eval(), torch.randn(2, 6))


def test_dict_example_inputs_and_keyword_calls():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
            y = self.fc(x)
            return y if scale is None else y * scale

    torch.manual_seed(1)
    model = TwoInputs().eval()
    x, s = torch.randn(2, 7, 8), torch.rand(2, 7, 5)
    conv = to_conv(model, {"x": x, "scale": s})
    x2, s2 = torch.randn(4, 3, 8), torch.rand(4, 3, 5)
    got = conv(x=x2, scale=s2)
    want = reference(model, x2, s2)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    # an optional argument the example leaves out keeps its default
    conv = to_conv(model, {"x": x})
    assert torch.allclose(conv(x=x2).double(), reference(model, x2), atol=1e-5, rtol=1e-5)


@dataclasses.dataclass
class _Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class _Wrapped(nn.Module):
    """A classifier returning a ModelOutput-like dataclass (loss None, logits)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> _Output:
        return _Output(None, self.inner(x))


def test_sliding_window_reads_the_logits_of_a_model_output():
    torch.manual_seed(2)
    inner = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    image = torch.randn(1, 3, 12, 12)
    got = sliding_window(_Wrapped(inner.eval()), image, 8, 2)
    want = sliding_window(inner.eval(), image, 8, 2)
    assert got.shape == (1, 3, 3, 3)
    assert torch.equal(got, want)
    # one crop checked against the float64 reference of the plain classifier
    crop = image[..., 2:10, 4:12]
    assert torch.allclose(got[0, :, 1, 2].double(), reference(inner, crop)[0], atol=1e-5)


def test_cli_global_pool_drop_checks_without_no_check(tmp_path, capsys):
    model = archs.classifiers()["resnet"]
    src, dst = tmp_path / "r.pt2", tmp_path / "r_map.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),)), str(src))
    main(["convolutionalize", str(src), str(dst), "--input-shape", "3,32,32",
          "--global-pool", "drop"])
    out = capsys.readouterr().out
    assert "check at 3x32x32" in out and "cannot compare" not in out
    dense = torch.export.load(str(dst)).module()
    x = torch.randn(2, 3, 32, 32)
    assert_matches_reference(dense(x).mean((2, 3)), model, x)


def test_convolutionalize_in_place_functional_dropout_and_3d():
    """A GAP head with in-place dropout (HF MobileNet) and a 3-D map (MONAI) convert."""

    class Net3d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv3d(1, 6, 3)
            self.pool = nn.AdaptiveAvgPool3d(1)
            self.drop = nn.Dropout(0.2, inplace=True)
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.flatten(self.pool(F.relu(self.features(x))), 1)
            return self.fc(F.dropout(self.drop(x), 0.1, self.training, inplace=True))

    torch.manual_seed(3)
    model = Net3d().eval()
    dense = convolutionalize(model, (1, 8, 8, 8))
    x = torch.randn(2, 1, 8, 8, 8)
    assert_matches_reference(dense(x), model, x)
    assert dense(torch.randn(1, 1, 12, 12, 12)).dim() == 5
