"""onnxruntime on the zoo's transformers exported with dynamic shapes: ``fc2conv.onnx.to_conv``
(default layout) against the original, side by side in one run.

    PYTHONPATH=src python bench/onnx_dynamic.py --threads 1 --rounds 200
    PYTHONPATH=src python bench/onnx_dynamic.py --threads 1 --only llama --exporters legacy
    PYTHONPATH=src python bench/onnx_dynamic.py --device cuda --threads 1

Each zoo transformer is exported with dynamic batch (and, for text, length) axes by both torch
exporters (``zoo_models.export_onnx(name, exporter, dynamic=True)``: legacy ``dynamic_axes``,
``dynamo=True`` with ``dynamic_shapes``); there the head split's Reshape targets, Expand shapes
and rotary tables are computed from ``Shape`` ops at run time. Columns: ``Transpose`` in the
graph (original -> converted), ``ORT T`` the Transposes onnxruntime runs after its own
optimizer (``optimized_model_filepath``), ``ORT nodes`` the nodes it runs, then converted /
original latency at a size other than the export's (batch 3, length 11; images batch 3): the
median of interleaved samples (the order flips every sample) with the 25th-75th percentile of
the per-sample ratios, wall and CPU time (``time.process_time``), and the max |diff| of the two
outputs. A model an exporter cannot export is listed with the reason.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests" / "zoo"))

from converted_overhead import ZOO_NAMES  # noqa: E402
from onnx_overhead import (  # noqa: E402
    ort_graph,
    providers_for,
    quiet_options,
    sample_times,
    spread,
)

from fc2conv.onnx import convert  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import zoo_models

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=60, help="interleaved samples per graph")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads for both sessions (0: its default)")
    parser.add_argument("--exporters", nargs="+", default=["legacy", "dynamo"],
                        choices=("legacy", "dynamo"))
    parser.add_argument("--only", action="append", default=[],
                        help="run only these zoo models (zoo names: bert, llama, ...)")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--length", type=int, default=11)
    args = parser.parse_args(argv)
    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider; skipped")
        return
    providers = providers_for(args.device, "off")
    print(f"onnxruntime {ort.__version__}, {args.device}, {args.threads or 'default'} intra-op "
          f"threads, batch {args.batch} length {args.length}, load {os.getloadavg()[0]:.1f}")
    print(f"{'model':16} {'exporter':8} {'Transpose':>9} {'ORT T':>7} {'ORT nodes':>9} "
          f"{'orig ms':>8} {'conv ms':>8} {'ratio [25-75%]':>18} {'cpu [25-75%]':>18} "
          f"{'max|diff|':>9}")
    opts = quiet_options(args.threads)
    for name in ZOO_NAMES:
        if args.only and name not in args.only:
            continue
        zoo = zoo_models.ZOO[name]
        length = args.length if zoo.family == "text" else None
        draw = zoo.draw(5, batch=args.batch, **({"length": length} if length else {}))
        feeds = {k: v.numpy() for k, v in draw.items()}
        for exporter in args.exporters:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    original, _ = zoo_models.export_onnx(name, exporter, dynamic=True)
            except Exception as e:  # an exporter's own failure: say so, go on
                print(f"{name:16} {exporter:8} export failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80] if str(e) else ''}", flush=True)
                continue
            converted, report = convert(original, "conv", verify=False)
            ops_a, ops_b = ort_graph(original, opts, providers), \
                ort_graph(converted, opts, providers)
            base, sess = (ort.InferenceSession(m.SerializeToString(), opts, providers=providers)
                          for m in (original, converted))
            diff = float(np.abs(sess.run(None, feeds)[0] - base.run(None, feeds)[0]).max())
            sa, sb, _ = sample_times(lambda s=base, f=feeds: s.run(None, f),
                                     lambda s=sess, f=feeds: s.run(None, f), args.rounds)
            wa, wb = [w for w, _ in sa], [w for w, _ in sb]
            moves = f"{report.transposes_before}->{report.transposes_after}"
            ort_t = f"{ops_a['Transpose']}->{ops_b['Transpose']}"
            nodes = f"{sum(ops_a.values())}->{sum(ops_b.values())}"
            print(f"{name:16} {exporter:8} {moves:>9} {ort_t:>7} {nodes:>9} "
                  f"{statistics.median(wa) * 1e3:>8.3f} {statistics.median(wb) * 1e3:>8.3f} "
                  f"{spread(wa, wb):>18} {spread([c for _, c in sa], [c for _, c in sb]):>18} "
                  f"{diff:>9.2g}", flush=True)


if __name__ == "__main__":
    main()
