"""Transposes left by ``fc2conv.onnx.to_conv(layout="ane")`` on the zoo's transformers, for a
static export and for exports with a dynamic batch and sequence length (``torch.onnx.export``
with ``dynamic_axes``, and ``dynamo=True`` with ``dynamic_shapes``), side by side in one run;
with the round trip ``to_linear`` of it, and the largest difference from the export's own output
at the export's sizes and two others.

    PYTHONPATH=src:tests/zoo python bench/ane_transposes.py
    PYTHONPATH=src:tests/zoo python bench/ane_transposes.py --models bert llama --exporters legacy

Columns: ``T`` Transposes in the export -> the ane graph -> its round trip; ``R`` Reshapes the
same way; ``LN`` LayerNormalization nodes in the export -> the round trip; ``max |diff|`` of the
ane graph and of the round trip against the export, both run in onnxruntime, at (batch, length)
(2, 8) (the export's), (3, 11) and (1, 5) (the text models'; an image's or Whisper's length is
fixed by the model, so only the batch changes there).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import zoo_models

from fc2conv.onnx import convert

FAMILIES = ("bert", "distilbert", "roberta", "vit", "whisper_encoder", "t5_encoder", "llama")
SIZES = ((2, 8), (3, 11), (1, 5))


def export(name: str, exporter: str) -> onnx.ModelProto:
    """``static`` (legacy exporter, fixed shapes), ``legacy`` or ``dynamo`` (dynamic shapes)."""
    if exporter == "static":
        return zoo_models.export_onnx(name, "legacy")[0]
    return zoo_models.export_onnx(name, exporter, dynamic=True)[0]


def _session(m: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def row(name: str, exporter: str) -> str:
    try:
        m = export(name, exporter)
    except Exception as exc:  # noqa: BLE001 - a bench row, not a test
        return f"{name:16s} {exporter:7s} export fails: {type(exc).__name__}"
    start = time.perf_counter()
    conv, _ = convert(m, "conv", layout="ane", verify=False)
    back, _ = convert(conv, "linear", verify=False)
    took = time.perf_counter() - start
    counts = [Counter(n.op_type for n in g.graph.node) for g in (m, conv, back)]
    zoo = zoo_models.ZOO[name]
    sessions = [_session(g) for g in (m, conv, back)]
    diffs = []
    for batch, length in SIZES if exporter != "static" else SIZES[:1]:
        if zoo.family != "text" and length != 8 and batch == 1:
            continue
        feeds = {k: v.numpy() for k, v in zoo.draw(5, batch=batch, length=length).items()}
        a, c, k = (s.run(None, feeds)[0] for s in sessions)
        diffs.append(f"{batch}x{length if zoo.family == 'text' else '-'}: "
                     f"{np.abs(a - c).max():.1e}/{np.abs(a - k).max():.1e}")
    t = "->".join(str(c["Transpose"]) for c in counts)
    r = "->".join(str(c["Reshape"]) for c in counts)
    ln = f"{counts[0]['LayerNormalization']}->{counts[2]['LayerNormalization']}"
    return f"{name:16s} {exporter:7s} T {t:9s} R {r:10s} LN {ln:5s} {took:5.1f}s  " \
        + "  ".join(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(FAMILIES))
    parser.add_argument("--exporters", default="static,legacy,dynamo")
    args = parser.parse_args()
    print(f"{'model':16s} {'export':7s} T export->ane->back, R, LN export->back, convert time,"
          " max |diff| ane/back at batch x length")
    for name in args.models:
        for exporter in args.exporters.split(","):
            print(row(name, exporter), flush=True)


if __name__ == "__main__":
    main()
