"""Rotary embeddings computed in the layout the converted Q/K have
(:mod:`fc2conv.onnx.rules.swap_sink`), on hand-built rotary attention blocks: the moves that go,
the result against onnx's float64 reference evaluator of the original on fresh inputs, the
same bits as the conversion without the rule, and ``to_linear`` back to the model's own
Transposes and Reshapes."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_matches_reference, model, op_counts, run_ort, vinfo
from onnx import helper, numpy_helper

from fc2conv.onnx import convert
from fc2conv.onnx.rules.swap_sink import SWAPPED_KEY

# fc2conv.onnx's ``convert`` function hides its module of the same name
convert_module = importlib.import_module("fc2conv.onnx.convert")

B, S, H, D = 2, 5, 4, 6
C = H * D


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _rotary_block(rng: np.random.Generator, *, layers: int = 2, kv_heads: int = H,
                  split: bool = False, tables: str = "constant") -> onnx.ModelProto:
    """``layers`` pre-projection attention blocks with rotary Q/K as Llama's exports write them:
    head split ``Transpose(Reshape(x @ W), (0, 2, 1, 3))``, ``x * cos + rotate_half(x) * sin``
    (``rotate_half`` by two Slices, or one Split, a Neg and a Concat), grouped K/V heads
    expanded by ``Unsqueeze -> Expand -> Reshape`` when ``kv_heads < H``, ``K^T`` by a swap,
    ``softmax(q * s @ K^T) @ V``, head merge and output projection, a residual Add.

    ``tables``: ``"constant"`` (``(1, 1, S, D)`` initializers), ``"folded"`` (``Unsqueeze(
    Cast(Cos(theta)))`` of a constant ``theta``, as the TorchScript exporter writes them) or
    ``"input"`` (``(1, S, D)`` graph inputs, computed by the caller at run time)."""
    n = helper.make_node
    nodes: list[onnx.NodeProto] = []
    inits = [_ints("split_q", [B, S, H, D]), _ints("split_kv", [B, S, kv_heads, D]),
             _ints("merge", [B, S, C]), _ints("ax1", [1]), _ints("ax2", [2]),
             _ints("rep", [B, kv_heads, H // kv_heads, S, D]),
             _ints("heads", [B, H, S, D]), _ints("s0", [0]), _ints("s1", [D // 2]),
             _ints("s2", [1 << 62]), _ints("ax3", [3]), _ints("halves", [D // 2, D // 2]),
             numpy_helper.from_array(np.asarray(D ** -0.5, np.float32), "scale")]
    inputs = [vinfo("x", [B, S, C])]
    inv_freq = (1.0 / 100.0 ** (np.arange(D // 2) / (D // 2))).astype(np.float32)
    freqs = np.concatenate([inv_freq, inv_freq])
    if tables == "constant":
        theta = np.arange(S, dtype=np.float32)[:, None] * freqs[None]
        inits += [numpy_helper.from_array(np.cos(theta)[None, None], "cos"),
                  numpy_helper.from_array(np.sin(theta)[None, None], "sin")]
    elif tables == "folded":
        theta = (np.arange(S, dtype=np.float32)[:, None] * freqs[None])[None]
        inits.append(numpy_helper.from_array(theta.astype(np.float64), "theta"))
        for f in ("Cos", "Sin"):
            low = f.lower()
            nodes += [n(f, ["theta"], [f"{low}3"]),
                      n("Cast", [f"{low}3"], [f"{low}3f"], to=onnx.TensorProto.FLOAT),
                      n("Unsqueeze", [f"{low}3f", "ax1"], [low])]
    else:  # the (1, S, D) tables a model's rotary module computes from its positions
        inputs += [vinfo("cos3", [1, S, D]), vinfo("sin3", [1, S, D])]
        nodes += [n("Unsqueeze", [f"{t}3", "ax1"], [t]) for t in ("cos", "sin")]

    def rotary(t: str) -> str:
        if split:
            nodes.append(n("Split", [t, "halves"], [f"{t}_a", f"{t}_b"], axis=-1))
        else:
            nodes.extend([n("Slice", [t, "s0", "s1", "ax3"], [f"{t}_a"]),
                          n("Slice", [t, "s1", "s2", "ax3"], [f"{t}_b"])])
        nodes.extend([n("Neg", [f"{t}_b"], [f"{t}_nb"]),
                      n("Concat", [f"{t}_nb", f"{t}_a"], [f"{t}_rot"], axis=-1),
                      n("Mul", [t, "cos"], [f"{t}_c"]), n("Mul", [f"{t}_rot", "sin"], [f"{t}_s"]),
                      n("Add", [f"{t}_c", f"{t}_s"], [f"{t}_r"])])
        return f"{t}_r"

    def grouped(t: str) -> str:
        if kv_heads == H:
            return t
        nodes.extend([n("Unsqueeze", [t, "ax2"], [f"{t}_u"]),
                      n("Expand", [f"{t}_u", "rep"], [f"{t}_e"]),
                      n("Reshape", [f"{t}_e", "heads"], [f"{t}_g"])])
        return f"{t}_g"

    x = "x"
    for i in range(layers):
        p = f"l{i}"
        for w, width in (("wq", C), ("wk", kv_heads * D), ("wv", kv_heads * D), ("wo", C)):
            inits.append(numpy_helper.from_array(
                (rng.standard_normal((C, width)) / np.sqrt(C)).astype(np.float32), f"{p}{w}"))
        for t, split_shape in (("q", "split_q"), ("k", "split_kv"), ("v", "split_kv")):
            nodes.extend([n("MatMul", [x, f"{p}w{t}"], [f"{p}{t}"]),
                          n("Reshape", [f"{p}{t}", split_shape], [f"{p}{t}h"]),
                          n("Transpose", [f"{p}{t}h"], [f"{p}{t}t"], perm=[0, 2, 1, 3])])
        q, k = rotary(f"{p}qt"), grouped(rotary(f"{p}kt"))
        v = grouped(f"{p}vt")
        nodes.extend([
            n("Transpose", [k], [f"{p}kT"], perm=[0, 1, 3, 2]),
            n("Mul", [q, "scale"], [f"{p}qs"]),
            n("MatMul", [f"{p}qs", f"{p}kT"], [f"{p}sc"]),
            n("Softmax", [f"{p}sc"], [f"{p}pr"], axis=-1),
            n("MatMul", [f"{p}pr", v], [f"{p}o"]),
            n("Transpose", [f"{p}o"], [f"{p}om"], perm=[0, 2, 1, 3]),
            n("Reshape", [f"{p}om", "merge"], [f"{p}omr"]),
            n("MatMul", [f"{p}omr", f"{p}wo"], [f"{p}y"]),
            n("Add", [x, f"{p}y"], [f"{p}out"])])
        x = f"{p}out"
    nodes.append(n("Identity", [x], ["y"]))
    return model(nodes, inputs, [vinfo("y", [B, S, C])], inits, opset=17)


def _feeds(rng: np.random.Generator, m: onnx.ModelProto) -> dict[str, np.ndarray]:
    feeds = {"x": rng.standard_normal((B, S, C)).astype(np.float32)}
    if any(i.name == "cos3" for i in m.graph.input):
        theta = (np.arange(S) + rng.integers(0, 100))[:, None] * rng.random(D)[None]
        feeds["cos3"] = np.cos(theta)[None].astype(np.float32)
        feeds["sin3"] = np.sin(theta)[None].astype(np.float32)
    return feeds


def _without_rule(m: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> onnx.ModelProto:
    with monkeypatch.context() as patch:
        patch.setattr(convert_module, "sink_swaps", lambda ctx: 0)
        return convert(m, "conv")[0]


def _swapped(m: onnx.ModelProto) -> int:
    return sum(any(p.key == SWAPPED_KEY for p in node.metadata_props) for node in m.graph.node)


CASES = {
    "slices, constant tables": {},
    "split, grouped K/V": {"split": True, "kv_heads": 2},
    "folded tables, one K/V head": {"tables": "folded", "kv_heads": 1},
    "tables from an input": {"tables": "input"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rotary_computed_where_the_conv_wrote(case: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    rng = np.random.default_rng(sorted(CASES).index(case))
    m = _rotary_block(rng, **CASES[case])
    before = _without_rule(m, monkeypatch)
    conv, report = convert(m, "conv")
    onnx.checker.check_model(conv, full_check=True)
    assert _swapped(conv) > 0 and _swapped(before) == 0
    t_before, t_after = op_counts(before)["Transpose"], op_counts(conv)["Transpose"]
    # per layer: the query's and the key's head-split moves go, and K^T's swap with the key's;
    # the query's result moves into its MatMul (onnxruntime's FusedMatMul takes it, transA)
    assert t_after == t_before - 2 * 2 + (2 if CASES[case].get("tables") == "input" else 0), \
        report.layout_changes
    for seed in (21, 22):  # fresh inputs: float64 reference of the original, same bits as before
        feeds = _feeds(np.random.default_rng(seed), m)
        assert_matches_reference(m, conv, feeds, depth=2 * 2 * C)
        assert np.array_equal(run_ort(conv, feeds)[0], run_ort(before, feeds)[0])
    back, _ = convert(conv, "linear")
    assert _swapped(back) == 0
    for op in ("Transpose", "Reshape"):  # a single K/V head's moves are of a unit axis: fewer
        assert op_counts(back)[op] <= op_counts(m)[op], (op, op_counts(m), op_counts(back))
    if CASES[case].get("kv_heads", H) > 1:
        assert op_counts(back)["Transpose"] == op_counts(m)["Transpose"]
    assert not any(node.op_type == "Conv" for node in back.graph.node)
    assert_matches_reference(m, back, _feeds(np.random.default_rng(23), m), depth=2 * 2 * C)


def test_a_region_that_gains_nothing_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer whose tables come from an input: the two table moves would cost what the two
    head-split moves save (K^T's swap goes into a MatMul, free already), so nothing changes."""
    m = _rotary_block(np.random.default_rng(5), layers=1, tables="input")
    before = _without_rule(m, monkeypatch)
    conv, _ = convert(m, "conv")
    assert _swapped(conv) == 0
    assert op_counts(conv) == op_counts(before)


