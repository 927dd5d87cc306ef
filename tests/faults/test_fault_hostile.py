"""Hostile files: external data outside the model's folder, pickles in every disguise.

Through ``convert`` (with and without ``--no-check``), ``compare`` and ``convolutionalize``:
exit 2, exactly one line that gives the checker's reason, nothing written, no pickle ever
unpickled (a pickle bomb would create a marker file).
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from builders import hostile_onnx, mlp_onnx, small_pt2
from fuzz import pickle_bomb, run_cli

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

REASONS = {
    "dotdot": "points outside the directory",
    "absolute": "should be a relative path, but it is an absolute path",
    "symlink": "but it is a symbolic link",
}


def _one_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1, (r.code, r.stderr)
    assert lines[0].startswith("fc2conv: error: ") and "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("kind", sorted(REASONS))
@pytest.mark.parametrize("how", ["convert", "convert --no-check", "compare", "compare reversed"])
def test_hostile_external_data_is_refused_with_the_checkers_reason(tmp_path, kind, how):
    model = hostile_onnx(tmp_path / "m", kind)
    good = tmp_path / "good.onnx"
    good.write_bytes(mlp_onnx(np.random.default_rng(0)).SerializeToString())
    out = tmp_path / "m" / "out.onnx"
    argv = {
        "convert": ["convert", str(model), str(out), "--to", "conv"],
        "convert --no-check": ["convert", str(model), str(out), "--to", "conv", "--no-check"],
        "compare": ["compare", str(model), str(good)],
        "compare reversed": ["compare", str(good), str(model)],
    }[how]
    r = run_cli(argv, how, kind, tmp_path / "m")
    line = _one_line(r)
    assert str(model) in line and "fails the ONNX checker" in line, line
    assert REASONS[kind] in line, line
    assert not out.exists() and r.new_files == []


def test_the_ir_containment_error_is_one_line_at_the_cli_boundary(tmp_path, monkeypatch):
    """If a foreign library's own path-traversal refusal escapes (it did with --no-check), the
    CLI boundary still turns it into one line with its reason."""
    import fc2conv.cli.convert as convert_cli

    def boom(*a, **k):
        raise ValueError("External data location '../x' resolves to '/x' which is outside the "
                         "base directory '/m'. This may indicate a path traversal attack.")

    monkeypatch.setattr(convert_cli, "_convert_onnx", boom)
    model = tmp_path / "a.onnx"
    model.write_bytes(mlp_onnx(np.random.default_rng(0)).SerializeToString())
    r = run_cli(["convert", str(model), str(tmp_path / "b.onnx"), "--to", "conv"], "c", "-",
                tmp_path)
    line = _one_line(r)
    assert "outside the base directory" in line and "path traversal" not in line


def _bombed_archive(good: bytes, marker, members_to_replace) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(good))
    members = {i.filename: src.read(i.filename) for i in src.infolist()}
    bomb = pickle_bomb(marker)
    for n in members:
        if any(part in n for part in members_to_replace):
            members[n] = bomb
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return buf.getvalue()


PICKLE_DISGUISES = ["pt", "pth", "pkl", "torch.save renamed .pt2", "pt2 weights are pickles",
                    "pt2 example inputs are pickles", "pt2 everything is pickles"]


@pytest.mark.parametrize("disguise", PICKLE_DISGUISES)
def test_pickles_are_never_loaded_by_any_command(tmp_path, disguise):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "in"
    folder.mkdir()
    if disguise in ("pt", "pth", "pkl"):
        f = folder / f"m.{disguise}"
        f.write_bytes(pickle_bomb(marker))
    elif disguise == "torch.save renamed .pt2":
        f = folder / "m.pt2"
        torch.save(torch.nn.Linear(2, 2), f)
        data = f.read_bytes()
        f.write_bytes(_bombed_archive(data, marker, ["data.pkl"]))
    else:
        good = small_pt2(tmp_path / "good.pt2").read_bytes()
        parts = {"pt2 weights are pickles": ["/weights/weight_"],
                 "pt2 example inputs are pickles": ["sample_inputs/"],
                 "pt2 everything is pickles": ["/weights/weight_", "sample_inputs/", ".pt"]}
        f = folder / "m.pt2"
        f.write_bytes(_bombed_archive(good, marker, parts[disguise]))
    out = tmp_path / ("o" + f.suffix)
    for argv in (["convert", str(f), str(out), "--to", "conv"],
                 ["compare", str(f), str(f)],
                 ["convolutionalize", str(f), str(out), "--input-shape", "3,8,8"]):
        r = run_cli(argv, argv[0], disguise, folder)
        assert not marker.exists(), f"{argv[0]} unpickled {disguise}"
        assert r.code in (0, 2) and "Traceback" not in r.stderr, r
        if r.code == 2:
            _one_line(r)
        assert r.new_files == []


def test_raw_torch_export_load_would_unpickle_the_example_inputs(tmp_path):
    """Why fc2conv forces weights-only loading: plain ``torch.export.load`` retries a failed
    weights-only load of the example inputs with ``weights_only=False``. If this ever stops
    holding, torch fixed it; the test above keeps fc2conv safe either way."""
    marker = tmp_path / "PWNED"
    good = small_pt2(tmp_path / "good.pt2").read_bytes()
    f = tmp_path / "m.pt2"
    f.write_bytes(_bombed_archive(good, marker, ["sample_inputs/"]))
    with pytest.raises(Exception):  # noqa: B017, PT011 - torch's own error, any type
        torch.export.load(str(f))
    if not marker.exists():
        pytest.skip("this torch no longer falls back to weights_only=False")


def test_convert_and_compare_word_a_bad_pt2_the_same_way_without_torchs_noise(tmp_path):
    good = small_pt2(tmp_path / "good.pt2").read_bytes()
    src = zipfile.ZipFile(io.BytesIO(good))
    members = {i.filename: src.read(i.filename) for i in src.infolist()}
    weight = next(n for n in members if n.endswith("weight_0"))
    members[weight] = members[weight][:8]  # whole floats, too few
    f = tmp_path / "bad.pt2"
    with zipfile.ZipFile(f, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    lines = []
    for argv in (["convert", str(f), str(tmp_path / "o.pt2"), "--to", "conv"],
                 ["compare", str(f), str(tmp_path / "good.pt2")],
                 ["convolutionalize", str(f), str(tmp_path / "o.pt2"), "--input-shape",
                  "3,8,8"]):
        lines.append(_one_line(run_cli(argv, argv[0], "-", tmp_path)))
    assert len(set(lines)) == 1, lines  # one message per problem
    assert "warnings above" not in lines[0] and "out of bounds for storage" in lines[0], lines[0]


def test_compare_gives_the_checkers_reason_for_a_damaged_onnx(tmp_path):
    m = mlp_onnx(np.random.default_rng(0))
    m.graph.initializer[0].dims[0] = 0  # 0-element tensor that still has data
    f = tmp_path / "bad.onnx"
    f.write_bytes(m.SerializeToString())
    conv = _one_line(run_cli(["convert", str(f), str(tmp_path / "o.onnx"), "--to", "conv"],
                             "convert", "-", tmp_path))
    assert "fails the ONNX checker" in conv and "w1" in conv, conv
