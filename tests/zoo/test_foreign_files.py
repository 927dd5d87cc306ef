"""ONNX graphs from other exporters (tf2onnx, skl2onnx) and hand-built layouts.

Each file (``tests/zoo/foreign/``) must be a valid model, run in onnxruntime, and agree with
the framework that generated it (outputs saved at generation time) and with an independent
float64 reference (``onnx.reference`` on a float64 copy of the graph). Then fc2conv's
``to_conv`` / ``to_linear`` must keep those numbers on fresh random inputs.

Tolerance (float32-derived): a float32 dot product of ``K`` terms rounds by about
``sqrt(K) * eps`` relative to its magnitude (random-walk bound), and a graph of ``L`` such
layers compounds at most linearly, so ``|out - ref| <= 8 * eps32 * sqrt(K_max) * L * scale``,
with ``scale = max(1, max |ref|)``, ``K_max`` the largest fan-in of a MatMul/Gemm/Conv weight
(for 2-D weights the larger dimension, an upper bound whatever the transB layout) and ``L``
their count. For these files that is 30x to 500x eps32; the observed error is under 4x, and
+1e-3 on one weight exceeds it 5x to 500x.

``compare`` (issue 9) must call the clean pairs identical/equivalent, catch a planted +1e-3
weight change, and agree with ``convert --check``; where it does not today the test is
``xfail(strict=True)`` with the observed failure, so fixing compare turns it into an XPASS that
asks for the marker to go.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from _onnx_helpers import F32_EPS, reference64, run_ort
from onnx import numpy_helper
from zoo_models import foreign_draws, foreign_models

from fc2conv.onnx import to_conv, to_linear

FOREIGN = foreign_models()
NAMES = sorted(FOREIGN)
DENSE = ("MatMul", "Gemm")

# Files fc2conv does not fully convert today (the converted graph is still exact, see
# test_to_conv_matches_float64_reference); the other engineers fix these in src/.
NOT_ALL_CONVERTED = {
    "hand_gemm_transA": (
        "to_conv leaves Gemm(transA=1): 'transA=1 reads the input transposed, which is not one "
        "Linear per row' (a Transpose before a 1x1 Conv would be exact)"
    ),
}


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(FOREIGN[name])


def _weights(m: onnx.ModelProto) -> list[np.ndarray]:
    """The weights of MatMul / Gemm / Conv nodes that are initializers (directly or through one
    Transpose), as arrays."""
    inits = {t.name: t for t in m.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Transpose"}
    out = []
    for n in m.graph.node:
        if n.op_type in (*DENSE, "Conv") and len(n.input) > 1:
            name = transposed.get(n.input[1], n.input[1])
            if name in inits:
                out.append(numpy_helper.to_array(inits[name]))
    return out


def _tolerance(m: onnx.ModelProto, ref: np.ndarray) -> float:
    ws = _weights(m)
    assert ws, "every foreign file has at least one dense layer with a constant weight"
    fan_in = max(int(np.prod(w.shape[1:])) if w.ndim > 2 else max(w.shape) for w in ws)
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    return 8 * F32_EPS * math.sqrt(fan_in) * len(ws) * scale


def _fresh(draw: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """New random values with the shapes of a saved draw (batch sizes 1, 3, 4)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in draw.items()}


def _assert_close(m_ref: onnx.ModelProto, outs: list[np.ndarray], refs: list[np.ndarray],
                  what: str) -> None:
    assert len(outs) == len(refs), what
    for out, ref in zip(outs, refs, strict=True):
        out = np.asarray(out)
        assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
        if ref.dtype.kind in "iub":  # class labels: exact
            np.testing.assert_array_equal(out, ref, err_msg=what)
            continue
        tol = _tolerance(m_ref, ref)
        assert tol < 1e-3, "the tolerance must stay far below a real bug's effect"
        err = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
        assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


def test_the_zoo_has_foreign_files() -> None:
    assert {n.split("_")[0] for n in NAMES} >= {"tf", "skl", "hand"}
    for path in FOREIGN.values():
        assert path.stat().st_size < 1_000_000
        assert path.with_suffix(".npz").exists()