def test_ort_runs_no_head_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """What onnxruntime runs after its optimizer: one move into each layer's projections and
    one out of its output projection, no head move (before the rule: some rotary Q/K moves
    were left; the original runs its own head splits and merges), and every attention product
    takes its swapped operand as FusedMatMul's ``transA`` / ``transB``."""
    import os
    import tempfile

    import onnxruntime as ort

    m = _rotary_block(np.random.default_rng(9), layers=2)
    conv, _ = convert(m, "conv")
    counts = []
    for graph in (m, _without_rule(m, monkeypatch), conv):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        with tempfile.TemporaryDirectory() as tmp:
            opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
            ort.InferenceSession(graph.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
            counts.append(op_counts(onnx.load(opts.optimized_model_filepath)))
    original, before, after = counts
    assert after["Transpose"] == 2 * 2 < before["Transpose"] < original["Transpose"], counts
    assert after["FusedMatMul"] == 2 * 2 and after["MatMul"] == 0, after


def _unread(m: onnx.ModelProto) -> set[str]:
    """Initializers and Constant-node outputs no node and no graph output reads."""
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    consts = {t.name for t in m.graph.initializer} | {
        n.output[0] for n in m.graph.node if n.op_type == "Constant"}
    return consts - read


def test_constants_the_conversion_orphaned_are_dropped() -> None:
    """The head splits' and merges' shapes, replaced by the conversion, are not left in the
    written graph (before: ``split_q``, ``split_kv`` and ``merge`` stayed, onnxruntime said
    "Removing initializer"); a Constant node likewise; what the input left unread stays."""
    m = _rotary_block(np.random.default_rng(4), layers=1)
    nodes = list(m.graph.node)
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "merge"))
    nodes.insert(0, helper.make_node("Constant", [], ["merge"], value=_ints("v", [B, S, C])))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    unread = _unread(m)
    assert {"split_q", "split_kv", "merge"}.isdisjoint(unread) and "heads" in unread
    for graph in (convert(m, "conv")[0], convert(m, "conv", layout="ane")[0]):
        assert _unread(graph) == unread, _unread(graph) - unread
        assert {"split_q", "split_kv", "merge"}.isdisjoint(
            {t.name for t in graph.graph.initializer} | {
                o for n in graph.graph.node for o in n.output})
