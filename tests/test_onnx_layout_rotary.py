"""``to_conv(layout="ane")`` on rotary attention whose cos/sin tables are computed at run time
(torch 2.11's exporter and any export with a dynamic length: ``inv_freq`` times the positions,
``Transpose``, ``Concat(f, f)``, ``Cos``/``Sin``, a scale, ``Cast``, then one ``Unsqueeze`` per
layer): each table is moved into the conv layout once, where it is computed, not once per
reader. Built with onnx.helper, checked against onnx's float64 reference evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_matches_reference, init, model, op_counts, vinfo
from onnx import TensorProto, helper, numpy_helper

from fc2conv.onnx import convert

B, S, H, D = 2, 5, 2, 4
C = H * D
LAYERS = 2
# the longest chain of rounded sums: per layer a projection, the scores, P V, the output
DEPTH = LAYERS * (2 * C + D + S)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _rotary_stack(rng: np.random.Generator, expand_shape_at_run_time: bool) -> onnx.ModelProto:
    n = helper.make_node
    inv_freq = 1.0 / (10000 ** (np.arange(0, D, 2, dtype=np.float32) / D))
    inits = [numpy_helper.from_array(inv_freq.reshape(1, D // 2, 1), "inv_freq"),
             _ints("ax0", [0]), _ints("ax1", [1]), _ints("split", [0, 0, H, D]),
             _ints("merge", [0, 0, C]), _ints("half0", [0]), _ints("half1", [D // 2]),
             _ints("end", [D]), _ints("last", [-1]),
             numpy_helper.from_array(np.float32(1.0), "scaling"),
             numpy_helper.from_array(np.float32(D ** -0.5), "scale")]
    nodes = []
    if expand_shape_at_run_time:  # inv_freq[None, :, None].expand(B, -1, 1): a runtime shape
        inits.append(_ints("tail", [D // 2, 1]))
        nodes += [n("Shape", ["position_ids"], ["pshape"], end=1),
                  n("Concat", ["pshape", "tail"], ["fshape"], axis=0),
                  n("Expand", ["inv_freq", "fshape"], ["inv_e"])]
    else:
        nodes.append(n("Identity", ["inv_freq"], ["inv_e"]))
    nodes += [
        n("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["pos_f", "ax1"], ["pos_e"]),  # (B, 1, S)
        n("MatMul", ["inv_e", "pos_e"], ["freqs_t"]),  # (B, D/2, S)
        n("Transpose", ["freqs_t"], ["freqs"], perm=[0, 2, 1]),
        n("Concat", ["freqs", "freqs"], ["emb"], axis=-1),  # (B, S, D)
        n("Cos", ["emb"], ["cos0"]), n("Mul", ["cos0", "scaling"], ["cos1"]),
        n("Cast", ["cos1"], ["cos"], to=TensorProto.FLOAT),
        n("Sin", ["emb"], ["sin0"]), n("Mul", ["sin0", "scaling"], ["sin1"]),
        n("Cast", ["sin1"], ["sin"], to=TensorProto.FLOAT),
    ]
    x = "x"
    for i in range(LAYERS):
        inits += [init(rng, f"w{p}{i}", C, C) for p in "qkvo"]
        L = f"l{i}_"  # noqa: N806
        nodes += [n("Unsqueeze", ["cos", "ax1"], [L + "cos"]),  # (B, 1, S, D), per layer
                  n("Unsqueeze", ["sin", "ax1"], [L + "sin"])]
        for p in "qkv":
            nodes += [n("MatMul", [x, f"w{p}{i}"], [L + p + "0"]),
                      n("Reshape", [L + p + "0", "split"], [L + p + "1"]),
                      n("Transpose", [L + p + "1"], [L + p], perm=[0, 2, 1, 3])]  # (B, H, S, D)
        for p in "qk":  # x * cos + rotate_half(x) * sin
            nodes += [n("Mul", [L + p, L + "cos"], [L + p + "c"]),
                      n("Slice", [L + p, "half0", "half1", "last"], [L + p + "a"]),
                      n("Slice", [L + p, "half1", "end", "last"], [L + p + "b"]),
                      n("Neg", [L + p + "b"], [L + p + "nb"]),
                      n("Concat", [L + p + "nb", L + p + "a"], [L + p + "r"], axis=-1),
                      n("Mul", [L + p + "r", L + "sin"], [L + p + "s"]),
                      n("Add", [L + p + "c", L + p + "s"], [L + p + "rot"])]
        nodes += [n("Transpose", [L + "krot"], [L + "kt"], perm=[0, 1, 3, 2]),
                  n("MatMul", [L + "qrot", L + "kt"], [L + "s0"]),
                  n("Mul", [L + "s0", "scale"], [L + "s1"]),
                  n("Softmax", [L + "s1"], [L + "p"], axis=-1),
                  n("MatMul", [L + "p", L + "v"], [L + "o0"]),
                  n("Transpose", [L + "o0"], [L + "o1"], perm=[0, 2, 1, 3]),
                  n("Reshape", [L + "o1", "merge"], [L + "o2"]),
                  n("MatMul", [L + "o2", f"wo{i}"], [L + "o3"]),
                  n("Add", [x, L + "o3"], [L + "out"])]
        x = L + "out"
    nodes.append(n("Identity", [x], ["y"]))
    inputs = [vinfo("x", [B, S, C]), vinfo("position_ids", [B, S], TensorProto.INT64)]
    return model(nodes, inputs, [vinfo("y", [B, S, C])], inits, opset=18)


def _feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    start = rng.integers(0, 50, size=(B, 1))
    return {"x": rng.standard_normal((B, S, C)).astype(np.float32),
            "position_ids": (start + np.arange(S)).astype(np.int64)}


@pytest.mark.parametrize("expand_shape_at_run_time", [False, True])
def test_runtime_rotary_tables_move_once(expand_shape_at_run_time: bool) -> None:
    rng = np.random.default_rng(11)
    m = _rotary_stack(rng, expand_shape_at_run_time)
    conv, report = convert(m, "conv", layout="ane", verify=False)
    counts = op_counts(conv)
    assert counts["Conv"] == 4 * LAYERS and counts["Einsum"] == 2 * LAYERS
    # one move in (x) and one out (y); the tables need none: their Transpose(MatMul) is undone
    assert counts["Transpose"] == 2, "\n".join(report.layout_changes)
    assert report.transposes_before == 5 * LAYERS + 1
    onnx.checker.check_model(conv, full_check=True)
    for seed in (1, 2):
        feeds = _feeds(np.random.default_rng(seed))
        assert_matches_reference(m, conv, feeds, depth=DEPTH)
    back, _ = convert(conv, "linear", verify=False)
    after = op_counts(back)
    assert after["Transpose"] <= op_counts(m)["Transpose"] and after["Einsum"] == 0
    assert_matches_reference(m, back, _feeds(np.random.default_rng(3)), depth=DEPTH)


def test_a_table_read_from_a_graph_input_moves_once() -> None:
    """The tables come in as a graph input (B, S, D): one move for it, shared by every layer's
    Unsqueeze, however many layers read it."""
    rng = np.random.default_rng(12)
    m = _rotary_stack(rng, False)
    g = m.graph
    keep = [nd for nd in g.node if nd.output[0] not in {"cos0", "cos1", "cos"}]
    del g.node[:]
    g.node.extend(keep)
    g.input.append(vinfo("cos", [B, S, D]))
    onnx.checker.check_model(m, full_check=True)
    conv, report = convert(m, "conv", layout="ane", verify=False)
    assert op_counts(conv)["Transpose"] == 3, "\n".join(report.layout_changes)  # x, cos; y
    assert any("reads input cos" in c for c in report.layout_changes)
    feeds = _feeds(np.random.default_rng(4))
    feeds["cos"] = np.random.default_rng(5).standard_normal((B, S, D)).astype(np.float32)
    assert_matches_reference(m, conv, feeds, depth=DEPTH)


def _grouped_kv_block(rng: np.random.Generator) -> onnx.ModelProto:
    """Grouped K/V as torch's dynamo exporter writes it: K (B, Hkv, S, D) -> Unsqueeze ->
    Expand (B, Hkv, n, S, D) -> Reshape (B*H, S, D) -> Transpose -> Reshape (B, H, D, S)."""
    n = helper.make_node
    hkv, rep = 1, H
    inits = [init(rng, "wq", C, C), init(rng, "wk", C, hkv * D), init(rng, "wv", C, hkv * D),
             init(rng, "wo", C, C), _ints("ax2", [2]), _ints("qs", [0, 0, H, D]),
             _ints("kvs", [0, 0, hkv, D]), _ints("exp", [B, hkv, rep, S, D]),
             _ints("flat", [B * H, S, D]), _ints("kt4", [B, H, D, S]),
             _ints("vshape", [B, H, S, D]), _ints("merge", [0, 0, C]),
             numpy_helper.from_array(np.float32(D ** -0.5), "scale")]
    nodes = [n("MatMul", ["x", "wq"], ["q0"]), n("Reshape", ["q0", "qs"], ["q1"]),
             n("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3])]
    for p in "kv":
        nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"]), n("Reshape", [f"{p}0", "kvs"], [f"{p}1"]),
                  n("Transpose", [f"{p}1"], [f"{p}2"], perm=[0, 2, 1, 3]),
                  n("Unsqueeze", [f"{p}2", "ax2"], [f"{p}3"]),
                  n("Expand", [f"{p}3", "exp"], [f"{p}4"])]
    nodes += [n("Reshape", ["k4", "flat"], ["k5"]), n("Transpose", ["k5"], ["k6"], perm=[0, 2, 1]),
              n("Reshape", ["k6", "kt4"], ["kt"]), n("Reshape", ["v4", "vshape"], ["v"]),
              n("Mul", ["q", "scale"], ["qs1"]), n("MatMul", ["qs1", "kt"], ["s"]),
              n("Softmax", ["s"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["o0"]),
              n("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
              n("Reshape", ["o1", "merge"], ["o2"]), n("MatMul", ["o2", "wo"], ["y"])]
    return model(nodes, [vinfo("x", [B, S, C])], [vinfo("y", [B, S, C])], inits, opset=18)


def test_dynamo_grouped_kv_stays_in_the_ane_layout() -> None:
    """The run-merging and splitting Reshapes are done on the stored axes: one move in, one
    out (before: 4, a Transpose on each side of the rank-5 Reshape), and back again cleanly."""
    m = _grouped_kv_block(np.random.default_rng(21))
    conv, report = convert(m, "conv", layout="ane", verify=False)
    assert op_counts(conv)["Transpose"] == 2, "\n".join(report.layout_changes)
    feeds = {"x": np.random.default_rng(22).standard_normal((B, S, C)).astype(np.float32)}
    assert_matches_reference(m, conv, feeds, depth=2 * C + D + S)
    back, _ = convert(conv, "linear", verify=False)
    assert op_counts(back)["Transpose"] <= op_counts(m)["Transpose"]
    assert op_counts(back)["Reshape"] <= op_counts(m)["Reshape"]
    assert_matches_reference(m, back, feeds, depth=2 * C + D + S)
