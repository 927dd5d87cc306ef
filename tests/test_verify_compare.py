"""compare() must not cry wolf: rounding-only differences are "equivalent" in every dtype, the
classic experiment included, and the same model through torch and ONNX agrees.

Every model and input is drawn fresh; each test also checks that the difference it accepts is
real (not bitwise zero) where rounding must make one, or that a planted bug in the same setting
is caught, so that "equivalent" is not simply the only answer.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fc2conv
from fc2conv.verify import compare


class MLP(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims, dims[1:], strict=False)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvMLP(nn.Module):
    """The same MLP as 1x1 Conv1d layers on a (B, C, S) input: permute in, permute out."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims, dims[1:], strict=False)):
            layers.append(nn.Conv1d(n_in, n_out, 1))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x.permute(0, 2, 1)).permute(0, 2, 1)


def conv_twin(mlp: MLP, dims: list[int]) -> ConvMLP:
    conv = ConvMLP(dims).to(next(mlp.parameters()).dtype)
    with torch.no_grad():
        for lin, cv in zip(mlp.layers, conv.convs, strict=True):
            if isinstance(lin, nn.Linear):
                cv.weight.copy_(lin.weight.unsqueeze(-1))
                cv.bias.copy_(lin.bias)
    return conv


CLASSIC = [256, 64, 128, 256, 4]


def test_classic_experiment_is_equivalent() -> None:
    """All weights and biases 1, input torch.rand (16, 5, 256): outputs ~1e8, |A-B| ~1e2."""
    mlp = MLP(CLASSIC)
    with torch.no_grad():
        for p in mlp.parameters():
            p.fill_(1.0)
    conv = conv_twin(mlp, CLASSIC)
    x = torch.rand(16, 5, 256)
    report = compare(mlp, conv, (x,))
    assert report.verdict in ("equivalent", "identical")
    assert mlp(x).abs().min() > 1e7  # the regime of the experiment
    assert report.max_abs_error < report.bound
    # the same experiment with a planted bug is caught once it moves B further from the float64
    # result than 10x A's own error (here ~85x: one weight 1 -> 2.28 in a 64->128 layer; a
    # change to 1.128 moves B only ~8x A's error at these 1e8-sized outputs, inside the rule)
    with torch.no_grad():
        conv.convs[2].weight[5, 7] += 1e-2 * 128
    bad = compare(mlp, conv, (x,))
    assert bad.verdict == "different"
    assert bad.first_divergence is not None and bad.first_divergence.startswith("layers.2")
    # layers matched by order across different structures, layouts aligned by permutation
    assert [row.b_name for row in report.layers][:2] == ["convs.0", "convs.1"]
    assert "permuted (0, 2, 1)" in report.layers[0].layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_vs_conv_rounding_is_equivalent_in_every_dtype(dtype: torch.dtype) -> None:
    dims = [48, 96, 64, 8]
    mlp = MLP(dims).to(dtype)
    conv = conv_twin(mlp, dims)
    report = compare(mlp, conv, input_shape=(4, 6, 48), samples=4)
    assert report.verdict in ("equivalent", "identical"), str(report)
    # one output channel with its weights negated is beyond rounding even in bfloat16 (the
    # worst-case bound there allows ~10% relative error after two layers of 48-96 terms)
    with torch.no_grad():
        conv.convs[2].weight[3].neg_()
    assert compare(mlp, conv, input_shape=(4, 6, 48), samples=4).verdict == "different"


