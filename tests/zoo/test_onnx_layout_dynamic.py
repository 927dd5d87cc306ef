"""``fc2conv.onnx.to_conv(layout="ane")`` on the zoo's transformers exported with a dynamic
batch and sequence length (``torch.onnx.export`` with ``dynamic_axes``, and ``dynamo=True``
with ``dynamic_shapes``): the head-split Reshapes' targets, Expand shapes and masks are
computed at run time from ``Shape(x)`` there, and the pass must leave no more Transposes than on
the static export (before: BERT 8 -> 19). The converted graph runs at batch sizes and lengths
other than the export's, against the float64 PyTorch model."""

from __future__ import annotations

import functools
import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo_models
from _onnx_helpers import F32_EPS
from test_onnx_layout_zoo import BOUNDS

import fc2conv
from fc2conv.onnx import convert

# (batch, length) at which the converted graphs run; the export used (2, 8)
SIZES = ((3, 11), (1, 5))
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")


@functools.cache
def _export(name: str, exporter: str) -> tuple[onnx.ModelProto, list[str]]:
    return zoo_models.export_onnx(name, exporter, dynamic=True)


def _sizes(name: str) -> list[tuple[int, int]]:
    text = zoo_models.ZOO[name].family == "text"
    return [(b, n if text else 8) for b, n in SIZES]


def _check(m: onnx.ModelProto, graphs: list[onnx.ModelProto], name: str,
           names: list[str]) -> None:
    """ORT's output of the export and of ``graphs`` at sizes other than the export's, against
    the float64 PyTorch model, within the float32 rounding bound of the deepest dot products
    (as the static test)."""
    zoo = zoo_models.ZOO[name]
    model = zoo_models.Logits(zoo.build(), names).double()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(g.SerializeToString(), opts,
                                     providers=["CPUExecutionProvider"]) for g in (m, *graphs)]
    for seed, (batch, length) in enumerate(_sizes(name), start=3):
        draw = zoo.draw(seed, batch=batch, length=length)
        with torch.no_grad():
            ref = model(*(v.double() if v.is_floating_point() else v
                          for v in draw.values())).numpy()
        feeds = {k: v.numpy() for k, v in draw.items()}
        tol = 8 * F32_EPS * 4 * 37 * 2 * max(1.0, float(np.abs(ref).max()))
        for session in sessions:
            out = session.run(None, feeds)[0].astype(np.float64)
            assert out.shape == ref.shape
            assert float(np.abs(out - ref).max()) <= tol


# dynamo=True fails inside torch on T5's encoder (static shapes too). One dynamo export (its
# Reshapes have allowzero=1, its sizes come from Shape(start, end)) keeps the test budget; Llama
# and ViT from dynamo pass too (10-17 s each): run them with FC2CONV_ALL_EXPORTERS=1
CASES = [(name, "legacy") for name in sorted(BOUNDS)] + [("bert", "dynamo")] + (
    [("llama", "dynamo"), ("vit", "dynamo")] if os.environ.get("FC2CONV_ALL_EXPORTERS") else [])


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_dynamic_export(name: str, exporter: str) -> None:
    """The ane result has no more Transposes than on the static export; ``to_linear`` of it
    no more Transpose / Reshape / Flatten than the export, and its norms LayerNormalization
    again; both run at other sizes."""
    m, names = _export(name, exporter)
    assert any(d.dim_param or not d.HasField("dim_value")
               for d in m.graph.input[0].type.tensor_type.shape.dim)  # it is dynamic
    conv, report = convert(m, "conv", layout="ane", verify=False)
    transposes = sum(n.op_type == "Transpose" for n in conv.graph.node)
    assert transposes == report.transposes_after
    assert transposes <= BOUNDS[name], "\n".join(report.layout_changes)
    back, report = convert(conv, "linear", verify=False)
    before = Counter(n.op_type for n in m.graph.node)
    after = Counter(n.op_type for n in back.graph.node)
    assert all(after[k] <= before[k] for k in LAYOUT_OPS), (before, after, report.layout_changes)
    # the channel norms are LayerNormalization again (opset >= 17), not ReduceMean-based ops
    assert after["LayerNormalization"] == before["LayerNormalization"]
    assert after["ReduceMean"] <= before["ReduceMean"]
    _check(m, [conv, back], name, names)


def test_compare_judges_the_dynamic_bert_at_other_sizes() -> None:
    m, names = _export("bert", "legacy")
    conv, _ = convert(m, "conv", layout="ane", verify=False)
    zoo = zoo_models.ZOO["bert"]
    draws = [{k: v.numpy() for k, v in zoo.draw(seed, batch=b, length=n).items()}
             for seed, (b, n) in enumerate(SIZES, start=7)]
    assert fc2conv.compare(m, conv, draws).verdict in ("identical", "equivalent")
