"""``to_conv(layout="ane")`` gives constant scalings to the 1x1 Convs (``onnx/rules/ane_fold.py``):

* a pre-norm's per-channel weight and bias, read only by the Q/K/V Convs, go into their kernels
  and biases; a post-norm's, also read by a residual Add, stay; a per-channel Mul that
  broadcasts a ``(B, 1, 1, S)`` value up to ``(B, C, 1, S)`` stays (folding it would change
  the Conv's input width);
* a query's / key's scalar scale (as SDPA exports write it, after the head split) is moved onto
  the Conv's output, where onnxruntime folds it into the kernel;
* the results match the float64 reference of the original (onnx's reference evaluator), and
  ``to_linear`` gives ``LayerNormalization`` back for both norms.
"""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from _onnx_helpers import assert_matches_reference, init, model, op_counts, vinfo
from onnx import helper, numpy_helper

from fc2conv.onnx import convert

B, S, C, H, F = 2, 6, 16, 4, 24
D = C // H


def _block(rng: np.random.Generator) -> onnx.ModelProto:
    """Pre-LN attention (scaled Q and K^T), a post-LN MLP whose norm also feeds the residual,
    and a per-position mean scaled per channel (``ReduceMean(r, -1) * g``) read by a MatMul."""
    inits = [init(rng, n, C, C) for n in ("wq", "wk", "wv", "wo", "w3")]
    inits += [init(rng, n, C) for n in ("bq", "bk", "bv", "bo", "ln_w", "ln_b", "ln2_w",
                                         "ln2_b", "g")]
    inits += [init(rng, "w1", C, F), init(rng, "b1", F), init(rng, "w2", F, C)]
    inits += [numpy_helper.from_array(np.asarray(v, dtype), n) for n, v, dtype in (
        ("split", [B, S, H, D], np.int64), ("merge", [B, S, C], np.int64),
        ("s", D ** -0.25, np.float32), ("ax", [-1], np.int64))]
    n = helper.make_node
    nodes = [n("LayerNormalization", ["x", "ln_w", "ln_b"], ["h"], axis=-1, epsilon=1e-5)]
    for p in "qkv":
        nodes += [n("MatMul", ["h", f"w{p}"], [f"{p}0"]), n("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                  n("Reshape", [f"{p}1", "split"], [f"{p}2"])]
    nodes += [
        n("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]), n("Mul", ["q", "s"], ["qs"]),
        n("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]), n("Mul", ["kt", "s"], ["ks"]),
        n("Transpose", ["v2"], ["v"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qs", "ks"], ["s0"]), n("Softmax", ["s0"], ["p"], axis=-1),
        n("MatMul", ["p", "v"], ["o0"]), n("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
        n("Reshape", ["o1", "merge"], ["o2"]), n("MatMul", ["o2", "wo"], ["o3"]),
        n("Add", ["o3", "bo"], ["o4"]), n("Add", ["x", "o4"], ["r1"]),
        n("LayerNormalization", ["r1", "ln2_w", "ln2_b"], ["n2"], axis=-1, epsilon=1e-5),
        n("MatMul", ["n2", "w1"], ["f0"]), n("Add", ["f0", "b1"], ["f1"]),
        n("Relu", ["f1"], ["f2"]), n("MatMul", ["f2", "w2"], ["f3"]),
        n("Add", ["n2", "f3"], ["y"]),
        n("ReduceMean", ["r1", "ax"], ["mu"], keepdims=1), n("Mul", ["mu", "g"], ["mg"]),
        n("MatMul", ["mg", "w3"], ["z"]),
    ]
    outputs = [vinfo("y", [B, S, C]), vinfo("z", [B, S, C])]
    return model(nodes, [vinfo("x", [B, S, C])], outputs, inits, opset=18)


def _graph(m: onnx.ModelProto) -> tuple[dict, dict, dict]:
    producer = {o: node for node in m.graph.node for o in node.output}
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in m.graph.node:
        for i in node.input:
            readers[i].append(node)
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return producer, readers, consts


def _ort_graph(m: onnx.ModelProto) -> onnx.ModelProto:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def test_scales_go_to_the_convs_and_the_result_matches_the_reference() -> None:
    rng = np.random.default_rng(11)
    m = _block(rng)
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    conv, _ = convert(m, "conv", layout="ane")
    producer, readers, consts = _graph(conv)

    # the pre-norm's weight and bias are in the Q/K/V kernels: three Convs read its Div; the
    # post-norm's (read by the MLP and by the residual) are in the MLP's first kernel too
    divs = [node for node in conv.graph.node if node.op_type == "Div"]
    assert sorted(sum(r.op_type == "Conv" for r in readers[d.output[0]]) for d in divs) == [1, 3]
    # the residual adds the post-norm times its weight (times sqrt(C): its variance is a
    # ReduceSumSquare, ane_norm.py), the same numbers; its bias went into the bias of the
    # residual's Conv (w2 had none: the bias is ln2_b itself)
    kept = [consts[i].reshape(-1) for node in conv.graph.node if node.op_type in ("Mul", "Add")
            for i in node.input if i in consts and consts[i].size == C]
    scaled = (weights["ln2_w"].astype(np.float64) * np.sqrt(C)).astype(np.float32)
    assert any(np.array_equal(k, scaled) for k in kept)
    assert not any(np.array_equal(k, weights["ln2_b"]) for k in kept)
    weighted = next(node for node in conv.graph.node if node.op_type == "Mul" and any(
        i in consts and np.array_equal(consts[i].reshape(-1), scaled) for i in node.input))
    (residual,) = readers[weighted.output[0]]
    w2_conv = next(producer[i] for i in residual.input if i != weighted.output[0])
    assert residual.op_type == "Add" and w2_conv.op_type == "Conv"
    assert np.array_equal(consts[w2_conv.input[2]], weights["ln2_b"])
    assert not any(np.array_equal(k, weights["ln_w"]) or np.array_equal(k, weights["ln_b"])
                   for k in kept)
    # the mean scaled up to C channels is not folded (its Conv reads C channels, it has 1)
    assert any(np.array_equal(k, weights["g"]) for k in kept)
    # both scalar scales read a Conv's output; none is left on a head view
    scales = [node for node in conv.graph.node if node.op_type == "Mul"
              and any(i in consts and consts[i].size == 1 for i in node.input)]
    assert len(scales) == 2
    assert all(producer[node.input[0]].op_type == "Conv" for node in scales)
    assert op_counts(conv)["Transpose"] == 3  # in; out to y and z

    # onnxruntime folds the moved scales into the Convs: no scalar Mul is left to run
    opt = _ort_graph(conv)
    ort_consts = {t.name for t in opt.graph.initializer
                  if int(np.prod(t.dims)) == 1}
    assert not any(node.op_type == "Mul" and set(node.input) & ort_consts
                   for node in opt.graph.node)

    for seed in (12, 13):
        x = np.random.default_rng(seed).standard_normal((B, S, C)).astype(np.float32)
        assert_matches_reference(m, conv, {"x": x}, depth=4 * F)


def test_to_linear_gives_both_norms_back() -> None:
    """The folded pre-norm is a ``LayerNormalization`` with a constant scale and no bias again
    (its affine map stays in the Q/K/V MatMuls), the post-norm one with its own weight and
    bias."""
    rng = np.random.default_rng(21)
    m = _block(rng)
    conv, _ = convert(m, "conv", layout="ane", verify=False)
    back, _ = convert(conv, "linear", verify=False)
    counts = op_counts(back)
    assert counts["LayerNormalization"] == 2 and counts["Conv"] == 0, counts
    norms = [node for node in back.graph.node if node.op_type == "LayerNormalization"]
    _, _, consts = _graph(back)
    assert sorted(len(node.input) for node in norms) == [2, 2]  # both biases are in MatMuls
    unit = next(node for node in norms if len(node.input) == 2)
    # a unit scale but for the 1/sqrt(C) of the variance's sum of squares (ane_norm.py), whose
    # sqrt(C) went into the Q/K/V kernels with the norm's weight
    unit_scale = np.full(C, 1 / np.sqrt(np.float64(C))).astype(np.float32)
    assert np.array_equal(consts[unit.input[1]], unit_scale)
    for seed in (22, 23):
        x = np.random.default_rng(seed).standard_normal((B, S, C)).astype(np.float32)
        assert_matches_reference(m, back, {"x": x}, depth=4 * F)


def test_a_models_own_conv_keeps_its_input_scale() -> None:
    """Only the Convs the pass made take a constant in: a model's own 1x1 Conv after a
    per-channel Mul (an NCHW input scaled per channel) is left as written."""
    rng = np.random.default_rng(31)
    inits = [init(rng, "k", 8, C, 1, 1), numpy_helper.from_array(
        rng.standard_normal((1, C, 1, 1)).astype(np.float32), "g")]
    n = helper.make_node
    nodes = [n("Mul", ["x", "g"], ["a"]), n("Conv", ["a", "k"], ["y"], kernel_shape=[1, 1])]
    m = model(nodes, [vinfo("x", [B, C, 3, 5])], [vinfo("y", [B, 8, 3, 5])], inits, opset=18)
    conv, _ = convert(m, "conv", layout="ane")
    assert op_counts(conv) == {"Mul": 1, "Conv": 1}
    x = rng.standard_normal((B, C, 3, 5)).astype(np.float32)
    assert_matches_reference(m, conv, {"x": x}, depth=C)


def test_a_post_norm_bias_stays_when_the_residual_adds_no_conv() -> None:
    """``y = n w + t`` read by a MatMul and by ``Add(y, x)`` with ``x`` no Conv of the pass
    (the model's input): ``t`` has no Conv bias to go to, so the ``Add`` of ``t`` stays (a
    residual over a Conv takes it, ``test_scales_go_to_the_convs_...``)."""
    rng = np.random.default_rng(41)
    inits = [init(rng, "w0", C, C), init(rng, "w1", C, C), init(rng, "g", C), init(rng, "t", C)]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w0"], ["a"]),
             n("LayerNormalization", ["a", "g", "t"], ["h"], axis=-1, epsilon=1e-5),
             n("MatMul", ["h", "w1"], ["c"]), n("Add", ["h", "x"], ["r"]),
             n("Add", ["r", "c"], ["y"])]
    m = model(nodes, [vinfo("x", [B, S, C])], [vinfo("y", [B, S, C])], inits, opset=18)
    conv, _ = convert(m, "conv", layout="ane")
    _, _, consts = _graph(conv)
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    shifts = [node for node in conv.graph.node if node.op_type == "Add" and any(
        i in consts and np.array_equal(consts[i].reshape(-1), weights["t"]) for i in node.input)]
    assert len(shifts) == 1
    for seed in (42, 43):
        x = np.random.default_rng(seed).standard_normal((B, S, C)).astype(np.float32)
        assert_matches_reference(m, conv, {"x": x}, depth=2 * C)
