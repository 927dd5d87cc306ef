"""The zoo's rotary transformers exported by both torch exporters, converted with the default
layout: the rotary embeddings run in the layout the converted Q/K projections write
(:mod:`fc2conv.onnx.rules.swap_sink`), so the graph has no Q/K head-split moves left; the
result has the same bits as the conversion without that rule and meets the float64 PyTorch
model's rounding bound on fresh inputs; ``to_linear`` gives the export's own Transposes and
Reshapes back."""

from __future__ import annotations

import functools
import importlib
from collections import Counter

import numpy as np
import onnx
import pytest
import zoo_models
from _onnx_helpers import run_ort
from test_onnx_layout_zoo import _check_equivalent
from test_onnx_swap_sink import _unread

import fc2conv
from fc2conv.onnx import convert
from fc2conv.onnx.rules.swap_sink import SWAPPED_KEY

convert_module = importlib.import_module("fc2conv.onnx.convert")


@functools.cache
def _export(name: str, exporter: str) -> tuple[onnx.ModelProto, list[str]]:
    return zoo_models.export_onnx(name, exporter)


def _counts(m: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in m.graph.node)


def _head_moves(m: onnx.ModelProto) -> int:
    """Transposes of a head split in ``m``: reading a Reshape that splits a Conv's output."""
    producer = {o: n for n in m.graph.node for o in n.output}
    out = 0
    for node in m.graph.node:
        split = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        conv = producer.get(split.input[0]) if split is not None \
            and split.op_type == "Reshape" else None
        out += conv is not None and conv.op_type == "Conv"
    return out


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_rotary_runs_in_the_conv_layout(exporter: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama (Mistral and Qwen2 export the same attention)."""
    name = "llama"
    m, names = _export(name, exporter)
    with monkeypatch.context() as patch:
        patch.setattr(convert_module, "sink_swaps", lambda ctx: 0)
        before, _ = convert(m, "conv", verify=False)
    conv, report = convert(m, "conv")  # with its self-check
    layers = 2
    # before: the query's and the key's head-split moves in every layer (the V split and the
    # head merge already went: matmul_transpose); now none, and K^T's swap went with K's
    assert _head_moves(before) == 2 * layers, report.layout_changes
    assert _head_moves(conv) == 0, report.layout_changes
    assert _counts(conv)["Transpose"] == _counts(before)["Transpose"] - 2 * layers
    assert sum(any(p.key == SWAPPED_KEY for p in n.metadata_props) for n in conv.graph.node)
    assert _unread(conv) <= _unread(m)  # no shape or table left behind
    zoo = zoo_models.ZOO[name]
    for seed in (3, 4):
        feeds = {k: v.numpy() for k, v in zoo.draw(seed).items()}
        assert np.array_equal(run_ort(conv, feeds)[0], run_ort(before, feeds)[0])
    _check_equivalent(m, conv, name, names)
    back, _ = convert(conv, "linear")
    for op in ("Transpose", "Reshape"):
        assert _counts(back)[op] == _counts(m)[op], (op, _counts(m), _counts(back))
    _check_equivalent(m, back, name, names)


def test_compare_judges_the_converted_llama() -> None:
    m, _ = _export("llama", "legacy")
    conv, _ = convert(m, "conv", verify=False)
    assert fc2conv.compare(m, conv).verdict in ("identical", "equivalent")
