"""Zoo tier, issue 10 (part A): ``.pt2`` programs of Hugging Face models load and convert.

A program whose output is a ``ModelOutput`` names that class in its pytree spec; torch can
rebuild it only once ``transformers`` registered it. fc2conv imports the named module of the
installed package (nothing from the file is unpickled) -- checked in fresh processes, where
nothing imported ``transformers`` before -- or names the missing package in one sentence.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from zoo_models import ZOO, logits

from fc2conv.cli.main import main
from fc2conv.errors import Fc2ConvError
from fc2conv.pytorch import export_io

EPS = torch.finfo(torch.float32).eps
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def bert_pt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    z = ZOO["bert"]
    model = z.build(0)
    program = torch.export.export(model, (), z.draw(1), strict=False)
    path = tmp_path_factory.mktemp("pt2") / "bert.pt2"
    torch.export.save(program, path)
    return path, model


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@torch.no_grad()
def _assert_like_bert(program: torch.export.ExportedProgram, model: torch.nn.Module,
                      inputs: dict[str, torch.Tensor]) -> None:
    ref = logits(copy.deepcopy(model).double()(**inputs)).double()
    got = logits(program.module()(**inputs)).double()
    assert got.shape == ref.shape
    own = logits(model(**inputs)).double()
    allowed = max(8 * (own - ref).abs().max().item(), 64 * EPS * ref.abs().max().item())
    assert (got - ref).abs().max().item() <= allowed


def test_api_loads_hf_pt2_in_a_fresh_process(bert_pt2, tmp_path: Path) -> None:
    """Before: NotImplementedError 'Deserializing transformers...BaseModelOutput... in pytree
    is not registered', reported as if the file were not a program."""
    path, model = bert_pt2
    out = tmp_path / "out.pt"
    ids = ZOO["bert"].draw(2)
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from fc2conv.pytorch.export_io import load\n"
        "assert 'transformers' not in sys.modules\n"
        f"p = load({str(path)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "o = p.module()(**ids)\n"
        f"torch.save(o.last_hidden_state, {str(out)!r})\n"
        "print(type(o).__module__)\n"
    )
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "transformers.modeling_outputs"
    got = torch.load(out, weights_only=True).double()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(**ids).last_hidden_state
    assert (got - ref).abs().max().item() <= 1e3 * EPS * ref.abs().max().item()


def test_cli_converts_hf_pt2(bert_pt2, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``fc2conv convert bert.pt2 ...`` (a program called with keywords, returning a
    ModelOutput) converts, checks itself with compare, and writes a program that loads (the
    fresh-process load is the test above; here transformers is already imported)."""
    path, model = bert_pt2
    out = tmp_path / "bert_conv.pt2"
    try:
        main(["convert", str(path), str(out), "--to", "conv"])
    except SystemExit as done:
        assert done.code in (0, None)
    printed = capsys.readouterr().out
    assert "EQUIVALENT" in printed or "IDENTICAL" in printed, printed[-2000:]
    converted = export_io.load(out)
    assert sum("conv2d" in str(n.target) for n in converted.graph.nodes) == 13
    _assert_like_bert(converted, model, ZOO["bert"].draw(3))


def _rename_type(src: Path, dst: Path, old: str, new: str) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(".json"):
                data = data.replace(old.encode(), new.encode())
            zout.writestr(item, data)


def test_missing_package_is_named_in_one_sentence(bert_pt2, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    path, _ = bert_pt2
    bad = tmp_path / "other.pt2"
    _rename_type(path, bad, "transformers.modeling_outputs.", "fc2conv_nosuchpkg.outputs.")
    with pytest.raises(Fc2ConvError) as err:
        export_io.load(bad)
    text = str(err.value)
    assert "'fc2conv_nosuchpkg'" in text and "not installed" in text and "\n" not in text
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(bad), str(tmp_path / "o.pt2"), "--to", "conv"])
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "fc2conv_nosuchpkg" in lines[0]
    assert not (tmp_path / "o.pt2").exists()
