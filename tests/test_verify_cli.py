"""`fc2conv compare`: the report on stdout, exit 0/1 for the verdict, 2 and one line on stderr
for bad input — never a traceback."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fc2conv.cli.main import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    a = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[2].bias.mul_(2.0)
    x = torch.randn(4, 24)
    paths = {"a": d / "a.pt2", "a2": d / "a_copy.pt2", "bad": d / "b.pt2", "pickle": d / "a.pt",
             "junk": d / "junk.onnx", "onnx": d / "a.onnx"}
    torch.export.save(torch.export.export(a, (x,)), str(paths["a"]))
    torch.export.save(torch.export.export(copy.deepcopy(a), (x,)), str(paths["a2"]))
    torch.export.save(torch.export.export(b, (x,)), str(paths["bad"]))
    torch.save(a, str(paths["pickle"]))
    paths["junk"].write_bytes(b"\x00garbage")
    torch.onnx.export(a, (x,), str(paths["onnx"]), dynamo=False)
    return paths


def test_equivalent_models_exit_0(models: dict[str, Path], capsys) -> None:
    code, out, err = run(["compare", str(models["a"]), str(models["onnx"]), "--samples", "3"],
                         capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith(("EQUIVALENT", "IDENTICAL"))
    assert "Layers:" in out
    # the ratio column says what it divides and where a layer would diverge
    assert "max ratio: B's error against the float64 reference over A's" in out


def test_different_models_exit_1_with_location(models: dict[str, Path], capsys) -> None:
    code, out, _ = run(["compare", str(models["a"]), str(models["bad"])], capsys)
    assert code == 1
    assert out.startswith("DIFFERENT")
    assert "First divergence: 2" in out and "bias doubled" in out


def test_json_and_no_layers(models: dict[str, Path], capsys) -> None:
    code, out, _ = run(["compare", str(models["a"]), str(models["a2"]), "--json",
                        "--no-layers", "--input-shape", "24"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"] == "identical" and doc["layers"] == []
    assert doc["outputs"][0]["shape"] == [4, 5]  # the .pt2 spec's static batch of 4 was added


@pytest.mark.parametrize("case", ["missing", "junk", "pickle", "shape"])
def test_bad_input_exits_2_with_one_line(models: dict[str, Path], case: str, capsys) -> None:
    argv = {
        "missing": ["compare", str(models["a"]), str(models["a"].parent / "nope.pt2")],
        "junk": ["compare", str(models["junk"]), str(models["a"])],
        "pickle": ["compare", str(models["pickle"]), str(models["a"])],
        "shape": ["compare", str(models["a"]), str(models["a2"]), "--input-shape", "3,x"],
    }[case]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) in (1, 2) and "Traceback" not in err  # click usage errors add a hint line
    assert "error" in err.lower()
    if case == "pickle":
        assert "--trust-pickle" in err


def test_trusted_pickle_is_loaded(models: dict[str, Path], capsys) -> None:
    code, out, _ = run(["compare", str(models["pickle"]), str(models["a"]), "--trust-pickle",
                        "--input-shape", "4,24", "--samples", "2"], capsys)
    assert code == 0
    assert out.startswith(("IDENTICAL", "EQUIVALENT"))
