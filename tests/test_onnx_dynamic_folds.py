"""The default layout's folds on a graph whose sizes are computed at run time (an export with a
dynamic batch and length): the head split / merge targets are ``Concat(Shape(x)[0], Shape(x)[1],
[H, D])``, the grouped-query ``Expand`` / ``Reshape`` targets and the rotary tables' slice come
from ``Shape`` too. ``to_conv`` must leave as few Transposes as on the same block with constant
sizes, ``to_linear`` must give the block's own Transpose / Reshape counts back, and both run at
sizes the probes never used, against a float64 numpy reference of the block written out here
(and onnx's reference evaluator on the original, in float64)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _onnx_helpers import F32_EPS, assert_matches_reference, model, op_counts, run_ort, vinfo
from onnx import helper, numpy_helper

from fc2conv.onnx import convert

C, H, KV, D, MAX_S = 16, 4, 2, 4, 64
# (batch, length) at which the graphs run: none is a probe size (7, 11 / 5, 13 ...)
SIZES = ((3, 9), (1, 6), (2, 8))


def _const(name: str, values: object, dtype: type = np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def _block(rng: np.random.Generator, dynamic: bool, rotary: bool, kv: int
           ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One pre-attention block ``x + Wo(attn(x))``: heads split / merged by Reshape +
    Transpose, optional rotary embedding (``rotate_half`` by Slice + Neg + Concat, tables
    sliced to the length), ``kv`` key/value heads repeated by Unsqueeze + Expand + Reshape.
    ``dynamic``: every target from ``Shape(x)`` (else constants for batch 2, length 8)."""
    n = helper.make_node
    rep = H // kv
    weights = {w: (rng.standard_normal((C, width)) / np.sqrt(C)).astype(np.float32)
               for w, width in (("wq", C), ("wk", kv * D), ("wv", kv * D), ("wo", C))}
    theta = np.arange(MAX_S)[:, None] * rng.random(D // 2)[None]
    theta = np.concatenate([theta, theta], axis=1)
    tables = {"cos": np.cos(theta).astype(np.float32), "sin": np.sin(theta).astype(np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in {**weights, **tables}.items()]
    inits += [_const("scale", 1 / np.sqrt(D), np.float32), _const("zero", [0]),
              _const("one", [1]), _const("axis0", [0]), _const("ax01", [0, 1]),
              _const("ax2", [2]), _const("h", [H]), _const("kv", [kv]), _const("d", [D]),
              _const("c", [C]), _const("rep", [rep]), _const("i0", 0), _const("i1", 1),
              _const("i2", 2), _const("half", [D // 2]), _const("end", [D]), _const("last", [-1])]
    nodes = []
    targets: dict[str, str] = {}

    def sizes_of(value: str, name: str, parts: list[str]) -> str:
        """A target computed as the exporters do: ``Concat`` of sizes read by ``Shape`` of the
        value being reshaped (``b``, ``s``: its first two sizes; ``s2``: its third) and
        constants; the constant target when not ``dynamic``."""
        if not dynamic:
            return targets[name]
        nodes.extend([n("Shape", [value], [f"{name}_sh"]),
                      n("Gather", [f"{name}_sh", "i0"], [f"{name}_b0"]),
                      n("Gather", [f"{name}_sh", "i1" if "s" in parts else "i2"],
                        [f"{name}_s0"]),
                      n("Unsqueeze", [f"{name}_b0", "axis0"], [f"{name}_b"]),
                      n("Unsqueeze", [f"{name}_s0", "axis0"], [f"{name}_s"]),
                      n("Concat", [f"{name}_{p}" if p in ("b", "s") else
                                   f"{name}_s" if p == "s2" else p for p in parts],
                        [name], axis=0)])
        return name

    if dynamic:
        nodes += [n("Shape", ["x"], ["sh"]), n("Gather", ["sh", "i1"], ["s0"]),
                  n("Unsqueeze", ["s0", "axis0"], ["s"]),
                  n("Slice", ["cos", "zero", "s", "axis0"], ["cos_s"]),
                  n("Slice", ["sin", "zero", "s", "axis0"], ["sin_s"])]
    else:
        b, s = 2, 8
        inits += [_const("split_q", [b, s, H, D]), _const("split_kv", [b, s, kv, D]),
                  _const("merge", [b, s, C]), numpy_helper.from_array(
                      tables["cos"][:s], "cos_s"), numpy_helper.from_array(
                      tables["sin"][:s], "sin_s")]
        targets.update({k: k for k in ("split_q", "split_kv", "merge")})
        for t in ("kt", "ktr", "vt"):
            inits += [_const(f"{t}_expand", [b, kv, rep, s, D]), _const(f"{t}_heads", [b, H, s, D])]
            targets.update({f"{t}_expand": f"{t}_expand", f"{t}_heads": f"{t}_heads"})
    nodes += [n("Unsqueeze", ["cos_s", "ax01"], ["cos4"]),
              n("Unsqueeze", ["sin_s", "ax01"], ["sin4"])]
    for t, split, heads in (("q", "split_q", "h"), ("k", "split_kv", "kv"),
                            ("v", "split_kv", "kv")):
        nodes.append(n("MatMul", ["x", f"w{t}"], [f"{t}p"]))
        target = sizes_of(f"{t}p", split if not dynamic else f"{t}_split", ["b", "s", heads, "d"])
        nodes += [n("Reshape", [f"{t}p", target], [f"{t}h"]),
                  n("Transpose", [f"{t}h"], [f"{t}t"], perm=[0, 2, 1, 3])]

    def rotate(t: str) -> str:
        if not rotary:
            return t
        nodes.extend([n("Slice", [t, "zero", "half", "last"], [f"{t}1"]),
                      n("Slice", [t, "half", "end", "last"], [f"{t}2"]),
                      n("Neg", [f"{t}2"], [f"{t}2n"]),
                      n("Concat", [f"{t}2n", f"{t}1"], [f"{t}rh"], axis=-1),
                      n("Mul", [t, "cos4"], [f"{t}c"]), n("Mul", [f"{t}rh", "sin4"], [f"{t}s"]),
                      n("Add", [f"{t}c", f"{t}s"], [f"{t}r"])])
        return f"{t}r"

    def grouped(t: str) -> str:
        if kv == H:
            return t
        expand = sizes_of(t, f"{t}_expand", ["b", "kv", "rep", "s2", "d"])
        nodes.extend([n("Unsqueeze", [t, "ax2"], [f"{t}u"]),
                      n("Expand", [f"{t}u", expand], [f"{t}e"])])
        heads = sizes_of(t, f"{t}_heads", ["b", "h", "s2", "d"])
        nodes.append(n("Reshape", [f"{t}e", heads], [f"{t}g"]))
        return f"{t}g"

    q, k, v = rotate("qt"), grouped(rotate("kt")), grouped("vt")
    nodes += [n("Transpose", [k], ["kT"], perm=[0, 1, 3, 2]), n("Mul", [q, "scale"], ["qs"]),
              n("MatMul", ["qs", "kT"], ["sc"]), n("Softmax", ["sc"], ["pr"], axis=-1),
              n("MatMul", ["pr", v], ["o"]), n("Transpose", ["o"], ["om"], perm=[0, 2, 1, 3])]
    merge = sizes_of("om", "merge", ["b", "s", "c"])
    nodes += [n("Reshape", ["om", merge], ["omr"]), n("MatMul", ["omr", "wo"], ["y0"]),
              n("Add", ["x", "y0"], ["y"])]
    dims = ["batch", "length", C] if dynamic else [2, 8, C]
    return model(nodes, [vinfo("x", dims)], [vinfo("y", dims)], inits), {**weights, **tables}


def _numpy64(x: np.ndarray, p: dict[str, np.ndarray], rotary: bool, kv: int) -> np.ndarray:
    """The block in float64, written out with einsum (independent of any graph)."""
    x = x.astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in p.items()}
    b, s, _ = x.shape

    def heads(t: np.ndarray, n: int) -> np.ndarray:  # (B, S, n*D) -> (B, n, S, D)
        return t.reshape(b, s, n, D).transpose(0, 2, 1, 3)

    def rot(t: np.ndarray) -> np.ndarray:
        if not rotary:
            return t
        half = np.concatenate([-t[..., D // 2:], t[..., :D // 2]], axis=-1)
        return t * w["cos"][:s] + half * w["sin"][:s]

    q = rot(heads(np.einsum("bsc,ce->bse", x, w["wq"]), H))
    k = np.repeat(rot(heads(np.einsum("bsc,ce->bse", x, w["wk"]), kv)), H // kv, axis=1)
    v = np.repeat(heads(np.einsum("bsc,ce->bse", x, w["wv"]), kv), H // kv, axis=1)
    scores = np.einsum("bhid,bhjd->bhij", q / np.sqrt(D), k)
    prob = np.exp(scores - scores.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum("bhij,bhjd->bhid", prob, v).transpose(0, 2, 1, 3).reshape(b, s, C)
    return x + np.einsum("bsc,ce->bse", o, w["wo"])


CASES = {"plain": (False, H), "rotary": (True, H), "rotary, grouped K/V": (True, KV)}
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")


@pytest.mark.parametrize("case", sorted(CASES))
def test_dynamic_block_folds_as_the_static_one(case: str) -> None:
    rotary, kv = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    m, params = _block(rng, True, rotary, kv)
    static, _ = _block(np.random.default_rng(0), False, rotary, kv)
    conv, report = convert(m, "conv", verify=False)
    static_conv, _ = convert(static, "conv", verify=False)
    onnx.checker.check_model(conv, full_check=True)
    # as many Transposes as with constant sizes: the head split, merge and rotary folds all
    # applied (before they read run-time sizes: 11 in each case, against 4 to 6)
    assert op_counts(conv)["Transpose"] == op_counts(static_conv)["Transpose"], \
        "\n".join(report.layout_changes)
    back, report = convert(conv, "linear", verify=False)
    before, after = op_counts(m), op_counts(back)
    assert all(after[k] <= before[k] for k in LAYOUT_OPS), (before, after)
    for seed, (b, s) in enumerate(SIZES, start=11):  # fresh inputs at sizes never probed
        x = np.random.default_rng(seed).standard_normal((b, s, C)).astype(np.float32)
        want = _numpy64(x, params, rotary, kv)
        tol = 8 * F32_EPS * 4 * C * max(1.0, float(np.abs(want).max()))
        for g in (m, conv, back):
            got = run_ort(g, {"x": x})[0]
            assert got.shape == want.shape
            assert float(np.abs(got - want).max()) <= tol
        assert_matches_reference(m, conv, {"x": x}, depth=4 * C)
        # the same products and sums: onnxruntime's results are bit-identical
        assert np.array_equal(run_ort(conv, {"x": x})[0], run_ort(m, {"x": x})[0]) or rotary


def test_shape_readers_of_a_removed_move_read_its_input() -> None:
    """A model that also reads ``Shape`` of the head-split value (the exporter's size checks)
    keeps those sizes right after the move it read is gone: the block's output at another
    size and its ``Shape`` output agree with the reference."""
    m, params = _block(np.random.default_rng(7), True, False, H)
    plain, _ = convert(m, "conv", verify=False)
    extra = [helper.make_node("Shape", ["qt"], ["qt_shape"])]
    m.graph.node.extend(extra)
    m.graph.output.append(vinfo("qt_shape", [4], onnx.TensorProto.INT64))
    conv, _ = convert(m, "conv", verify=False)
    static, _ = convert(_block(np.random.default_rng(0), False, False, H)[0], "conv",
                        verify=False)
    assert op_counts(conv)["Transpose"] == op_counts(plain)["Transpose"] \
        == op_counts(static)["Transpose"]
    x = np.random.default_rng(3).standard_normal((3, 9, C)).astype(np.float32)
    y, shape = run_ort(conv, {"x": x})
    assert list(shape) == [3, H, 9, D]
    want = _numpy64(x, params, False, H)
    assert float(np.abs(y - want).max()) <= 8 * F32_EPS * 4 * C * max(1.0, np.abs(want).max())