@pytest.mark.parametrize("name", NAMES)
def test_file_is_valid_and_matches_its_framework(name: str) -> None:
    m = _load(name)
    onnx.checker.check_model(m, full_check=True)
    draws = foreign_draws(name)
    assert len(draws) >= 3
    out_names = [o.name for o in m.graph.output]
    for ins, saved in draws:
        assert set(saved) == set(out_names)
        framework = [saved[k] for k in out_names]
        got = run_ort(m, ins)
        _assert_close(m, got, framework, f"{name}: onnxruntime vs the source framework")
        ref = reference64(m, ins)
        _assert_close(m, got, ref, f"{name}: onnxruntime vs float64 reference")
        _assert_close(m, framework, ref, f"{name}: the source framework vs float64 reference")


def _convert_all_dense(name: str) -> None:
    m = _load(name)
    conv = to_conv(m)
    left = [n.name for n in conv.graph.node if n.op_type in DENSE]
    assert not left, f"to_conv left {left}"
    assert sum(n.op_type == "Conv" for n in conv.graph.node) > sum(
        n.op_type == "Conv" for n in m.graph.node)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=NOT_ALL_CONVERTED[n]))
    if n in NOT_ALL_CONVERTED else n for n in NAMES
])
def test_to_conv_converts_every_dense_layer(name: str) -> None:
    _convert_all_dense(name)


@pytest.mark.parametrize("name", NAMES)
def test_to_conv_and_back_match_float64_reference(name: str) -> None:
    m = _load(name)
    conv = to_conv(m)
    onnx.checker.check_model(conv, full_check=True)
    back = to_linear(conv)
    onnx.checker.check_model(back, full_check=True)
    # to_linear undoes exactly the 1x1 Convs to_conv made; the exporters' own kxk Convs stay
    count = sum(n.op_type == "Conv" for n in m.graph.node)
    assert sum(n.op_type == "Conv" for n in back.graph.node) == count
    assert sum(n.op_type in DENSE for n in back.graph.node) == sum(
        n.op_type in DENSE for n in m.graph.node)
    direct = to_linear(m)
    onnx.checker.check_model(direct, full_check=True)
    for k, (ins, _) in enumerate(foreign_draws(name)):
        feeds = _fresh(ins, seed=1000 + k)
        ref = reference64(m, feeds)
        for label, model in (("original", m), ("to_conv", conv), ("to_linear(to_conv)", back),
                             ("to_linear", direct)):
            _assert_close(m, run_ort(model, feeds), ref, f"{name} {label} vs float64 reference")


@pytest.mark.parametrize("name", NAMES)
def test_the_check_catches_one_changed_weight(name: str) -> None:
    """The tolerance is not vacuous: +1e-3 on one weight of the file is caught on the saved
    draws (the effect is 5x to 500x the tolerance on these files)."""
    m = _load(name)
    bug = onnx.ModelProto()
    bug.CopyFrom(m)
    init = next(t for t in bug.graph.initializer
                if len(t.dims) >= 2 and t.data_type == onnx.TensorProto.FLOAT)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1e-3
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    ins, _ = foreign_draws(name)[-1]
    with pytest.raises(AssertionError, match=r"max \|diff\|"):
        _assert_close(m, run_ort(bug, ins), reference64(m, ins), name)


# ---------------------------------------------------------------- compare on foreign graphs
# Issue 9 ("Other exporters, same fault"): compare(A, to_conv(A)) must not say "different" on a
# clean conversion, and must say "different" when a planted bug's effect exceeds the rounding.
# Known failures, each a strict xfail (an XPASS fails the suite: delete the entry then).
# Fixed by compare's output-decided judge: the six clean-pair false alarms, the CLI
# disagreements and the skl_mlp_classifier miss listed here before.
COMPARE_FALSE_ALARM: dict[str, str] = {}
# Fixed: tf_cnn_flatten, +1e-3 in the first Dense weight (B's error ~67x A's) was called
# equivalent: its noise, measured with the model's longest reduction for every weight and a 16x
# limit, excused it; the noise is now measured op by op (verify/onnx_noise.py, limit 4x).
COMPARE_MISS: dict[str, str] = {}


