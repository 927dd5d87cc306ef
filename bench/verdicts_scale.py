"""How compare's peak memory and time grow with the models: ONNX MLP pairs and per-draw cost.

Two parts, each printing ratios measured in this run:

1. ``--sizes``: for each hidden width ``H``, an ONNX MLP ``x (B, H) -> MatMul W1 (H, H) -> Relu
   -> MatMul W2 (H, H)`` (float32, weights ``2 H^2 x 4`` bytes) and its ``to_conv`` twin are
   written into a temporary folder (never the repo), then ``fc2conv compare A B`` runs in a
   fresh process; printed: the weights of both models, the peak RSS of that process (VmHWM;
   not ``ru_maxrss``, which Linux starts from the forking parent's RSS, this bench's own
   models), its anonymous and file-backed parts when the RSS was highest (sampled every 50 ms;
   file pages: memory-mapped external data and libraries, clean pages the kernel can drop;
   the sample may miss the very top by a few ms, so anon + file can fall short of VmHWM), the ratio
   ``(peak - fixed) / weights`` (fixed: the RSS of a process that imported torch and
   onnxruntime and compared two tiny models), wall time, and the verdict. The issue's target:
   peak <= 3 x the weights of A and B + ~1.5 GB.
2. ``--per-draw``: compare's time per draw (``compare(samples=1+S)`` minus ``compare(samples=
   1)``, over ``S``: the cost of one more draw; the once-per-compare cost, loading and building
   sessions, is printed apart as "fixed") over the time of the two float32 forward passes (A
   and B natively), on an ONNX BERT export (hidden 256, 4 layers, batch 4, length 128) and a
   small CNN, both against their ``to_conv`` conversions; interleaved repeats, median ratio.
   The issue's budget: at most 10x.

    python bench/verdicts_scale.py --sizes 4096 9216          # 64 MB and 340 MB matrices
    python bench/verdicts_scale.py --sizes 16384 --check-free 17   # 2 GB pair, only if free
    python bench/verdicts_scale.py --per-draw
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, resource, sys, threading, time
t = time.perf_counter()
top = {"VmRSS": 0, "RssFile": 0, "RssAnon": 0}


def sample():  # the anonymous and file-backed (memory-mapped) parts of the RSS at its highest
    while True:
        got = {line.split(":")[0]: int(line.split()[1]) * 1024
               for line in open("/proc/self/status")
               if line.startswith(("VmRSS", "RssFile", "RssAnon"))}
        if got.get("VmRSS", 0) > top["VmRSS"]:
            top.update(got)
        time.sleep(0.05)


threading.Thread(target=sample, daemon=True).start()
from fc2conv.verify import compare
code = 0
try:
    rep = compare(sys.argv[1], sys.argv[2], samples=int(sys.argv[3]), layers=True, seed=0)
    verdict = rep.verdict
except Exception as err:
    verdict, code = f"refused: {err}", 2
# VmHWM: this process's own peak. Not ru_maxrss: Linux carries the parent's RSS at the fork
# into the child's ru_maxrss across exec, which counted the bench's own models in the peak
status = {line.split(":")[0]: int(line.split()[1]) * 1024
          for line in open("/proc/self/status") if line.startswith("VmHWM")}
peak = status.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"verdict": verdict, "peak": peak, "mapped": top["RssFile"],
                  "anon": top["RssAnon"],
                  "time": time.perf_counter() - t, "code": code}))
"""


