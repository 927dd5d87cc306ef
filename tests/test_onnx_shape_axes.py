"""Axis maps (:mod:`fc2conv.onnx.rules.shape_axes`) and the ane pass on sizes computed at run
time: a Reshape of a twin by the stored-order target is the original Reshape, checked on
numpy arrays; a hand-built attention block whose head split / merge targets are computed from
``Shape(x)`` (with a ``0`` "copy" element and with ``allowzero=1``) stays in ``(B, C, 1, S)``
and matches the float64 reference of the original at sizes the graph was not built with."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _onnx_helpers import F32_EPS, init, model, op_counts, reference64, run_ort, vinfo
from onnx import helper

from fc2conv.onnx import to_conv, to_linear
from fc2conv.onnx.rules.shape_axes import (
    ACT,
    arranged_for,
    axes_of,
    groups,
    logical_order,
    reshape_axes,
)

LINEAR_ACT = (0, 3, 1)  # the linear pass's twin (B, S, C) of (B, C, 1, S)


def _stored(x: np.ndarray, axes: tuple[int | None, ...]) -> np.ndarray:
    """The twin of ``x`` under ``axes``: logical units it does not store squeezed, the stored
    axes in order, its own unit axes inserted."""
    kept = [a for a in axes if a is not None]
    dropped = [i for i in range(x.ndim) if i not in kept]
    assert all(x.shape[i] == 1 for i in dropped)
    y = np.transpose(x, kept + dropped).reshape([x.shape[a] for a in kept])
    for q, a in enumerate(axes):
        if a is None:
            y = np.expand_dims(y, q)
    return y


CASES = [  # (map of x', logical shape of x, logical target, the pass's act map)
    (ACT, (2, 5, 12), (2, 5, 3, 4), ACT),  # head split
    (axes_of((0, 3, 1, 2)), (2, 5, 3, 4), (2, 5, 12), ACT),  # head merge
    (axes_of((0, 1, 2, 4, 3)), (2, 3, 2, 5, 4), (2, 6, 5, 4), ACT),  # grouped K/V
    (axes_of((0, 1, 3, 2)), (2, 3, 5, 4), (6, 5, 4), ACT),  # heads into the batch
    (LINEAR_ACT, (2, 12, 1, 5), (2, 3, 4, 5), LINEAR_ACT),  # the way back: head split
    (axes_of((0, 2, 3, 1)), (2, 3, 4, 5), (2, 12, 1, 5), LINEAR_ACT),  # and merge
]


@pytest.mark.parametrize(("axes", "shape", "target", "act"), CASES)
def test_reshape_of_the_twin_is_the_reshape(axes, shape, target, act) -> None:
    rng = np.random.default_rng(len(shape) * 10 + len(target))
    x = rng.standard_normal(shape)
    runs = groups(shape, target)
    assert runs is not None
    units = {i for i, d in enumerate(target) if d == 1}
    new = reshape_axes(axes, runs, units, act)
    twin = _stored(x, axes)
    if new is None:  # one Transpose of the twin first
        order = arranged_for(axes, runs, units, act)
        assert order is not None
        twin = np.transpose(twin, order)
        axes = tuple(axes[q] for q in order)
        new = reshape_axes(axes, runs, units, act)
        assert new is not None
    stored_target = [1 if a is None else target[a] for a in new]
    assert np.array_equal(twin.reshape(stored_target), _stored(x.reshape(target), new))
    for i, q in enumerate(logical_order(axes, len(shape))):  # Shape(x) read off the twin
        assert shape[i] == (1 if q is None else twin.shape[q])


def test_groups_pair_runs_of_axes() -> None:
    assert groups((2, 3), (5,)) is None  # not a reshape
    assert groups((2, 6), (4, 3)) == [([0, 1], [0, 1])]  # no finer runs: one group
    assert groups((2, 3, 4), (6, 4)) == [([0, 1], [0]), ([2], [1])]


def _shape_of(x: str, idx: list[int], out: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Shape", [x], [f"{out}_s"]),
            helper.make_node("Gather", [f"{out}_s", f"{out}_i"], [out], axis=0)]


def _attention(rng: np.random.Generator, zero_copy: bool) -> onnx.ModelProto:
    """One self-attention block on ``x (B, S, 12)``, 3 heads of 4, every Reshape target
    computed from ``Shape`` at run time (as torch's exporters write it)."""
    c, h, d = 12, 3, 4
    inits = [init(rng, n, c, c) for n in ("wq", "wk", "wv", "wo")]
    ints = {"i01": [0, 1], "hd": [h, d], "zero": [0], "minus": [-1], "i0": [0], "i1": [1],
            "kperm": [0]}
    inits += [onnx.numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Gather", ["xs", "i01"], ["bs"], axis=0),
             helper.make_node("Gather", ["xs", "i1"], ["s1"], axis=0)]
    # head split target: (B, S, H, D), or (0, S, H, D) with 0 = "copy B" (allowzero=0)
    split = ["zero", "s1", "hd"] if zero_copy else ["bs", "hd"]
    nodes.append(helper.make_node("Concat", split, ["split"], axis=0))
    for n in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"]),
                  helper.make_node("Reshape", [f"{n}0", "split"], [f"{n}1"],
                                   allowzero=0 if zero_copy else 1)]
    nodes += [
        helper.make_node("Transpose", ["q1"], ["q2"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k1"], ["k2"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v1"], ["v2"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q2", "k2"], ["sc"]),
        helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v2"], ["o"]),
        helper.make_node("Transpose", ["o"], ["o1"], perm=[0, 2, 1, 3]),
        # head merge target: Shape(o1)[:2] ++ [-1]
        helper.make_node("Shape", ["o1"], ["os"], start=0, end=2),
        helper.make_node("Concat", ["os", "minus"], ["merge"], axis=0),
        helper.make_node("Reshape", ["o1", "merge"], ["o2"]),
        helper.make_node("MatMul", ["o2", "wo"], ["y0"]),
        helper.make_node("Add", ["y0", "x"], ["y"]),
    ]
    dims = ["batch", "length", c]
    return model(nodes, [vinfo("x", dims)], [vinfo("y", dims)], inits, opset=18)


@pytest.mark.parametrize("zero_copy", [True, False])
def test_attention_with_run_time_shapes_stays_in_the_conv_layout(zero_copy: bool) -> None:
    rng = np.random.default_rng(int(zero_copy))
    m = _attention(rng, zero_copy)
    conv = to_conv(m, layout="ane")
    counts = op_counts(conv)
    assert counts["Transpose"] <= 2 and counts["Conv"] == 4, counts  # one in, one out
    back = to_linear(conv)
    assert op_counts(back)["Transpose"] <= op_counts(m)["Transpose"], op_counts(back)
    for batch, length in ((3, 7), (1, 4)):  # sizes the graph never saw
        feeds = {"x": rng.standard_normal((batch, length, 12)).astype(np.float32)}
        ref = reference64(m, feeds)[0]
        tol = 64 * F32_EPS * 12 * max(1.0, float(np.abs(ref).max()))
        for graph in (conv, back):
            out = run_ort(graph, feeds)[0]
            assert out.shape == ref.shape
            assert float(np.abs(out - ref).max()) <= tol


def test_slice_to_a_run_time_bound_stays_in_the_conv_layout() -> None:
    """``x[:, :S-1]`` and ``x[..., :C/2]`` of a moved value, the bounds computed from
    ``Shape(x)``: the Slices read the stored axes, no move out and back in."""
    rng = np.random.default_rng(5)
    c = 8
    ints = {"one": [1], "two": [2], "zero": [0], "ax1": [1], "ax2": [2], "half": [c // 2]}
    inits = [init(rng, "w0", c, c), init(rng, "w1", c // 2, c)]
    inits += [onnx.numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]),
             helper.make_node("Shape", ["a"], ["s"]),
             helper.make_node("Gather", ["s", "ax1"], ["n"], axis=0),
             helper.make_node("Sub", ["n", "one"], ["end"]),
             helper.make_node("Slice", ["a", "zero", "end", "ax1"], ["b"]),
             helper.make_node("Slice", ["b", "zero", "half", "ax2"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["y"])]
    m = model(nodes, [vinfo("x", ["batch", "length", c])], [vinfo("y", ["batch", "n", c])],
              inits, opset=18)
    conv = to_conv(m, layout="ane")
    assert op_counts(conv)["Transpose"] <= 2 and op_counts(conv)["Conv"] == 2, op_counts(conv)
    back = to_linear(conv)
    assert op_counts(back)["Transpose"] == 0, op_counts(back)
    for batch, length in ((2, 6), (3, 9)):
        feeds = {"x": rng.standard_normal((batch, length, c)).astype(np.float32)}
        ref = reference64(m, feeds)[0]
        for graph in (conv, back):
            out = run_ort(graph, feeds)[0]
            assert out.shape == ref.shape
            assert float(np.abs(out - ref).max()) <= 64 * F32_EPS * c * max(
                1.0, float(np.abs(ref).max()))
