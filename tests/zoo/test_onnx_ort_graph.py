"""What onnxruntime's optimizer makes of the zoo's converted transformers (default layout): the
structure its speed comes from, not timings (``bench/onnx_overhead.py`` times them).

* The original's fused norms survive: every ``LayerNormalization``, ``SkipLayerNormalization``
  (residual Add + LayerNorm) and ``SimplifiedLayerNormalization`` (RMSNorm) onnxruntime builds
  from the export it also builds from the converted graph -- the conversion never breaks a
  norm or residual pattern it does not need to.
* No ``Transpose -> Reshape -> Transpose`` chain around a head split or merge is left in the
  converted graph, and onnxruntime runs no more Transposes than in the original, Llama's
  lm_head aside (before the folds, e.g. BERT 12 and Whisper 15, then
  10 and 11, against the bounds 8 and 9 below).
* The converted graph is equivalent to the float64 model.
"""

from __future__ import annotations

import collections
import os
import tempfile

import onnx
import onnxruntime as ort
import pytest
from test_onnx_layout_zoo import _check_equivalent, _export

from fc2conv.onnx import convert

NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
         "SkipSimplifiedLayerNormalization")

# family -> most Transposes in onnxruntime's optimized converted graph: the original's own.
# Per layer the converted graph adds a move into the attention's Convs and out of its output
# Conv (before the residual norm) and the same for the MLP (4 per layer, 2 layers); onnxruntime
# folds the Q/K/V head moves into FusedMatMul, and the head merge needs none since the
# product P @ V is computed transposed (matmul_transpose.py; before it: the original's + 2).
# Llama: its 4 head moves per layer all go (V's and the merge's: matmul_transpose; Q's and K's,
# read by the rotary embedding: swap_sink), + 2 for the lm_head after the last norm (before
# swap_sink: + 6; before matmul_transpose: + 10). ViT and Whisper: the original's count
# differs from its export's by the patch / conv front end transposes.
BOUNDS = {
    "bert": 8,
    "distilbert": 8,
    "roberta": 8,
    "vit": 9,
    "whisper_encoder": 9,
    "t5_encoder": 8,
    "llama": 8 + 2,
}


def _ort_ops(m: onnx.ModelProto) -> collections.Counter[str]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath)
                                   .graph.node)


def _no_chain(m: onnx.ModelProto) -> bool:
    producer = {o: n for n in m.graph.node for o in n.output}
    for node in m.graph.node:
        mid = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        while mid is not None and mid.op_type in ("Mul", "Div"):  # a query's scaling
            mid = producer.get(mid.input[0])
        first = producer.get(mid.input[0]) if mid is not None and mid.op_type == "Reshape" \
            else None
        if first is not None and first.op_type == "Transpose":
            return False
    return True


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_ort_keeps_fusions_and_few_moves(name: str) -> None:
    m, names = _export(name)
    conv, report = convert(m, "conv")
    assert _no_chain(conv), "\n".join(report.layout_changes)
    before, after = _ort_ops(m), _ort_ops(conv)
    assert sum(before[k] for k in NORMS) > 0
    assert all(after[k] == before[k] for k in NORMS), (before, after)
    assert after["Transpose"] <= BOUNDS[name], (after["Transpose"], report.layout_changes)
    assert after["Gemm"] + after["MatMul"] + after["FusedMatMul"] <= 4  # attention only
    _check_equivalent(m, conv, name, names)
