"""What the ane layout's own forms save on onnxruntime: the original export and the ane graph
as ``to_conv`` writes it with some of its forms switched off, timed side by side in one run
(interleaved, the order rotating every sample), as medians with the 25th-75th percentile of
the per-sample ratios to the original.

    PYTHONPATH=src python bench/ane_folds.py --threads 1 --rounds 200
    PYTHONPATH=src python bench/ane_folds.py --threads 1 --rounds 8 --realistic \\
        --only "bert-base-like 8x128" --only "llama-like 8x128"
    PYTHONPATH=src python bench/ane_folds.py --threads 1 --disable NchwcTransformer
    PYTHONPATH=src python bench/ane_folds.py --threads 1 --variants no-folds no-sumsq now

Variants (``--variants``, default ``stop19 now``):

* ``now``: ``to_conv(layout="ane")`` as it is;
* ``no-folds``: without ``onnx/rules/ane_fold.py`` (a pre-norm's weight and bias into the
  Convs, a query's scale onto its Conv) and without the three below (the ane graph of stop 18);
* ``stop19``: with those folds, without the three below;
* ``no-sumsq``: without ``onnx/rules/ane_norm.py`` (a norm's variance as one
  ``ReduceSumSquare``);
* ``no-order``: the attention product's Einsum with the original MatMul's operand order
  (``HeadRewrites.LEADING_OPERAND_FIRST = False``);
* ``no-shift``: a post-norm's bias not moved into its residual's Conv
  (``ane_fold.fold_shifts_into_residuals``).

``--disable NAME``: onnxruntime graph optimizers to switch off in every session
(``InferenceSession(..., disabled_optimizers=[NAME])``), e.g. ``NchwcTransformer``, whose
reorders wrap each 1x1 Conv on the CPU. ``nodes``: how many nodes onnxruntime runs after its
optimizer (original, then each variant). ``cpu``: ``time.process_time`` per run (the
machine's other load counts less).
"""

from __future__ import annotations

import argparse
import contextlib
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

from onnx_overhead import cases, export, quiet_options, spread  # noqa: E402

sys.path.insert(0, str(ROOT.parent / "tests" / "zoo"))

from fc2conv.onnx import convert  # noqa: E402

VARIANTS = ("now", "no-folds", "stop19", "no-sumsq", "no-order", "no-shift")


def _variant(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``to_conv(layout="ane")`` with the forms ``name`` switches off (module docstring)."""
    from fc2conv.onnx.rules.ane_heads import HeadRewrites

    folds = name != "no-folds"
    sumsq = name in ("now", "no-order", "no-shift")
    order = name in ("now", "no-sumsq", "no-shift")
    shift = name in ("now", "no-sumsq", "no-order")
    with contextlib.ExitStack() as stack:
        if not folds:
            stack.enter_context(mock.patch("fc2conv.onnx.convert.fold_affine_into_convs",
                                           return_value=0))
            stack.enter_context(mock.patch("fc2conv.onnx.convert.move_scales_onto_convs",
                                           return_value=0))
        if not shift:
            stack.enter_context(mock.patch("fc2conv.onnx.convert.fold_shifts_into_residuals",
                                           return_value=0))
        if not sumsq:
            stack.enter_context(mock.patch("fc2conv.onnx.convert.square_sums", return_value=0))
        stack.enter_context(mock.patch.object(HeadRewrites, "LEADING_OPERAND_FIRST", order))
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
    parser.add_argument("--variants", nargs="+", default=["stop19", "now"], choices=VARIANTS)
    args = parser.parse_args(argv)
    opts = quiet_options(args.threads)
    print(f"onnxruntime {ort.__version__}, {args.threads or 'default'} intra-op threads, "
          f"disabled: {', '.join(args.disable) or 'none'}, load {os.getloadavg()[0]:.1f}")
    print(f"{'model':22} {'nodes':>16} {'orig ms':>8} "
          + " ".join(f"{v + ' (wall)':>20} {v + ' (cpu)':>20}" for v in args.variants))
    for name, (model, inputs, names) in _cases(args.realistic, args.only).items():
        original = export(model, inputs, names)
        graphs = [original, *(_variant(original, v) for v in args.variants)]
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
        k = len(runs)
        for i in range(args.rounds):
            for j in range(k):
                idx = (i + j) % k
                w, c = time.perf_counter(), time.process_time()
                for _ in range(reps):
                    runs[idx]()
                wall[idx].append((time.perf_counter() - w) / reps)
                cpu[idx].append((time.process_time() - c) / reps)
        print(f"{name:22} {nodes:>16} {statistics.median(wall[0]) * 1e3:>8.3f} "
              + " ".join(f"{spread(wall[0], wall[v]):>20} {spread(cpu[0], cpu[v]):>20}"
                         for v in range(1, k)), flush=True)


if __name__ == "__main__":
    main()
