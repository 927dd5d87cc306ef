"""A float64 reference for every ONNX export in the zoo: `convert --check` and `compare` run
(never exit 2), agree on the same files, and name the engine that ran the reference.

BERT's exports (both torch exporters) made both commands exit 2 before: onnx's reference
evaluator fails on the token-type GatherElements ("cannot reshape array of size 1 into shape").
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import zoo_models as zm

CASES = [("bert", False), ("bert", True), ("distilbert", False), ("gpt2", True),
         ("t5_encoder", False)]


def export(name: str, dynamo: bool, folder: Path) -> Path:
    """Zoo model ``name`` exported to ONNX with the chosen torch exporter."""
    entry = zm.ZOO[name]
    kw = entry.draw(0)
    path = folder / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {} if dynamo else {"opset_version": 17}
        torch.onnx.export(zm.Logits(entry.build(0), list(kw)), tuple(kw.values()), str(path),
                          input_names=list(kw), dynamo=dynamo, **extra)
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from fc2conv.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out + err


@pytest.mark.parametrize(("name", "dynamo"), CASES,
                         ids=[f"{n}-{'dynamo' if d else 'legacy'}" for n, d in CASES])
def test_check_and_compare_run_and_agree(name: str, dynamo: bool, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = export(name, dynamo, tmp_path)
    dst = tmp_path / "conv.onnx"
    code, out = _cli(capsys, "convert", str(src), str(dst), "--to", "conv")
    assert code == 0, out
    check = re.search(r"check \(onnxruntime\): (IDENTICAL|EQUIVALENT|DIFFERENT)", out)
    assert check and check.group(1) != "DIFFERENT", out
    code, out = _cli(capsys, "compare", str(src), str(dst), "--samples", "3", "--no-layers")
    assert code == 0, out
    assert re.match(r"(IDENTICAL|EQUIVALENT)", out), out  # as the check said: not different
    assert re.search(r"float64 reference: model A run by (onnxruntime|onnx reference evaluator)",
                     out), out
