"""``fc2conv convert --to conv`` says how many layout changes the converted graph has and where
each sits: ONNX (``--layout ane``, every Transpose left) and .pt2 (every move left)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_onnx_layout_ane import _block

from fc2conv.cli.main import main
from fc2conv.cli.torch_commands import convert_pt2


def _run(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["convert", *args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out + err


def test_onnx_convert_prints_the_layout_changes(tmp_path, capsys) -> None:
    src = tmp_path / "block.onnx"
    onnx.save(_block(np.random.default_rng(0)), str(src))
    code, out = _run(capsys, str(src), str(tmp_path / "ane.onnx"), "--to", "conv",
                     "--layout", "ane")
    assert code == 0, out
    assert "2 layout changes in the converted graph:" in out
    assert "reads input x" in out and "-> output y" in out
    assert "check (onnxruntime): " in out and "different" not in out
    code, out = _run(capsys, str(src), str(tmp_path / "cf.onnx"), "--to", "conv", "--no-check")
    assert code == 0 and "layout changes in the converted graph:" in out
    code, out = _run(capsys, str(src), str(tmp_path / "x.onnx"), "--to", "conv",
                     "--layout", "nchw")
    assert code == 2 and "Traceback" not in out


class _Stack(torch.nn.Module):
    """Three post-LN MLP blocks: the ANE layout needs one move in and one out."""

    def __init__(self) -> None:
        super().__init__()
        self.fcs = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc, norm in zip(self.fcs, self.norms, strict=True):
            x = norm(x + torch.relu(fc(x)))
        return x


def test_pt2_convert_prints_the_layout_changes(tmp_path, capsys) -> None:
    src, dst = tmp_path / "stack.pt2", tmp_path / "stack_conv.pt2"
    torch.export.save(torch.export.export(_Stack().eval(), (torch.randn(2, 7, 16),)), str(src))
    assert convert_pt2(src, dst, to="conv", check=True, only=(), in_place=False) == 0
    out = capsys.readouterr().out
    assert "2 layout changes in the converted graph:" in out
    assert "in " in out and "out" in out