class SplitSum(nn.Module):
    """``x @ W.T + b`` with the reduction split in two halves summed separately: another
    summation order, the same function."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, k = self.lin.weight, self.lin.in_features // 3
        return (x[..., :k] @ w[:, :k].T + x[..., k:] @ w[:, k:].T) + self.lin.bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_other_summation_order_is_equivalent(dtype: torch.dtype) -> None:
    lin = nn.Linear(300, 40).to(dtype)
    a = nn.Sequential(lin, nn.Tanh())
    b = nn.Sequential(SplitSum(copy.deepcopy(lin)), nn.Tanh())
    report = compare(a, b, input_shape=(32, 300), samples=4)
    assert report.verdict == "equivalent", str(report)  # split sums round differently
    assert report.max_abs_error > 0


def test_float32_vs_its_half_precision_copies_is_equivalent() -> None:
    a = MLP([32, 64, 16]).eval()
    for dtype in (torch.float16, torch.bfloat16):
        b = copy.deepcopy(a).to(dtype)
        report = compare(a, b, input_shape=(8, 32), samples=4)
        assert report.verdict == "equivalent", str(report)
        assert report.outputs[0].dtype == "float32"


def test_torch_vs_onnx_of_the_same_model(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "m.onnx"
    # the legacy TorchScript exporter: the dynamo exporter works too but is ~10x slower here
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"])
    report = compare(model, str(path), input_shape=(2, 3, 8, 8), samples=3)
    assert report.verdict in ("equivalent", "identical"), str(report)
    # layers found in the ONNX graph by the exporter's names
    assert {row.a_name for row in report.layers} >= {"0", "3"}
    # an ONNX proto with a changed weight is caught
    proto = onnx.load(str(path))
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2:  # the Linear's weight: one output row shifted by 1e-2
            arr = arr.copy()
            arr[0, :] += 1e-2
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = compare(model, proto, input_shape=(2, 3, 8, 8), samples=3)
    assert bad.verdict == "different"
    assert bad.first_divergence == "3"


def test_exported_program_inputs_come_from_its_signature(tmp_path) -> None:
    model = MLP([12, 20, 5])
    ep = torch.export.export(model, (torch.randn(3, 12),))
    path = tmp_path / "m.pt2"
    torch.export.save(ep, str(path))
    report = compare(str(path), model)  # no input_shape: read from the .pt2 signature
    assert report.verdict == "identical"
    assert "(3, 12)" in report.inputs


def test_pickle_is_refused_without_opt_in(tmp_path) -> None:
    model = MLP([4, 3])
    path = tmp_path / "m.pt"
    torch.save(model, str(path))
    with pytest.raises(fc2conv.errors.UnsafeFileError, match="trust_pickle=True"):
        compare(str(path), model, input_shape=(2, 4))
    report = compare(str(path), model, input_shape=(2, 4), trust_pickle=True)
    assert report.verdict == "identical"


def test_bad_inputs_raise_one_sentence(tmp_path) -> None:
    with pytest.raises(fc2conv.Fc2ConvError, match="missing.onnx: no such file"):
        compare(str(tmp_path / "missing.onnx"), MLP([4, 3]))
    with pytest.raises(fc2conv.Fc2ConvError, match="input_shape must be"):
        compare(MLP([4, 3]), MLP([4, 3]), input_shape="2,three")
    # a string shape is read as the numbers it names, not its characters
    same = MLP([4, 3])
    assert compare(same, same, input_shape="2,4").verdict == "identical"
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(fc2conv.Fc2ConvError, match="is not a torch.export program"):
        compare(str(junk), MLP([4, 3]))
    with pytest.raises(fc2conv.Fc2ConvError, match="input_shape"):
        compare(MLP([4, 3]), MLP([4, 3]))  # nothing says what input an nn.Module takes
    with pytest.raises(fc2conv.Fc2ConvError, match="cannot compare a object"):
        compare(object(), MLP([4, 3]))


def test_report_text_and_json() -> None:
    a = MLP([16, 8, 4])
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.layers[2].bias[1] += 1.0
    report = compare(a, b, input_shape=(5, 16), samples=3)
    text = str(report)
    assert text.startswith("DIFFERENT")
    assert "Mismatched elements:" in text and "Greatest absolute difference" in text
    assert "at index (" in text and "allowed" in text and "First divergence: layers.2" in text
    doc = json.loads(report.to_json())
    assert doc["verdict"] == "different"
    assert doc["first_divergence"] == "layers.2"
    assert doc["outputs"][0]["mismatched"] > 0
    assert "bias" in doc["diagnosis"]
    assert not report  # a "different" report is falsy


def test_import_fc2conv_stays_onnx_free() -> None:
    import subprocess
    import sys

    code = ("import sys, fc2conv; fc2conv.compare; import fc2conv.cli.compare; "
            "print('onnx' in sys.modules, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


def test_ops_without_a_running_rule_fall_back_and_still_judge() -> None:
    """LayerNorm and softmax have no running-bound rule: the magnitude/empirical bound is used,
    and it still tells another summation order (equivalent) from a doubled bias (different)."""
    lin = nn.Linear(64, 32)
    a = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), lin, nn.Softmax(-1))
    b = nn.Sequential(copy.deepcopy(a[0]), copy.deepcopy(a[1]), SplitSum(copy.deepcopy(lin)),
                      nn.Softmax(-1))
    report = compare(a, b, input_shape=(8, 16), samples=4)
    assert report.verdict == "equivalent", str(report)
    assert any("no rule for" in note for note in report.notes)
    with torch.no_grad():
        b[2].lin.bias.mul_(2.0)
    bad = compare(a, b, input_shape=(8, 16), samples=4)
    assert bad.verdict == "different"
    assert bad.first_divergence == "2"  # the SplitSum block, matched by name
    assert "'2'" in (bad.diagnosis or "")


def test_onnx_model_as_reference(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 6))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(3, 20),), str(path), dynamo=False)
    conv = nn.Sequential(nn.Unflatten(1, (20, 1)), nn.Conv1d(20, 30, 1), nn.Tanh(),
                         nn.Conv1d(30, 6, 1), nn.Flatten())
    with torch.no_grad():
        for lin, cv in ((model[0], conv[1]), (model[2], conv[3])):
            cv.weight.copy_(lin.weight.unsqueeze(-1))
            cv.bias.copy_(lin.bias)
    report = compare(str(path), conv, samples=3)  # inputs from the ONNX value info (3, 20)
    assert report.verdict in ("equivalent", "identical"), str(report)
    assert "magnitude" in report.bound_method  # ONNX runs are bounded by the magnitude twin
    with torch.no_grad():
        conv[3].bias[2] += 0.05
    assert compare(str(path), conv, samples=3).verdict == "different"