def _float_error(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return max(float(np.abs(o.astype(np.float64) - r).max())
               for o, r in zip(outs, refs, strict=True) if r.dtype.kind == "f")


def _verdicts(a: onnx.ModelProto, b: onnx.ModelProto, name: str) -> list[tuple[str, float, float]]:
    """compare(a, b) on fresh draws of the saved shapes: one draw given as ``inputs=``; a list
    of two draws, the second of large magnitude (x 100); and draws compare makes itself
    (``input_shape=``, ``seed=``). Each with (verdict, A's and B's float error vs the float64
    reference of ``a``) on the draw where B's error is largest relative to A's; compare's own
    draws are not seen here, so their errors are reported as (1, 0): never significant."""
    from fc2conv.verify.compare import compare

    def errors(feeds: dict[str, np.ndarray]) -> tuple[float, float]:
        ref = reference64(a, feeds)
        return _float_error(run_ort(a, feeds), ref), _float_error(run_ort(b, feeds), ref)

    out = []
    for k, (ins, _) in enumerate(foreign_draws(name)[1:]):
        feeds = _fresh(ins, seed=2000 + k)
        x = next(iter(feeds.values()))
        out.append((compare(a, b, inputs=x, layers=False).verdict, *errors(feeds)))
        large = {n: v * np.float32(100) for n, v in _fresh(ins, seed=3000 + k).items()}
        both = [errors(feeds), errors(large)]
        worst = max(both, key=lambda e: e[1] / max(e[0], 1e-300))
        pair = [(x,), (next(iter(large.values())),)]
        out.append((compare(a, b, inputs=pair, layers=False).verdict, *worst))
        own = compare(a, b, input_shape=x.shape, samples=2, seed=k)
        out.append((own.verdict, 1.0, 0.0))
    return out


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=COMPARE_FALSE_ALARM[n]))
    if n in COMPARE_FALSE_ALARM else n for n in NAMES
])
def test_compare_clean_to_conv_is_not_different(name: str) -> None:
    m = _load(name)
    for verdict, _, _ in _verdicts(m, to_conv(m), name):
        assert verdict in ("identical", "equivalent"), verdict


COMPARE_FALSE_ALARM_LINEAR: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=COMPARE_FALSE_ALARM_LINEAR[n]))
    if n in COMPARE_FALSE_ALARM_LINEAR else n for n in NAMES
])
def test_compare_clean_to_linear_is_not_different(name: str) -> None:
    conv = to_conv(_load(name))
    for verdict, _, _ in _verdicts(conv, to_linear(conv), name):
        assert verdict in ("identical", "equivalent"), verdict


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=COMPARE_MISS[n]))
    if n in COMPARE_MISS else n for n in NAMES
])
def test_compare_catches_one_changed_weight(name: str) -> None:
    """+1e-3 on element 0 of each dense/conv weight in turn (then to_conv): "different" on every
    draw where B's error vs float64 exceeds 10x A's on the given draw (compare's own draws are
    of the same shape and distribution, plus one of larger magnitude)."""
    m = _load(name)
    weights = [t.name for t in m.graph.initializer
               if len(t.dims) >= 2 and t.data_type == onnx.TensorProto.FLOAT]
    counted = 0
    for target in weights:
        bug = onnx.ModelProto()
        bug.CopyFrom(m)
        init = next(t for t in bug.graph.initializer if t.name == target)
        w = numpy_helper.to_array(init).copy()
        w.flat[0] += 1e-3
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        for verdict, err_a, err_b in _verdicts(m, to_conv(bug), name):
            if err_b > 10 * err_a:  # issue 9's rule: the bug's effect exceeds the rounding
                counted += 1
                assert verdict == "different", (target, verdict, err_a, err_b)
    assert counted, "the planted bugs never exceeded the rounding; plant them elsewhere"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from fc2conv.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out + err


CLI_DISAGREE: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=CLI_DISAGREE[n]))
    if n in CLI_DISAGREE else n for n in NAMES
])
def test_cli_convert_check_and_compare_agree(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = str(FOREIGN[name])
    dst = str(tmp_path / f"{name}.conv.onnx")
    code, out = _cli(capsys, "convert", src, dst, "--to", "conv")
    assert code == 0, out
    assert re.search(r"check \(onnxruntime\): (IDENTICAL|EQUIVALENT)", out), out
    shape = ",".join(str(d) for d in next(iter(foreign_draws(name)[1][0].values())).shape)
    code, out = _cli(capsys, "compare", src, dst, "--input-shape", shape, "--seed", "7")
    assert code == 0, out
