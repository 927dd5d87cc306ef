"""The package surface: lazy imports, the console entry point, the error family."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fc2conv
from fc2conv.errors import Fc2ConvError, wrap

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_does_not_load_torch_onnx_or_onnxruntime():
    probe = ("import sys, fc2conv; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnx_ir', 'torch')))")
    result = run_python("-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # first use loads what it needs, and not onnx
    probe = ("import sys, fc2conv; fc2conv.linear_to_conv; "
             "print('torch' in sys.modules, 'onnx' in sys.modules)")
    assert run_python("-c", probe).stdout.strip() == "True False"


def test_python_m_fc2conv_help_and_unknown_command():
    ok = run_python("-m", "fc2conv", "--help")
    assert ok.returncode == 0 and "Usage: fc2conv" in ok.stdout
    bad = run_python("-m", "fc2conv", "no-such-command")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "No such command" in bad.stderr


def test_errors_are_value_errors_and_wrap_with_context():
    err = wrap('Cannot convert "classifier.0" (Linear 25088->4096)', Fc2ConvError("bad shape."))
    assert isinstance(err, ValueError)
    assert str(err) == 'Cannot convert "classifier.0" (Linear 25088->4096): bad shape.'
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = fc2conv.nope  # type: ignore[attr-defined]
