"""onnxruntime latency of ``fc2conv.onnx.to_conv`` graphs relative to the original, side by
side in one run: Transposes before -> after, and converted / original latency as the median of
interleaved runs (original, converted, original, ...), for both layouts (``channels_first``,
the default, and ``ane``).

    PYTHONPATH=src python bench/onnx_overhead.py                  # CPU, zoo + realistic sizes
    PYTHONPATH=src python bench/onnx_overhead.py --quick          # zoo sizes only
    PYTHONPATH=src python bench/onnx_overhead.py --device cuda --tf32 both --quick  # CUDA EP
    PYTHONPATH=src python bench/onnx_overhead.py --quick --profile --only "zoo bert"
    PYTHONPATH=src python bench/onnx_overhead.py --quick --threads 1   # both sessions 1 thread

Columns: ``Transpose`` in the graph fc2conv wrote (original -> converted), ``ORT T`` the
Transposes left after onnxruntime's own optimizer (``optimized_model_filepath``: its transpose
optimizer cancels or folds some into FusedMatMul), ``ORT nodes`` the nodes it runs; ``ratio``
is converted / original wall time, the median over interleaved samples (each sample ``reps``
back-to-back runs, so a 0.1 ms graph is timed over milliseconds; the order flips every sample)
with the 25th-75th percentile of the per-sample ratios; ``cpu`` the same for CPU time
(``time.process_time``: the process's threads together, less sensitive to a loaded machine
than wall time when ``--threads 1``).

``--device cuda`` runs both sessions on onnxruntime's ``CUDAExecutionProvider``; ``--tf32
on|off|both`` sets its ``use_tf32`` option (``both``: a row with each, the same graphs). An
onnxruntime without that provider prints why and exits 0 (the CPU-only wheel has none); on
CPU the TF32 column says ``n/a``.

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
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests" / "zoo"))

from converted_overhead import ZOO_NAMES, realistic  # noqa: E402

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


def sample_times(a: Callable[[], object], b: Callable[[], object], rounds: int
                 ) -> tuple[list[tuple[float, float]], list[tuple[float, float]], int]:
    """(wall, CPU) seconds per run of ``a`` and of ``b``: ``rounds`` samples each, a sample
    being ``reps`` back-to-back runs (``reps`` chosen so a sample lasts about 2 ms), the order
    of ``a`` and ``b`` flipping every sample."""
    for f in (a, b):
        f()
        f()
    t = time.perf_counter()
    a()
    reps = max(1, min(200, int(2e-3 / max(time.perf_counter() - t, 1e-6))))
    out: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    for i in range(rounds):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            f = (a, b)[k]
            w, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                f()
            out[k].append(((time.perf_counter() - w) / reps, (time.process_time() - c) / reps))
    return out[0], out[1], reps


def spread(ta: list[float], tb: list[float]) -> str:
    """``median(tb) / median(ta)`` and the 25th-75th percentile of the per-sample ratios."""
    ratios = sorted(y / x for x, y in zip(ta, tb, strict=True) if x > 0)
    if not ratios:
        return "  n/a"
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(tb) / statistics.median(ta):.2f}x [{q1:.2f}-{q3:.2f}]"


def ort_graph(model: onnx.ModelProto, opts: ort.SessionOptions, providers: list[Any]
              ) -> collections.Counter[str]:
    """Op types of the graph onnxruntime runs (after its optimizer), counted."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts.optimized_model_filepath = path
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        finally:
            opts.optimized_model_filepath = ""
        return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def quiet_options(threads: int = 0) -> Any:
    """onnxruntime session options: errors only, ``threads`` intra-op threads (0: its
    default)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return opts


def op_times(model: onnx.ModelProto, feeds: dict, providers: list[Any], threads: int = 0,
             runs: int = 20) -> dict[str, float]:
    """Milliseconds per run spent in each op type, from onnxruntime's profiler: the sum over
    the op type's nodes of each node's median over ``runs`` runs (``runs`` more warm up)."""
    opts = quiet_options(threads)
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


def providers_for(device: str, tf32: str) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime's providers for ``device``: the CUDA provider with ``use_tf32`` set (``tf32``
    ``on``/``off``) ahead of the CPU provider, or the CPU provider alone."""
    if device != "cuda":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 == "on" else "0"}),
            "CPUExecutionProvider"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tf32", choices=("on", "off", "both"), default="off",
                        help="the CUDA provider's use_tf32; both: a row with each")
    parser.add_argument("--quick", action="store_true", help="zoo sizes only")
    parser.add_argument("--rounds", type=int, default=0,
                        help="interleaved samples per model (default: 60 zoo, 12 realistic)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads for both sessions (0: its default)")
    parser.add_argument("--layouts", nargs="+", default=["channels_first", "ane"],
                        choices=("channels_first", "ane"))
    parser.add_argument("--profile", action="store_true",
                        help="also print onnxruntime's time per op type for each graph")
    parser.add_argument("--only", action="append", default=[],
                        help="run only these models (by the name in the first column)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (available: "
              f"{', '.join(ort.get_available_providers())}); --device cuda skipped")
        return
    settings = (["on", "off"] if args.tf32 == "both" else [args.tf32]) \
        if args.device == "cuda" else ["n/a"]
    print(f"onnxruntime {ort.__version__}, {args.device}, tf32 {'/'.join(settings)}, "
          f"{args.threads or 'default'} intra-op threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'model':20} {'layout':14} {'tf32':>4} {'Transpose':>9} {'ORT T':>7} {'ORT nodes':>9} "
          f"{'orig ms':>8} {'conv ms':>8} {'ratio [25-75%]':>18} {'cpu [25-75%]':>18} "
          f"{'max|diff|':>9}")
    opts = quiet_options(args.threads)
    for name, (model, inputs, names) in cases(args.quick).items():
        if args.only and name not in args.only:
            continue
        original = export(model, inputs, names)
        profiles: dict[str, dict[str, float]] = {}
        providers = providers_for(args.device, settings[0])
        if args.profile:
            profiles["original"] = op_times(original, {
                i.name: t.numpy() for i, t in zip(original.graph.input, inputs, strict=False)},
                providers, args.threads)
        feeds = {i.name: t.numpy() for i, t in zip(original.graph.input, inputs, strict=False)}
        rounds = args.rounds or (60 if name.startswith("zoo") else 12)
        ops_a = ort_graph(original, opts, providers)
        for layout in args.layouts:
            converted, report = convert(original, "conv", layout=layout)
            ops_b = ort_graph(converted, opts, providers)
            for tf32 in settings:
                providers = providers_for(args.device, tf32)
                base, sess = (ort.InferenceSession(m.SerializeToString(), opts,
                                                   providers=providers)
                              for m in (original, converted))
                diff = float(np.abs(sess.run(None, feeds)[0] - base.run(None, feeds)[0]).max())
                sa, sb, _ = sample_times(lambda s=base, f=feeds: s.run(None, f),
                                         lambda s=sess, f=feeds: s.run(None, f), rounds)
                wa, wb = [w for w, _ in sa], [w for w, _ in sb]
                moves = f"{report.transposes_before}->{report.transposes_after}"
                ort_t = f"{ops_a['Transpose']}->{ops_b['Transpose']}"
                nodes = f"{sum(ops_a.values())}->{sum(ops_b.values())}"
                print(f"{name:20} {layout:14} {tf32:>4} {moves:>9} {ort_t:>7} {nodes:>9} "
                      f"{statistics.median(wa) * 1e3:>8.3f} {statistics.median(wb) * 1e3:>8.3f} "
                      f"{spread(wa, wb):>18} "
                      f"{spread([c for _, c in sa], [c for _, c in sb]):>18} "
                      f"{diff:>9.2g}", flush=True)
            if args.profile:
                profiles[layout] = op_times(converted, feeds, providers, args.threads)
        if args.profile:
            print_profile(name, profiles)


if __name__ == "__main__":
    main()
