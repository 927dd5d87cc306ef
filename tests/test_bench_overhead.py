"""The latency benches' command lines on this CPU machine (no timings asserted: the speed
lives in the printed ratios). ``--tf32 on|off|both`` and ``--device cuda`` are the GPU runs'
switches; here they must give one ``n/a`` row per model and a clean skip."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import onnxruntime as ort
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tf32_restored():  # type: ignore[no-untyped-def]
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


RATIO = r"\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]"


def test_converted_overhead_rows_on_cpu(capsys: pytest.CaptureFixture[str],
                                        tf32_restored: None) -> None:
    bench = _bench("converted_overhead")
    bench.main(["--quick", "--only", "mlp 256", "--rounds", "3", "--tf32", "both",
                "--batch", "2", "--length", "16"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("mlp 256")]
    assert len(rows) == 1, out  # TF32 is a CUDA mode: one n/a row, not two
    assert re.search(rf"n/a\s+2\s+[\d.]+\s+[\d.]+\s+{RATIO}\s+{RATIO}\s", rows[0]), rows[0]
    assert bench.tf32_settings("both", torch.device("cuda")) == ["on", "off"]
    assert bench.tf32_settings("off", torch.device("cuda")) == ["off"]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with CUDA the bench runs on the GPU (bench/gpu_session.sh); this "
                    "checks its one-line skip on a machine without CUDA")
def test_converted_overhead_skips_cuda_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    _bench("converted_overhead").main(["--device", "cuda", "--tf32", "both", "--quick"])
    assert "--device cuda skipped" in capsys.readouterr().out


def test_onnx_overhead_cuda_providers_and_skip(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench("onnx_overhead")
    assert bench.providers_for("cpu", "on") == ["CPUExecutionProvider"]
    for tf32, flag in (("on", "1"), ("off", "0")):
        assert bench.providers_for("cuda", tf32) == [
            ("CUDAExecutionProvider", {"use_tf32": flag}), "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider, so the bench runs on it "
                    "(bench/gpu_session.sh); the one-line skip checked here is not reached")
    bench.main(["--device", "cuda", "--tf32", "both", "--quick"])
    assert "--device cuda skipped" in capsys.readouterr().out


def test_ane_folds_compares_the_graphs_with_and_without_the_folds(
        capsys: pytest.CaptureFixture[str]) -> None:
    """One row per model: onnxruntime's node counts original/variants (on ViT the folds run
    fewer nodes -- its pre-norms' weights and the queries' scales go into the Convs -- and the
    norms' ReduceSumSquare fewer again) and two ratios per variant; the switches the bench
    patches exist."""
    bench = _bench("ane_folds")
    bench.main(["--only", "zoo vit", "--rounds", "4", "--threads", "1",
                "--variants", "no-folds", "stop19", "no-order", "now"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("zoo vit"))
    nodes = re.search(r"(\d+)/(\d+)/(\d+)/(\d+)/(\d+)", row)
    assert nodes is not None and int(nodes[4]) < int(nodes[3]) < int(nodes[2]), row
    assert int(nodes[5]) == int(nodes[4]), row  # the operand order changes no node count
    assert len(re.findall(RATIO, row)) == 8, row
