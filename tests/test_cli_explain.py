"""`fc2conv explain`: counts against formulas written here, structure against a probed float64
conv, figures, and one-line errors with exit 2."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fc2conv.cli.layer_facts import conv_facts, linear_facts, parse_dims
from fc2conv.cli.main import main
from fc2conv.errors import Fc2ConvError

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def probed_nonzeros(c: int, o: int, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> int:
    """Non-zeros of the conv's matrix, probed column by column with F.conv on float64 unit
    inputs and random weights away from 0 (so no entry is zero by accident)."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.rand(o, c, *kernel, generator=gen, dtype=torch.float64) + 0.5)
    n = c * math.prod(spatial)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c, *spatial)
    cols = CONVS[len(spatial)](basis, weight).reshape(n, -1)
    return int((cols != 0).sum())


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 4), o=st.integers(1, 4), dims=st.integers(1, 3),
    data=st.data(), bias=st.booleans(),
)
def test_conv_counts_match_formulas_and_probed_structure(c, o, dims, data, bias):
    spatial = tuple(data.draw(st.lists(st.integers(1, 5), min_size=dims, max_size=dims)))
    kernel = tuple(data.draw(st.integers(1, s)) for s in spatial)
    facts = conv_facts(c, o, spatial, kernel, bias=bias)
    out = tuple(s - k + 1 for s, k in zip(spatial, kernel, strict=True))
    taps = math.prod(kernel)
    assert facts.out_shape == (o, *out)
    assert facts.params == o * c * taps + (o if bias else 0)
    assert facts.macs == o * c * taps * math.prod(out)
    assert facts.flops == 2 * facts.macs
    assert (facts.matrix_rows, facts.matrix_cols) == (o * math.prod(out), c * math.prod(spatial))
    assert facts.matrix_nonzeros == probed_nonzeros(c, o, spatial, kernel)
    if taps == 1:
        assert facts.sparsity == pytest.approx(1 - 1 / math.prod(spatial))


@pytest.mark.parametrize(("n_in", "n_out", "shape", "order"), [
    (9216, 4096, (256, 6, 6), "chw"),
    (12, 2, (3, 2, 2), "hwc"),
    (40, 3, (5, 8), "chw"),
    (24, 5, (2, 3, 2, 2), "hwc"),
])
def test_linear_over_a_map_counts_and_equivalent_conv(n_in, n_out, shape, order):
    facts = linear_facts(n_in, n_out, shape, order)
    assert facts.params == n_in * n_out + n_out
    assert facts.macs == n_in * n_out
    assert facts.out_shape == (n_out, *([1] * (len(shape) - 1)))
    kernel = "x".join(map(str, shape[1:]))
    assert any(f"{shape[0]}->{n_out}, kernel {kernel}" in form for form in facts.forms)
    assert any(f"{shape[0] * n_out + n_out:,} parameters" in note for note in facts.notes)
    assert facts.sparsity == 0


def test_plain_linear():
    facts = linear_facts(256, 64)
    assert (facts.params, facts.macs, facts.out_shape) == (256 * 64 + 64, 256 * 64, (64,))
    assert any("Conv1d 256->64, kernel 1" in f for f in facts.forms)


@pytest.mark.parametrize(("text", "n"),
                         [("9x", 2), ("axb", 2), ("0x3", 2), ("3x3x3", 2), ("", None)])
def test_parse_dims_refuses_with_a_sentence(text, n):
    with pytest.raises(Fc2ConvError, match="positive integers joined by 'x'"):
        parse_dims(text, "--linear", n)


def test_explain_cli_alexnet_fc(capsys):
    main(["explain", "--linear", "9216x4096", "--in-shape", "256x6x6"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"{9216 * 4096 + 4096:,}" in out
    assert f"{9216 * 4096:,}" in out
    assert "Conv2d 256->4096, kernel 6x6" in out


def test_explain_cli_1x1_conv(capsys):
    main(["explain", "--in-channels", "2", "--out-channels", "1", "--spatial", "2x2"])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at 80 columns off a TTY
    assert "Linear 2->1" in out and "block diagonal" in out
    assert "8 non-zero" in out and "75.00% structural zeros" in out


def _assert_png(path: Path, min_side: int = 150) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert min(img.shape[:2]) >= min_side and img.std() > 0.02


@pytest.mark.parametrize("spec", [
    ["--in-channels", "2", "--out-channels", "1", "--spatial", "2x2"],
    ["--in-channels", "3", "--out-channels", "2", "--spatial", "4x4", "--kernel", "3x3"],
    ["--in-channels", "512", "--out-channels", "512", "--spatial", "28x28", "--kernel", "3x3"],
    ["--linear", "9216x4096", "--in-shape", "256x6x6", "--order", "hwc"],
    ["--linear", "512x10"],
], ids=["seed-1x1", "small-3x3", "large-3x3", "alexnet-fc", "plain-linear"])
def test_explain_png(tmp_path, capsys, spec):
    png = tmp_path / "layer.png"
    main(["explain", *spec, "--png", str(png)])
    _assert_png(png)
    assert str(png.resolve()) in capsys.readouterr().out.replace("\n", "")
    assert [p.name for p in tmp_path.iterdir()] == ["layer.png"]  # no temporary left behind


@pytest.mark.parametrize(("argv", "words"), [
    (["--linear", "9000x4096", "--in-shape", "256x6x6"], ["9000", "9216", "256x6x6"]),
    (["--linear", "9x"], ["--linear", "'9x'"]),
    (["--in-channels", "2"], ["--out-channels", "--spatial"]),
    (["--in-channels", "2", "--out-channels", "1", "--spatial", "2x2", "--linear", "4x4"],
     ["not both"]),
    (["--in-channels", "2", "--out-channels", "1", "--spatial", "2x2", "--kernel", "3x3"],
     ["kernel"]),
    (["--in-channels", "2", "--out-channels", "1", "--spatial", "2x2", "--kernel", "1"],
     ["--kernel", "--spatial"]),
    (["--linear", "8x2", "--png", "/nonexistent-dir/x.png"], ["does not exist"]),
    (["--linear", "8x2", "--png", "figure.txt"], ["*.png", "'figure.txt'"]),
    (["--linear", "12x2", "--order", "hwc"], ["--order", "--in-shape"]),
])
def test_explain_errors_are_one_line_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        main(["explain", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fc2conv: error:") and err.strip().count("\n") == 0
    for word in words:
        assert word in err


def test_explain_error_end_to_end_has_no_traceback():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "fc2conv", "explain", "--linear", "9000x4096", "--in-shape",
         "256x6x6"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "9216" in proc.stderr and "9000" in proc.stderr


def test_explain_help_has_examples(capsys):
    main(["explain", "--help"])
    out = capsys.readouterr().out
    assert "Examples:" in out and "--linear 9216x4096 --in-shape 256x6x6" in out
