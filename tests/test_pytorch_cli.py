"""The PyTorch commands: ``fc2conv convolutionalize`` and ``convert_pt2`` (the .pt2 half of
``fc2conv convert``), on real .pt2 files in a temporary folder."""

from __future__ import annotations

import re
import subprocess
import sys

import archs
import pytest
import torch
from torch import nn
from torch_refs import assert_matches_reference

from fc2conv.cli.main import main
from fc2conv.cli.torch_commands import convert_pt2


def _save(model: nn.Module, x: torch.Tensor, path) -> None:
    torch.export.save(torch.export.export(model, (x,)), str(path))


def test_convolutionalize_command_writes_a_dense_program(tmp_path, capsys):
    model = archs.classifiers()["alexnet_valid"]
    src, dst = tmp_path / "alex.pt2", tmp_path / "alex_fcn.pt2"
    _save(model, torch.randn(2, *model.INPUT_SHAPE), src)
    main(["convolutionalize", str(src), str(dst), "--input-shape", "3,63,63"])
    out = capsys.readouterr().out
    assert re.search(r"check at 3x63x63: (EQUIVALENT|IDENTICAL)", out)
    assert "receptive field 57x57, stride 8x8, padding 0x0; window 63x63" in out
    assert "classifier.1" in out and "Linear" in out
    dense = torch.export.load(str(dst)).module()
    x = torch.randn(3, *model.INPUT_SHAPE)
    assert_matches_reference(dense(x), model, x)
    assert dense(torch.randn(1, 3, 95, 79)).shape == (1, 10, 5, 3)  # larger images: dense map


def test_convert_pt2_to_conv_and_back(tmp_path, capsys):
    torch.manual_seed(0)
    model = archs.MLP().eval()
    x = torch.randn(2, 5, 16)
    src, mid, back = tmp_path / "mlp.pt2", tmp_path / "mlp_conv.pt2", tmp_path / "mlp_lin.pt2"
    _save(model, x, src)
    assert convert_pt2(str(src), str(mid), to="conv", check=True, only=(), in_place=False) == 0
    out = capsys.readouterr().out
    assert re.search(r"check: (EQUIVALENT|IDENTICAL)", out)
    conv = torch.export.load(str(mid)).module()
    assert not any(n.target == torch.ops.aten.linear.default for n in conv.graph.nodes)
    assert_matches_reference(conv(x), model, x)
    assert convert_pt2(str(mid), str(back), to="linear", check=True, only=(), in_place=False) == 0
    lin = torch.export.load(str(back)).module()
    assert sum(n.target == torch.ops.aten.linear.default for n in lin.graph.nodes) == 3
    assert_matches_reference(lin(x), model, x)


def test_convert_pt2_only_and_errors(tmp_path, capsys):
    model = archs.MLP().eval()
    src = tmp_path / "mlp.pt2"
    _save(model, torch.randn(2, 5, 16), src)
    dst = tmp_path / "o.pt2"
    assert convert_pt2(str(src), str(dst), to="conv", check=True, only=("down",),
                       in_place=False) == 0
    prog = torch.export.load(str(dst)).module()
    assert sum(n.target == torch.ops.aten.linear.default for n in prog.graph.nodes) == 2
    from fc2conv.errors import Fc2ConvError

    with pytest.raises(Fc2ConvError, match="refusing to overwrite"):
        convert_pt2(str(src), str(src), to="conv", check=True, only=(), in_place=False)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a program")
    with pytest.raises(Fc2ConvError, match="is not a torch.export program"):
        convert_pt2(str(garbage), str(dst), to="conv", check=True, only=(), in_place=False)


def test_command_errors_are_one_line_without_traceback(tmp_path):
    model = archs.classifiers()["lenet5"]
    src = tmp_path / "lenet.pt2"
    _save(model, torch.randn(2, *model.INPUT_SHAPE), src)
    cases = [
        ([str(src), str(tmp_path / "o.pt2"), "--input-shape", "1,28,28"], "does not run on"),
        ([str(src), str(src), "--input-shape", "1,32,32"], "refusing to overwrite"),
        ([str(tmp_path / "missing.pt2"), str(tmp_path / "o.pt2"), "--input-shape", "1,32,32"],
         "No such file"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "fc2conv", "convolutionalize", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("fc2conv: error:")
    assert not (tmp_path / "o.pt2").exists()
