"""onnxruntime latency of ``fc2conv.onnx.to_conv`` graphs relative to the original, side by
side in one run: Transposes before -> after, and converted / original latency as the median of
interleaved runs (original, converted, original, ...), for both layouts (``channels_first``,
the default, and ``ane``).

    PYTHONPATH=src python bench/onnx_overhead.py                  # CPU, zoo + realistic sizes
    PYTHONPATH=src python bench/onnx_overhead.py --quick          # zoo sizes only
    PYTHONPATH=src python bench/onnx_overhead.py --device cuda    # CUDAExecutionProvider
    PYTHONPATH=src python bench/onnx_overhead.py --quick --profile --only "zoo bert"

``--profile``: after the timings, onnxruntime's own profiler (``SessionOptions.enable_profiling``)
on each graph: the milliseconds per op type as onnxruntime ran them (after its graph
optimizer's fusions, so a fused ``LayerNormalization`` or ``SkipLayerNormalization`` shows up
as one op), the original's column next to each layout's.

Models: the zoo's small transformers (hidden 32, batch 2, length 8) and, unless ``--quick``,
a BERT-base-like BertModel (hidden 768, 12 heads, 2 layers) and a Llama-like LlamaModel
(hidden 768, 12 heads, 2 layers) at batch 8, length 128, exported with ``torch.onnx.export``
(TorchScript exporter) from random weights (never downloaded).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests" / "zoo"))

from converted_overhead import ZOO_NAMES, interleaved_ratio, realistic  # noqa: E402

from fc2conv.onnx import convert  # noqa: E402


class _First(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args, strict=True))) if self.names \
            else self.model(*args)
        import zoo_models
        return zoo_models.logits(out)


def export(model: torch.nn.Module, inputs: tuple, names: list[str] | None) -> onnx.ModelProto:
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_First(model.eval(), names), inputs, buf, dynamo=False,
                          input_names=names)
    return onnx.load_from_string(buf.getvalue())


def cases(quick: bool) -> dict[str, tuple[torch.nn.Module, tuple, list[str] | None]]:
    import zoo_models

    out: dict[str, tuple[torch.nn.Module, tuple, list[str] | None]] = {}
    for name in ZOO_NAMES:
        z = zoo_models.ZOO[name]
        draw = z.draw(0)
        out[f"zoo {name}"] = (z.build(), tuple(draw.values()), list(draw))
    if not quick:
        for name, (model, inputs) in realistic(torch.device("cpu"), 8, 128).items():
            out[name] = (model, inputs, ["input_ids", "attention_mask"])
    return out


def op_times(model: onnx.ModelProto, feeds: dict, providers: list[str],
             runs: int = 20) -> dict[str, float]:
    """Milliseconds per run spent in each op type, from onnxruntime's profiler: the sum over
    the op type's nodes of each node's median over ``runs`` runs (``runs`` more warm up)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        for _ in range(2 * runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after = starts[runs] if len(starts) > runs else 0
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            per_node[(e["args"]["op_name"], e["name"])].append(e["dur"] / 1e3)
    totals: collections.Counter[str] = collections.Counter()
    for (op, _), durations in per_node.items():  # medians: a shared machine preempts
        totals[op] += float(np.median(durations))
    return dict(totals)


def print_profile(name: str, columns: dict[str, dict[str, float]]) -> None:
    ops = sorted({op for c in columns.values() for op in c},
                 key=lambda op: -max(c.get(op, 0.0) for c in columns.values()))
    print(f"  profile of {name} (ms per run by op type, as onnxruntime ran it):")
    print("  " + f"{'op':28}" + "".join(f"{k:>16}" for k in columns))
    for op in ops:
        print("  " + f"{op:28}" + "".join(f"{c.get(op, 0.0):>16.3f}" for c in columns.values()))
    print("  " + f"{'total':28}" + "".join(f"{sum(c.values()):>16.3f}" for c in columns.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="zoo sizes only")
    parser.add_argument("--rounds", type=int, default=0,
                        help="interleaved runs per model (default: 30 zoo, 10 realistic)")
    parser.add_argument("--profile", action="store_true",
                        help="also print onnxruntime's time per op type for each graph")
    parser.add_argument("--only", action="append", default=[],
                        help="run only these models (by the name in the first column)")
    args = parser.parse_args()
    providers = ["CPUExecutionProvider"]
    if args.device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                             f"(available: {', '.join(ort.get_available_providers())}); "
                             "install onnxruntime-gpu or run without --device cuda")
        providers.insert(0, "CUDAExecutionProvider")
    print(f"onnxruntime {ort.__version__}, providers {providers[0]}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'model':26} {'layout':15} {'Transpose':>10} {'original ms':>12} "
          f"{'converted ms':>13} {'ratio':>6} {'max |diff|':>10}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name, (model, inputs, names) in cases(args.quick).items():
        if args.only and name not in args.only:
            continue
        original = export(model, inputs, names)
        profiles: dict[str, dict[str, float]] = {}
        if args.profile:
            profiles["original"] = op_times(original, {
                i.name: t.numpy() for i, t in zip(original.graph.input, inputs, strict=False)},
                providers)
        feeds = {i.name: t.numpy() for i, t in zip(original.graph.input, inputs, strict=False)}
        base = ort.InferenceSession(original.SerializeToString(), opts, providers=providers)
        want = base.run(None, feeds)[0]
        rounds = args.rounds or (30 if name.startswith("zoo") else 10)
        for layout in ("channels_first", "ane"):
            converted, report = convert(original, "conv", layout=layout)
            sess = ort.InferenceSession(converted.SerializeToString(), opts, providers=providers)
            diff = float(np.abs(sess.run(None, feeds)[0] - want).max())
            ta, tb = interleaved_ratio(lambda s=base, f=feeds: s.run(None, f),
                                       lambda s=sess, f=feeds: s.run(None, f), rounds, lambda: None)
            moves = f"{report.transposes_before}->{report.transposes_after}"
            print(f"{name:26} {layout:15} {moves:>10} {ta * 1e3:>12.3f} {tb * 1e3:>13.3f} "
                  f"{tb / ta:>5.2f}x {diff:>10.2g}", flush=True)
            if args.profile:
                profiles[layout] = op_times(converted, feeds, providers)
        if args.profile:
            print_profile(name, profiles)


if __name__ == "__main__":
    main()
