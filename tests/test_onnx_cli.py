"""``fc2conv convert``: exit codes, one-line errors for bad input, no partial or overwritten
files."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from _onnx_helpers import init, model, op_counts, vinfo
from onnx import helper

from fc2conv.cli.main import main


def _write_model(path) -> str:
    rng = np.random.default_rng()
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2"),
    ]
    m = model(
        nodes,
        [vinfo("x", ["N", 12])],
        [vinfo("y", ["N", 3])],
        [init(rng, "W", 8, 12), init(rng, "C", 8), init(rng, "W2", 8, 3)],
    )
    onnx.save(m, str(path))
    return str(path)


def _run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["convert", *args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_convert_to_conv_prints_summary_and_verdict(tmp_path, capsys) -> None:
    src = _write_model(tmp_path / "m.onnx")
    code, out, err = _run(capsys, src, str(tmp_path / "c.onnx"), "--to", "conv")
    assert code == 0, err
    assert "2 converted, 0 left" in out
    assert re.search(r"check \(onnxruntime\): (EQUIVALENT|IDENTICAL)", out)
    assert op_counts(onnx.load(str(tmp_path / "c.onnx"))) == {
        "Reshape": 1,
        "Conv": 2,
        "Relu": 1,
        "Flatten": 1,
    }
    code, out, _ = _run(
        capsys, str(tmp_path / "c.onnx"), str(tmp_path / "l.onnx"), "--to", "linear", "--no-check"
    )
    assert code == 0 and "2 converted" in out and "onnxruntime" not in out


def test_only_and_left_layers_are_listed(tmp_path, capsys) -> None:
    src = _write_model(tmp_path / "m.onnx")
    code, out, _ = _run(capsys, src, str(tmp_path / "c.onnx"), "--to", "conv", "--only", "fc2")
    assert code == 0 and "1 converted, 1 left" in out and "not named by --only" in out


def test_a_wrong_conversion_exits_1(tmp_path, capsys, monkeypatch) -> None:
    import fc2conv.onnx.rules.gemm_to_conv as rule

    monkeypatch.setattr(
        rule, "linear_to_conv_kernel", lambda w, d: (w * 1.01).reshape(*w.shape, 1, 1)
    )
    src = _write_model(tmp_path / "m.onnx")
    code, out, _ = _run(capsys, src, str(tmp_path / "c.onnx"), "--to", "conv")
    assert code == 1 and "check (onnxruntime): DIFFERENT" in out


@pytest.mark.parametrize(
    "content,why",
    [
        (b"", "empty"),
        (os.urandom(3000), "not a readable ONNX model"),
        ("truncated", "not a readable ONNX model"),
    ],
    ids=["empty", "random-bytes", "truncated"],  # stable ids: pytest-xdist workers must agree
)
def test_bad_files_exit_2_with_one_line(tmp_path, capsys, content, why) -> None:
    bad = tmp_path / "bad.onnx"
    if content == "truncated":
        good = tmp_path / "good.onnx"
        _write_model(good)
        content = good.read_bytes()[: good.stat().st_size // 2]
    bad.write_bytes(content)
    code, out, err = _run(capsys, str(bad), str(tmp_path / "out.onnx"), "--to", "conv")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fc2conv: error: ") and str(bad) in err
    assert why in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_checker_failure_exits_2(tmp_path, capsys) -> None:
    node = helper.make_node("Relu", ["undefined"], ["y"])
    graph = helper.make_graph([node], "g", [vinfo("x", [2])], [vinfo("y", [2])])
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    code, _, err = _run(capsys, str(bad), str(tmp_path / "out.onnx"), "--to", "conv")
    assert code == 2 and "fails the ONNX checker" in err and str(bad) in err


def test_missing_file_unsupported_suffix_and_missing_folder(tmp_path, capsys) -> None:
    code, _, err = _run(
        capsys, str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx"), "--to", "conv"
    )
    assert code == 2 and "nope.onnx" in err and "no such file" in err
    (tmp_path / "m.h5").write_bytes(b"x")
    code, _, err = _run(capsys, str(tmp_path / "m.h5"), str(tmp_path / "o.onnx"), "--to", "conv")
    assert code == 2 and "m.h5" in err and ".onnx" in err and ".pt2" in err
    src = _write_model(tmp_path / "m.onnx")
    code, _, err = _run(capsys, src, str(tmp_path / "no" / "o.onnx"), "--to", "conv")
    assert code == 2 and "does not exist" in err


def test_out_equal_in_is_refused_unless_in_place(tmp_path, capsys) -> None:
    src = _write_model(tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    code, _, err = _run(capsys, src, src, "--to", "conv")
    assert (
        code == 2
        and "refusing to overwrite" in err
        and (tmp_path / "m.onnx").read_bytes() == before
    )
    code, out, _ = _run(capsys, src, src, "--to", "conv", "--in-place", "--no-check")
    assert code == 0 and op_counts(onnx.load(src))["Conv"] == 2
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_failure_while_writing_leaves_no_partial_file(tmp_path, capsys, monkeypatch) -> None:
    import onnx_ir as ir

    from fc2conv.errors import Fc2ConvError

    def broken_save(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise Fc2ConvError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    src = _write_model(tmp_path / "m.onnx")
    code, _, err = _run(capsys, src, str(tmp_path / "out.onnx"), "--to", "conv")
    assert code == 2 and "disk full" in err
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_help_and_import_fc2conv_do_not_import_onnx() -> None:
    code = (
        "import sys, fc2conv; from fc2conv.cli.main import main\n"
        "try:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert not {'onnx', 'onnxruntime', 'onnx_ir'} & set(sys.modules), sys.modules.keys()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "--to [conv|linear]" in res.stdout
