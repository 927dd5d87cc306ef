"""What the ane layout's constant folds (``fc2conv/onnx/rules/ane_fold.py``) save on
onnxruntime: the original export, the ane graph without the folds and the ane graph as
``to_conv`` writes it, timed side by side in one run (interleaved, the order rotating every
sample), as medians with the 25th-75th percentile of the per-sample ratios to the original.

    PYTHONPATH=src python bench/ane_folds.py --threads 1 --rounds 200
    PYTHONPATH=src python bench/ane_folds.py --threads 1 --rounds 8 --realistic \\
        --only "bert-base-like 8x128" --only "llama-like 8x128"
    PYTHONPATH=src python bench/ane_folds.py --threads 1 --disable NchwcTransformer

``--disable NAME``: onnxruntime graph optimizers to switch off in every session
(``InferenceSession(..., disabled_optimizers=[NAME])``), e.g. ``NchwcTransformer``, whose
reorders wrap each 1x1 Conv on the CPU. ``nodes``: how many nodes onnxruntime runs after its
optimizer. ``cpu``: ``time.process_time`` per run (the machine's other load counts less).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from onnx_overhead import cases, export, spread  # noqa: E402

sys.path.insert(0, str(ROOT.parent / "tests" / "zoo"))

from fc2conv.onnx import convert  # noqa: E402


def _unfolded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``to_conv(layout="ane")`` with the folds switched off (what it wrote before them)."""
    with mock.patch("fc2conv.onnx.convert.fold_affine_into_convs", return_value=0), \
            mock.patch("fc2conv.onnx.convert.move_scales_onto_convs", return_value=0):
        return convert(model, "conv", layout="ane", verify=False)[0]


def _nodes(model: onnx.ModelProto, opts: ort.SessionOptions, disabled: list[str]) -> int:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "o.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"],
                                 disabled_optimizers=disabled)
        finally:
            opts.optimized_model_filepath = ""
        return len(onnx.load(os.path.join(tmp, "o.onnx")).graph.node)


def _cases(realistic: bool, only: list[str]) -> dict:
    """``onnx_overhead.cases``, building only the zoo models named in ``only`` (if any)."""
    if realistic:
        return {k: v for k, v in cases(False).items() if not only or k in only}
    import zoo_models
    from converted_overhead import ZOO_NAMES

    out = {}
    for name in ZOO_NAMES:
        if only and f"zoo {name}" not in only:
            continue
        zoo = zoo_models.ZOO[name]
        draw = zoo.draw(0)
        out[f"zoo {name}"] = (zoo.build(), tuple(draw.values()), list(draw))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--realistic", action="store_true",
                        help="also the BERT-base-like and Llama-like stacks (8x128)")
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--disable", action="append", default=[],
                        help="onnxruntime optimizers to switch off in every session")
    args = parser.parse_args(argv)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = args.threads
    print(f"onnxruntime {ort.__version__}, {args.threads or 'default'} intra-op threads, "
          f"disabled: {', '.join(args.disable) or 'none'}, load {os.getloadavg()[0]:.1f}")
    print(f"{'model':22} {'nodes orig/before/after':>24} {'orig ms':>8} "
          f"{'before (wall)':>20} {'after (wall)':>20} {'before (cpu)':>20} {'after (cpu)':>20}")
    for name, (model, inputs, names) in _cases(args.realistic, args.only).items():
        original = export(model, inputs, names)
        graphs = [original, _unfolded(original),
                  convert(original, "conv", layout="ane", verify=False)[0]]
        feeds = {i.name: t.numpy() for i, t in zip(original.graph.input, inputs, strict=False)}
        sessions = [ort.InferenceSession(g.SerializeToString(), opts,
                                         providers=["CPUExecutionProvider"],
                                         disabled_optimizers=args.disable) for g in graphs]
        nodes = "/".join(str(_nodes(g, opts, args.disable)) for g in graphs)
        runs = [lambda s=s, f=feeds: s.run(None, f) for s in sessions]
        for f in runs:
            f()
        t = time.perf_counter()
        runs[0]()
        reps = max(1, min(200, int(2e-3 / max(time.perf_counter() - t, 1e-6))))
        wall: list[list[float]] = [[] for _ in runs]
        cpu: list[list[float]] = [[] for _ in runs]
        for i in range(args.rounds):
            for k in (i % 3, (i + 1) % 3, (i + 2) % 3):
                w, c = time.perf_counter(), time.process_time()
                for _ in range(reps):
                    runs[k]()
                wall[k].append((time.perf_counter() - w) / reps)
                cpu[k].append((time.process_time() - c) / reps)
        print(f"{name:22} {nodes:>24} {statistics.median(wall[0]) * 1e3:>8.3f} "
              f"{spread(wall[0], wall[1]):>20} {spread(wall[0], wall[2]):>20} "
              f"{spread(cpu[0], cpu[1]):>20} {spread(cpu[0], cpu[2]):>20}", flush=True)


if __name__ == "__main__":
    main()
