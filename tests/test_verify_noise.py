"""A small real difference that hides under the worst-case bound (weights that cancel) is still
"different": it is far beyond the rounding noise measured on model A."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fc2conv
from fc2conv.verify.models import load
from fc2conv.verify.noise import NOISE_FACTOR, rounding_noise


class ConvTwin(nn.Module):
    """The same MLP as 1x1 Conv1d layers on a (B, D, S) view; same (B, S, D) contract."""

    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.body = nn.Sequential(*[
            fc2conv.linear_to_conv(m, dims=1) if isinstance(m, nn.Linear) else copy.deepcopy(m)
            for m in mlp
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.transpose(1, 2)).transpose(1, 2)


def random_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(),
                         nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 4)).eval()


def test_measured_noise_is_the_size_of_real_rounding_errors():
    """Real float32 errors against float64 sit below the measured noise and not absurdly far
    under it: the noise is the scale rounding works at, not a loose bound."""
    mlp = random_mlp()
    x = torch.rand(16, 5, 256)
    model = load(mlp, "A")
    ((noise,),) = rounding_noise(model, [(x,)], 2**-24)
    with torch.no_grad():
        exact = copy.deepcopy(mlp).double()(x.double())
        real = float((mlp(x).double() - exact).abs().max())
    assert real <= noise <= 1e3 * real


@pytest.mark.parametrize("trial", range(3))
def test_rounding_only_twin_is_equivalent(trial):
    mlp = random_mlp()
    report = fc2conv.compare(mlp, ConvTwin(mlp), inputs=(torch.rand(16, 5, 256),), layers=False)
    assert report.verdict in ("identical", "equivalent"), str(report)


def test_one_weight_bug_in_the_last_layer_is_different_though_within_worst_case_bound():
    mlp = random_mlp()
    x = torch.rand(16, 5, 256)
    twin = ConvTwin(mlp)
    with torch.no_grad():
        alive = mlp[:-1](x).reshape(-1, 256).mean(0).argmax()
        twin.body[-1].weight[1, alive] += 1e-3
    report = fc2conv.compare(mlp, twin, inputs=(x,), layers=False)
    assert report.verdict == "different", str(report)
    out = report.outputs[0]
    assert out.mismatched == 0  # the worst-case bound alone would have let it through
    assert any(f"above the limit of {NOISE_FACTOR:g}x" in n for n in report.notes)


def test_transformer_block_rounding_only_is_equivalent_and_a_small_bug_is_not():
    """Attention scores, layer norms and softmax have no weights to perturb: their rounding is
    modelled op by op, so a converted encoder block is not called different for it."""
    import archs

    block = archs.EncoderBlock().eval()
    x = torch.randn(2, 7, 16)
    converted = fc2conv.to_conv(block, (x,))
    for _ in range(3):
        report = fc2conv.compare(block, converted, input_shape=(2, 7, 16), layers=False)
        assert report.verdict in ("identical", "equivalent"), str(report)
    convs = [m for m in converted.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        convs[-1].weight[2, 5] += 1e-3
    report = fc2conv.compare(block, converted, input_shape=(2, 7, 16), layers=False)
    assert report.verdict == "different", str(report)


def test_seeded_draws_are_reproducible():
    mlp = random_mlp()
    twin = ConvTwin(mlp)
    first = fc2conv.compare(mlp, twin, input_shape=(2, 3, 256), layers=False, seed=7)
    again = fc2conv.compare(mlp, twin, input_shape=(2, 3, 256), layers=False, seed=7)
    assert "seed 7" in first.inputs
    assert first.max_abs_error == again.max_abs_error


def _onnx_pair(tmp_path):
    import onnx

    import fc2conv.onnx

    head = nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 14 * 14, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10)).eval()
    src = tmp_path / "model.onnx"
    torch.onnx.export(head, (torch.randn(1, 3, 32, 32),), str(src), dynamo=False)
    converted = fc2conv.onnx.to_conv(onnx.load(str(src)))
    return head, onnx.load(str(src)), converted


def _plant(model, head, scale_row: bool):
    """A bug in the last layer (84 -> 10, now a 1x1 conv): one logit's row scaled by 1.01, or one
    weight +0.01 on an input feature that ReLU leaves alive (a dead one would change nothing)."""
    import onnx
    from onnx import numpy_helper

    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    name = [n.input[1] for n in bad.graph.node if n.op_type == "Conv"][-1]
    with torch.no_grad():
        alive = int(head[:-1](torch.randn(64, 3, 32, 32)).mean(0).argmax())
    for init in bad.graph.initializer:
        if init.name == name:
            w = numpy_helper.to_array(init).copy()
            if scale_row:
                w[3] *= 1.01
            else:
                w[3, alive] += 0.01
            init.CopyFrom(numpy_helper.from_array(w, name))
    return bad


@pytest.mark.parametrize("scale_row", [False, True], ids=["one-weight+0.01", "row*1.01"])
def test_onnx_planted_bugs_are_different_and_the_clean_conversion_is_not(tmp_path, scale_row):
    head, original, converted = _onnx_pair(tmp_path)
    clean = fc2conv.compare(original, converted, layers=False)
    assert clean.verdict in ("identical", "equivalent"), str(clean)
    assert fc2conv.compare(head, converted, layers=False).verdict in ("identical", "equivalent")
    report = fc2conv.compare(original, _plant(converted, head, scale_row), layers=False)
    assert report.verdict == "different", str(report)
