"""The README's Python examples run as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index]
    if "model.onnx" in code:  # the ONNX example converts a file: make one
        mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        torch.onnx.export(mlp, (torch.randn(2, 16),), "model.onnx", dynamo=False)
    namespace: dict[str, object] = {}
    prelude = "\n".join(BLOCKS[:index]) if "fc2conv.compare(mlp" in code else ""
    exec(compile(prelude + "\n" + code, f"README block {index}", "exec"), namespace)
    if "model.onnx" in code:
        assert Path("model_conv.onnx").is_file() and Path("model_lin.onnx").is_file()