def mlp(hidden: int, folder: Path, batch: int = 4) -> tuple[Path, Path, int]:
    """Write the MLP pair for width ``hidden``; returns (A, B, weight bytes of both). Pairs
    over 1 GB are streamed: A's weights written row block by row block as external data, B
    made by ``fc2conv convert --no-check`` (which streams external data too)."""
    if 2 * hidden * hidden * 4 > 1 << 30:
        return _mlp_streamed(hidden, folder, batch)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fc2conv.onnx import to_conv

    rng = np.random.default_rng(hidden)
    inits = [numpy_helper.from_array(
        (rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))),
        name)
        for name in ("W1", "W2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del inits
    a, b = folder / f"mlp{hidden}.onnx", folder / f"mlp{hidden}_conv.onnx"
    big = model.ByteSize() > (1 << 31) - (1 << 26)
    save = dict(save_as_external_data=True, all_tensors_to_one_file=True) if big else {}
    onnx.save_model(model, str(a), **({**save, "location": a.name + ".data"} if big else {}))
    conv = to_conv(model)
    del model
    onnx.save_model(conv, str(b), **({**save, "location": b.name + ".data"} if big else {}))
    return a, b, 2 * 2 * hidden * hidden * 4


def _mlp_streamed(hidden: int, folder: Path, batch: int) -> tuple[Path, Path, int]:
    import onnx
    from onnx import TensorProto, helper

    a, b = folder / f"mlp{hidden}.onnx", folder / f"mlp{hidden}_conv.onnx"
    data = folder / f"mlp{hidden}.bin"
    rng = np.random.default_rng(hidden)
    inits = []
    with open(data, "wb") as f:
        for name in ("W1", "W2"):
            offset = f.tell()
            for start in range(0, hidden, 1024):
                rows = min(1024, hidden - start)
                block = rng.standard_normal((rows, hidden), dtype=np.float32)
                f.write((block / np.float32(np.sqrt(hidden))).tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[hidden, hidden],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)),
                               ("length", str(hidden * hidden * 4))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            inits.append(t)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, hidden])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                    str(a))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    subprocess.run([sys.executable, "-m", "fc2conv", "convert", str(a), str(b), "--to", "conv",
                    "--no-check"], check=True, env=env, capture_output=True)
    return a, b, 2 * 2 * hidden * hidden * 4


def run_child(a: Path, b: Path, samples: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(a), str(b), str(samples)],
                         capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"verdict": f"killed (rc {out.returncode}): {out.stderr[-200:]}", "peak": 0,
                "time": 0, "code": out.returncode}
    return json.loads(lines[-1])


def sizes(widths: list[int], samples: int, check_free: float) -> None:
    with tempfile.TemporaryDirectory(prefix="fc2conv-bench-") as tmp:
        folder = Path(tmp)
        a, b, _ = mlp(64, folder)
        fixed = run_child(a, b, samples)["peak"]
        print(f"fixed RSS (torch + onnxruntime + a tiny compare): {fixed / 2**30:.2f} GiB")
        print(f"{'hidden':>7} {'weights A+B':>12} {'peak RSS':>9} {'anon':>7} {'file pages':>11} "
              f"{'(peak-fixed)/weights':>21} {'target':>8} {'time s':>7}  verdict")
        for h in widths:
            budget = 3 * (2 * 2 * h * h * 4) / 2**30 + 1.5  # 3x the weights of A+B + 1.5 GB
            if check_free and _available_gib() < check_free:
                print(f"{h:>7} skipped: less than {check_free} GiB available")
                continue
            a, b, weights = mlp(h, folder)
            r = run_child(a, b, samples)
            ratio = (r["peak"] - fixed) / weights
            print(f"{h:>7} {weights / 2**30:>10.2f}G {r['peak'] / 2**30:>8.2f}G "
                  f"{r.get('anon', 0) / 2**30:>6.2f}G {r.get('mapped', 0) / 2**30:>10.2f}G "
                  f"{ratio:>21.2f} {budget:>7.1f}G "
                  f"{r['time']:>7.1f}  {r['verdict'][:100]}", flush=True)
            for p in folder.glob("*"):
                p.unlink()


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    return 0.0


