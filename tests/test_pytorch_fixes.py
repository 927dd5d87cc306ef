"""Regression tests for the PyTorch front end: shared layers, file formats, input checks."""

from __future__ import annotations

import pytest
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


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    from fc2conv.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def _mlp_pt2(path) -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 6),)), str(path))


def _onnx_file(path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(torch.randn(3, 4).numpy(), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    onnx.save(helper.make_model(graph), str(path))


def test_convert_output_suffix_must_match_the_input(tmp_path, capsys, monkeypatch):
    import fc2conv.cli.torch_commands as tc

    pt2, onnx_in = tmp_path / "m.pt2", tmp_path / "m.onnx"
    _mlp_pt2(pt2)
    _onnx_file(onnx_in)
    monkeypatch.setattr(tc, "convert_pt2", lambda *a, **k: pytest.fail("converted anyway"))
    cases = [(onnx_in, "out.pt2", ".onnx"), (pt2, "out.onnx", ".pt2"), (pt2, "out.txt", ".pt2"),
             (pt2, "out", ".pt2")]
    for src, out, want in cases:
        code, _, err = _run(["convert", str(src), str(tmp_path / out), "--to", "conv"], capsys)
        assert code == 2 and err.startswith("fc2conv: error:") and err.count("\n") == 1, err
        assert f"must be a {want} file" in err
        assert not (tmp_path / out).exists()


def test_bad_pt2_input_is_one_sentence(tmp_path, capsys):
    onnx_as_pt2, garbage = tmp_path / "model.pt2", tmp_path / "garbage.pt2"
    _onnx_file(onnx_as_pt2)
    garbage.write_bytes(b"PK\x03\x04 truncated zip")
    for src, message in [(onnx_as_pt2, "is ONNX, not a torch.export program"),
                         (garbage, "is not a torch.export program")]:
        for argv in (["convert", str(src), str(tmp_path / "o.pt2"), "--to", "conv"],
                     ["convolutionalize", str(src), str(tmp_path / "o.pt2"),
                      "--input-shape", "3,8,8"]):
            code, _, err = _run(argv, capsys)
            assert code == 2 and message in err, err
            assert err.count("\n") == 1 and "Traceback" not in err, err


def test_convolutionalize_checks_file_types_before_loading(tmp_path, capsys, monkeypatch):
    from fc2conv.pytorch import export_io

    monkeypatch.setattr(export_io, "load", lambda *a: pytest.fail("loaded a refused file"))
    pt2 = tmp_path / "m.pt2"
    _mlp_pt2(pt2)
    for name in ("m.onnx", "m.pt", "m.pth"):
        (tmp_path / name).write_bytes(b"x")
    cases = [("m.onnx", "o.pt2", "--to conv --dynamic-spatial"), ("m.pt", "o.pt2", "pickle"),
             ("m.pth", "o.pt2", "torch.export.save"), ("m.pt2", "o.onnx", "must be a .pt2")]
    for src, out, message in cases:
        code, _, err = _run(["convolutionalize", str(tmp_path / src), str(tmp_path / out),
                             "--input-shape", "3,32,32"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("shape", ["3,32", "32,32", "3,32,32,1", "3,0,32", "3,a,32", ""])
def test_input_shape_needs_three_positive_ints(tmp_path, capsys, shape):
    pt2 = tmp_path / "m.pt2"
    _mlp_pt2(pt2)
    code, _, err = _run(["convolutionalize", str(pt2), str(tmp_path / "o.pt2"),
                         "--input-shape", shape], capsys)
    assert code == 2 and "Invalid value for '--input-shape'" in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["convert", "convolutionalize"])
def test_output_path_is_checked_before_converting(tmp_path, capsys, monkeypatch, command):
    import fc2conv.files
    from fc2conv.errors import Fc2ConvError
    from fc2conv.pytorch import export_io

    def refuse(in_path, out_path, *, in_place=False):
        raise Fc2ConvError(f"{out_path} refused")

    monkeypatch.setattr(fc2conv.files, "check_output_path", refuse)
    monkeypatch.setattr(export_io, "load", lambda *a: pytest.fail("loaded before the check"))
    pt2 = tmp_path / "m.pt2"
    _mlp_pt2(pt2)
    (tmp_path / "adir.pt2").mkdir()
    extra = ["--to", "conv"] if command == "convert" else ["--input-shape", "3,8,8"]
    code, _, err = _run([command, str(pt2), str(tmp_path / "adir.pt2"), *extra], capsys)
    assert code == 2 and "adir.pt2 refused" in err


def test_onnx_output_path_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    import fc2conv.files
    from fc2conv.errors import Fc2ConvError
    from fc2conv.onnx import io

    def refuse(in_path, out_path, *, in_place=False):
        raise Fc2ConvError(f"{out_path} refused")

    monkeypatch.setattr(fc2conv.files, "check_output_path", refuse)
    monkeypatch.setattr(io, "load", lambda *a, **k: pytest.fail("loaded before the check"))
    src = tmp_path / "m.onnx"
    _onnx_file(src)
    (tmp_path / "adir.onnx").mkdir()
    code, _, err = _run(["convert", str(src), str(tmp_path / "adir.onnx"), "--to", "conv"],
                        capsys)
    assert code == 2 and "adir.onnx refused" in err


def test_no_receptive_field_line_for_sequence_models(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    src, dst = tmp_path / "seq.pt2", tmp_path / "seq_conv.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 5, 8),)), str(src))
    assert convert_pt2(str(src), str(dst), to="conv", check=False, only=(), in_place=False) == 0
    out = capsys.readouterr().out
    assert "receptive field" not in out and "wrote" in out


def test_api_refuses_what_is_not_a_model_in_a_sentence():
    import fc2conv
    from fc2conv.errors import Fc2ConvError

    calls = [lambda: fc2conv.convolutionalize(None, (3, 32, 32)),
             lambda: fc2conv.receptive_field(None, (3, 32, 32)),
             lambda: fc2conv.to_conv(None, torch.randn(2, 3)),
             lambda: fc2conv.to_linear("model.pt2", torch.randn(2, 3))]
    for call in calls:
        with pytest.raises(Fc2ConvError, match="expected a torch.nn.Module"):
            call()


@pytest.mark.parametrize("convert", [to_conv, to_linear])
def test_example_inputs_must_be_tensors_not_a_shape(convert):
    from fc2conv.errors import Fc2ConvError

    with pytest.raises(Fc2ConvError, match=r"not a shape.*pass \(torch.randn\(2, 3\),\)"):
        convert(nn.Linear(3, 4), (2, 3))
    with pytest.raises(Fc2ConvError, match="example_inputs must be a tensor"):
        convert(nn.Linear(3, 4), None)


def test_a_single_tensor_is_accepted_as_example_input():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).eval()
    conv = to_conv(model, torch.randn(2, 3))
    x = torch.randn(5, 3)
    assert_matches_reference(conv(x), model, x)


def test_converted_layers_take_the_users_names_and_drop_the_old_weights():
    torch.manual_seed(0)
    root = nn.Linear(3, 4).eval()
    conv = to_conv(root, torch.randn(2, 3))
    assert [n for n, _ in conv.named_children()] == ["conv"]
    assert sorted(conv.state_dict()) == ["conv.bias", "conv.weight"]
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    conv = to_conv(layer, x)
    names = dict(conv.named_modules())
    assert isinstance(names["self_attn.in_proj"], nn.Conv2d)
    assert not any(k.endswith("_1") or "in_proj_weight" in k for k in conv.state_dict())
    t = torch.randn(2, 5, 16)  # the export fallback fixes the sizes
    assert_matches_reference(conv(t), layer, t)
    back = to_linear(conv, x)
    assert isinstance(dict(back.named_modules())["self_attn.in_proj"], nn.Linear)
    assert_matches_reference(back(t), layer, t)


class ParamMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x @ self.w)


def test_parameter_matmul_converts(caplog):
    """``x @ W`` with a stored W (in, out) converts like a Linear (issue 10; it used to stay
    a matmul with a warning)."""
    torch.manual_seed(0)
    model = ParamMatmul().eval()
    x = torch.randn(2, 8)
    for source in (model, torch.export.export(model, (x,))):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fc2conv"):
            conv = to_conv(source, x)
        assert sum(isinstance(m, nn.Conv2d) for m in conv.modules()) == 2
        assert "stays" not in caplog.text
        t = torch.randn(3, 8)
        assert_matches_reference(conv(t), model, t)


class SharedHead(nn.Module):
    """A classifier whose head calls one Linear twice; ``leak`` also calls it on the features."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.leak = leak
        self.c = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.c(x))
        if self.leak:
            f = self.fc(f.movedim(1, -1)).movedim(-1, 1)
        return self.fc(torch.relu(self.fc(self.fc1(f.flatten(1)))))


def test_convolutionalize_a_head_that_calls_a_linear_twice():
    import fc2conv
    from fc2conv.errors import Fc2ConvError

    torch.manual_seed(0)
    model = SharedHead().eval()
    x = torch.randn(2, 3, 8, 8)
    for source in (model, torch.export.export(model, (x,))):
        dense = fc2conv.convolutionalize(source, (3, 8, 8))
        t = torch.randn(3, 3, 8, 8)
        assert_matches_reference(dense(t), model, t)
        assert dense(torch.randn(1, 3, 12, 10)).shape == (1, 4, 5, 3)
    with pytest.raises(Fc2ConvError, match="'fc'.*also called outside the classifier head"):
        fc2conv.convolutionalize(SharedHead(leak=True).eval(), (3, 8, 8))
