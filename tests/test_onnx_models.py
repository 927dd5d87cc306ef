"""Whole models: a PyTorch model exported to ONNX, and models stored with external data."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from _onnx_helpers import assert_matches_reference, init, model, op_counts, run_ort, vinfo
from onnx import helper
from torch import nn

import fc2conv.onnx as fo


class Block(nn.Module):
    """A pre-norm transformer MLP block with a classifier head (random weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(nn.functional.gelu(self.up(self.ln(x))))
        return self.head(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    net = Block().eval()
    path = str(tmp_path_factory.mktemp("export") / "block.onnx")
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    # The dynamo exporter (torch >= 2.5 default) handles this model; no dynamo=False needed.
    torch.onnx.export(
        net, (torch.randn(2, 5, 16),), path, dynamic_shapes=dims, input_names=["x"], dynamo=True
    )
    return net, path


def test_pytorch_export_to_conv_and_back_matches_torch_float64(exported, tmp_path) -> None:
    net, path = exported
    original = onnx.load(path)
    assert op_counts(original)["MatMul"] == 3
    conv_path, lin_path = tmp_path / "conv.onnx", tmp_path / "lin.onnx"
    report = fo.convert_file(path, conv_path, "conv")
    assert len(report.converted) == 3 and not report.left
    converted = onnx.load(conv_path)
    assert op_counts(converted)["Conv"] == 3 and "MatMul" not in op_counts(converted)
    # up -> gelu -> down share one layout change: 4 Transposes, not 6
    assert op_counts(converted)["Transpose"] == 4
    fo.convert_file(conv_path, lin_path, "linear")
    back = onnx.load(lin_path)
    assert op_counts(back)["MatMul"] == 3 and "Transpose" not in op_counts(back)
    net64 = Block().double()
    net64.load_state_dict(net.state_dict())
    x = np.random.default_rng().standard_normal((3, 7, 16)).astype(np.float32)
    with torch.no_grad():
        ref = net64(torch.from_numpy(x).double()).numpy()
    tol = 8 * float(np.finfo(np.float32).eps) * (16 + 48 + 16) * max(1.0, float(np.abs(ref).max()))
    for m in (original, converted, back):
        (got,) = run_ort(m, {"x": x})
        assert float(np.abs(got - ref).max()) <= tol


def _external_model(tmp_path, name: str = "ext.onnx") -> tuple[onnx.ModelProto, str]:
    rng = np.random.default_rng()
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["m0"], name="fc0"),
        helper.make_node("Add", ["m0", "b0"], ["a0"], name="fc0_bias"),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "W1"], ["y"], name="fc1"),
    ]
    m = model(
        nodes,
        [vinfo("x", ["B", "T", 64])],
        [vinfo("y", ["B", "T", 32])],
        [init(rng, "W0", 64, 128), init(rng, "b0", 128), init(rng, "W1", 128, 32)],
    )
    path = str(tmp_path / name)
    in_memory = onnx.ModelProto()
    in_memory.CopyFrom(m)  # onnx.save turns its argument's tensors into external references
    onnx.save(m, path, save_as_external_data=True, location=f"{name}.weights", size_threshold=0)
    return in_memory, path


def test_external_data_model_converts_with_external_data(tmp_path) -> None:
    m, path = _external_model(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    out = fo.to_conv(path, tmp_path / "out.onnx")
    assert out == tmp_path / "out.onnx"
    assert sorted(os.listdir(tmp_path)) == [
        "ext.onnx",
        "ext.onnx.weights",
        "out.onnx",
        "out.onnx.data",
    ]  # no temporary files left
    assert {p: (tmp_path / p).read_bytes() for p in before} == before  # input untouched
    proto = onnx.load(str(out), load_external_data=False)
    weights = {t.name: t.data_location for t in proto.graph.initializer if t.name[0] == "W"}
    assert weights == {"W0_conv": onnx.TensorProto.EXTERNAL, "W1_conv": onnx.TensorProto.EXTERNAL}
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng().standard_normal((2, 9, 64)).astype(np.float32)
    assert_matches_reference(m, str(out), {"x": x}, depth=200)
    assert op_counts(onnx.load(str(out)))["Conv"] == 2


def test_external_data_in_place(tmp_path) -> None:
    m, path = _external_model(tmp_path, "model.onnx")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        fo.to_conv(path, path)
    fo.to_conv(path, path, inplace=True)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data", "model.onnx.weights"]
    onnx.checker.check_model(path, full_check=True)
    x = np.random.default_rng().standard_normal((1, 3, 64)).astype(np.float32)
    assert_matches_reference(m, path, {"x": x}, depth=200)


def test_path_input_needs_an_output_path(tmp_path) -> None:
    _, path = _external_model(tmp_path)
    with pytest.raises(ValueError, match="needs an output path"):
        fo.to_conv(path)


def test_in_place_when_the_input_data_file_has_the_output_data_name(tmp_path) -> None:
    """The new weights are written while the old ones are still being read from that file."""
    m, path = _external_model(tmp_path, "same.onnx")
    os.rename(tmp_path / "same.onnx.weights", tmp_path / "same.onnx.data")
    proto = onnx.load(path, load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "same.onnx.data"
    onnx.save(proto, path)
    fo.to_conv(path, path, inplace=True)
    assert sorted(os.listdir(tmp_path)) == ["same.onnx", "same.onnx.data"]
    onnx.checker.check_model(path, full_check=True)
    x = np.random.default_rng().standard_normal((2, 3, 64)).astype(np.float32)
    assert_matches_reference(m, path, {"x": x}, depth=200)


def test_missing_or_truncated_external_data_is_one_sentence(tmp_path) -> None:
    _, path = _external_model(tmp_path)
    data = tmp_path / "ext.onnx.weights"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"external data .*ext.onnx.weights is truncated"):
        fo.to_conv(path, tmp_path / "out.onnx")
    data.unlink()
    with pytest.raises(ValueError, match="does not exist"):
        fo.to_conv(path, tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx"]
