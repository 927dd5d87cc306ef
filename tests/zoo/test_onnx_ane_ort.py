"""What onnxruntime runs of the zoo's transformers converted with ``layout="ane"``: at the zoo's
widths each op costs about a microsecond, so the structure is the speed (``bench/
onnx_overhead.py`` times it).

* No constant scaling is left between a norm and the Convs that read it only (a pre-norm's
  weight and bias are in the Q/K/V and MLP kernels), and no scalar scale sits on a head view
  of a Conv (it is on the Conv's output, where onnxruntime folds it);
* onnxruntime runs at most ``EXCESS`` more nodes than for the original (before the folds:
  BERT-likes +24, ViT +37, Whisper +29, T5 +33, Llama +38; before the norms' sums of squares
  and the post-norm biases in the residual's Conv: +20, +25, +21, +29, +33), and at most
  ``MOVES`` Transposes (a norm's ``ReduceSumSquare`` right after the move in would let its
  transpose optimizer run one more: T5 and Llama 3 and 2);
* the graph stays equivalent to the float64 model, for both torch exporters.
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import onnx
import pytest
import zoo_models
from test_onnx_layout_zoo import _check_equivalent, _export
from test_onnx_ort_graph import _ort_ops

from fc2conv.onnx import convert

EXCESS = {
    "bert": 13,
    "distilbert": 13,
    "roberta": 13,
    "vit": 20,
    "whisper_encoder": 16,
    "t5_encoder": 25,
    "llama": 29,
}
MOVES = {  # the move in and out, T5's bias-table permute, ViT's patch move undone
    "bert": 2,
    "distilbert": 2,
    "roberta": 2,
    "vit": 0,
    "whisper_encoder": 1,
    "t5_encoder": 2,
    "llama": 1,
}


def _const_size(m: onnx.ModelProto) -> dict[str, int]:
    sizes = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            sizes[node.output[0]] = int(np.prod(node.attribute[0].t.dims))
    return sizes


def _left_scalings(m: onnx.ModelProto) -> list[str]:
    """Constant Muls/Adds read only by Convs, and scalar Muls of a head view of a Conv."""
    producer = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in m.graph.node:
        for i in node.input:
            readers[i].append(node)
    sizes = _const_size(m)
    left = []
    for node in m.graph.node:
        const = [i for i in node.input if i in sizes]
        if node.op_type not in ("Mul", "Add") or len(const) != 1 or len(node.input) != 2:
            continue
        users = readers[node.output[0]]
        if users and all(u.op_type == "Conv" for u in users):
            left.append(f"{node.name}: read by Convs only")
        src = producer.get(next(i for i in node.input if i not in sizes))
        while src is not None and src.op_type == "Reshape":
            src = producer.get(src.input[0])
            if src is not None and src.op_type == "Conv" and sizes[const[0]] == 1:
                left.append(f"{node.name}: a scale on a head view of a Conv")
    return left


@functools.cache
def _dynamo(name: str) -> tuple[onnx.ModelProto, list[str]]:
    return zoo_models.export_onnx(name, "dynamo")


@pytest.mark.parametrize(("name", "exporter"), [
    *((name, "legacy") for name in sorted(EXCESS)), ("vit", "dynamo")])
def test_ort_runs_few_extra_nodes(name: str, exporter: str) -> None:
    m, names = _export(name) if exporter == "legacy" else _dynamo(name)
    conv, _ = convert(m, "conv", layout="ane", verify=False)
    assert _left_scalings(conv) == []
    before, after = _ort_ops(m), _ort_ops(conv)
    excess = sum(after.values()) - sum(before.values())
    if exporter == "legacy":
        assert excess <= EXCESS[name], (before, after)
        assert after["Transpose"] <= MOVES[name], after
    if exporter == "dynamo":
        _check_equivalent(m, conv, name, names)  # the legacy graphs: test_onnx_layout_zoo