def per_draw(repeats: int, samples: int, paths: list[str]) -> None:
    import torch

    from fc2conv.onnx import to_conv
    from fc2conv.verify import compare
    from fc2conv.verify.models import load

    pairs: dict[str, tuple[Any, Any, tuple[Any, ...]]] = {}
    if "onnx" in paths:
        with tempfile.TemporaryDirectory(prefix="fc2conv-bench-") as tmp:
            import onnx

            for k, (path, x) in {"onnx bert h256 L4 b4 n128": _bert_onnx(Path(tmp)),
                                 "onnx small cnn b8 32x32": _cnn_onnx(Path(tmp))}.items():
                pairs[k] = (onnx.load(str(path)), to_conv(onnx.load(str(path))), x)
    if "torch" in paths:
        import fc2conv

        for k, (module, x) in {"torch bert h256 L4 b4 n128": _bert_torch(),
                               "torch small cnn b8 32x32": _cnn_torch()}.items():
            pairs[k] = (module, fc2conv.to_conv(module, x), x)
    print(f"{'model':<26} {'compare/draw s':>15} {'2 fwd f32 s':>12} {'ratio':>7} "
          f"{'fixed s':>9}")
    gen = torch.Generator().manual_seed(0)

    def fresh(x: tuple[Any, ...]) -> tuple[Any, ...]:
        """A new draw like ``x``: floats redrawn, integers (ids, masks) shuffled."""
        return tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else
                     t.reshape(-1)[torch.randperm(t.numel(), generator=gen)].reshape(t.shape)
                     for t in x)

    for name, (a, b, x) in pairs.items():
        ma, mb = load(a, "A"), load(b, "B")
        ratios, cmp_t, fwd_t, fixed_t = [], [], [], []
        ma.run(x), mb.run(x)  # sessions built once, as compare builds them once
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                ma.run(x)
                mb.run(x)
            fwd = time.perf_counter() - t
            draws = [fresh(x) for _ in range(1 + samples)]
            t = time.perf_counter()
            compare(a, b, inputs=draws[:1], layers=False)
            one = time.perf_counter() - t
            t = time.perf_counter()
            compare(a, b, inputs=draws, layers=False)
            c = (time.perf_counter() - t - one) / samples  # the cost of one more draw
            ratios.append(c / fwd)
            cmp_t.append(c)
            fwd_t.append(fwd)
            fixed_t.append(one - c)
        print(f"{name:<26} {statistics.median(cmp_t):>15.3f} {statistics.median(fwd_t):>12.4f} "
              f"{statistics.median(ratios):>7.1f} {statistics.median(fixed_t):>9.2f}",
              flush=True)


def _bert_torch() -> tuple[Any, tuple[Any, ...]]:
    import torch
    import transformers

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=1024,
                                  max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 1000, (4, 128))
    return Wrap().eval(), (ids, torch.ones_like(ids))


def _bert_onnx(folder: Path) -> tuple[Path, tuple[Any, ...]]:
    import warnings

    import torch

    model, x = _bert_torch()
    path = folder / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), input_names=["input_ids", "attention_mask"],
                          dynamo=False, opset_version=17)
    return path, x


def _cnn_torch() -> tuple[Any, tuple[Any, ...]]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    return model, (torch.randn(8, 3, 32, 32),)


def _cnn_onnx(folder: Path) -> tuple[Path, tuple[Any, ...]]:
    import warnings

    import torch

    model, x = _cnn_torch()
    path = folder / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), input_names=["x"], dynamo=False,
                          opset_version=17)
    return path, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=None,
                    help="hidden widths of the MLP pairs (4096: 64 MB per matrix)")
    ap.add_argument("--per-draw", action="store_true")
    ap.add_argument("--paths", default="onnx,torch", help="per-draw cases: onnx, torch")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-free", type=float, default=0.0,
                    help="skip a size when less than this many GiB are available")
    args = ap.parse_args()
    if args.sizes is None and not args.per_draw:
        args.sizes = [1024, 4096]
    if args.sizes:
        sizes(args.sizes, args.samples, args.check_free)
    if args.per_draw:
        per_draw(args.repeats, args.samples, args.paths.split(","))


if __name__ == "__main__":
    main()
