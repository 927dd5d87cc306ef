"""Latency of ``to_conv(model)`` relative to the original, side by side in one run: layout
changes left in the converted graph, and converted / original latency as the median of
interleaved calls (original, converted, original, ...), so load from other processes hits
both alike.

    PYTHONPATH=src python bench/converted_overhead.py                  # CPU, all sizes
    PYTHONPATH=src python bench/converted_overhead.py --quick          # zoo sizes only
    PYTHONPATH=src python bench/converted_overhead.py --realistic      # BERT-base, Llama-like
    PYTHONPATH=src python bench/converted_overhead.py --device cuda --tf32 both --quick
    PYTHONPATH=src python bench/converted_overhead.py --device cuda --tf32 both --realistic
    PYTHONPATH=src python bench/converted_overhead.py --profile --only "zoo vit" --threads 1
    PYTHONPATH=src python bench/converted_overhead.py --variants       # forms the pass could pick
    PYTHONPATH=src python bench/converted_overhead.py --quick --plain  # + plain Conv2d calls
    PYTHONPATH=src python bench/converted_overhead.py --quick --plain --threads 1  # shared CPU
    PYTHONPATH=src python bench/converted_overhead.py --quick --only "zoo vit" --rounds 200

Each row prints the ratio of medians and, in brackets, the 25th-75th percentiles of the
per-round ratios (each round runs both models back to back, in alternating order), for wall
time and for CPU time (``time.process_time``, the process's threads together: on a loaded
machine pin ``--threads 1`` and read the CPU column; on CUDA it is the host's launch time).
``--tf32 both`` times each model with TF32 on and then off (two rows, one conversion; CUDA
only: on CPU TF32 does not apply and one row says ``n/a``); ``--device cuda`` on a machine
without CUDA prints why and exits 0. ``--plain``
adds a third model in the same rounds (the order rotates): the converted model with every 1x1
conv calling the convolution, as before ``PointwiseConv2d`` ran it as ``F.linear`` on the free
channels-last view; it prints plain/original and to_conv/plain.

Models: the zoo's small transformers (hidden 32, batch 2, length 8), a BERT-base-like
BertModel (hidden 768, 12 heads, 2 layers, batch 8, length 128), a Llama-like LlamaModel stack
(hidden 768, 12 heads, 2 layers) and the reference MLP / encoder block. ``--onnx`` adds
onnxruntime: the original exported with ``torch.onnx.export``, converted by
``fc2conv.onnx.to_conv``, Transpose counts and ORT latency ratio (CPU).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "zoo"))

import archs  # noqa: E402

from fc2conv import to_conv  # noqa: E402
from fc2conv.pytorch.layout import layout_changes  # noqa: E402

ZOO_NAMES = ("bert", "distilbert", "roberta", "vit", "whisper_encoder", "t5_encoder", "llama")


def interleaved(a: Callable[[], Any], b: Callable[[], Any], rounds: int,
                sync: Callable[[], None]) -> tuple[list[float], list[float]]:
    """Seconds of each call of ``a`` and of ``b``, calls alternating ``rounds`` times each
    (the order flips every round, so neither always runs second)."""
    for f in (a, b):  # warm up
        f()
        f()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        pair = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for f, out in pair:
            sync()
            t = time.perf_counter()
            f()
            sync()
            out.append(time.perf_counter() - t)
    return ta, tb


def interleaved_many(fs: list[Callable[[], Any]], rounds: int, sync: Callable[[], None],
                     cpu: list[list[float]] | None = None) -> list[list[float]]:
    """Seconds of each call of each ``fs[i]``, the calls in a round running back to back, the
    order rotating every round (so none always runs first). ``cpu``, when given, receives the
    CPU seconds (``time.process_time``) of the same calls, one list per ``fs[i]``."""
    for f in fs:  # warm up
        f()
        f()
    times: list[list[float]] = [[] for _ in fs]
    if cpu is not None:
        cpu[:] = [[] for _ in fs]
    for r in range(rounds):
        for k in range(len(fs)):
            i = (k + r) % len(fs)
            sync()
            t, c = time.perf_counter(), time.process_time()
            fs[i]()
            sync()
            times[i].append(time.perf_counter() - t)
            if cpu is not None:
                cpu[i].append(time.process_time() - c)
    return times


def plain_convs(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a converted model whose 1x1 convs always call the convolution (what
    ``to_conv`` gave before :class:`~fc2conv.core.pointwise_conv.PointwiseConv2d`)."""
    import copy

    from fc2conv.core.pointwise_conv import PointwiseConv1d, PointwiseConv2d, PointwiseConv3d

    plain = copy.deepcopy(model)
    for mod in plain.modules():
        if isinstance(mod, PointwiseConv1d | PointwiseConv2d | PointwiseConv3d):
            def forward(x: torch.Tensor, m: Any = mod) -> torch.Tensor:
                w = m.weight
                if m.tied_matrix:
                    w = w.reshape(*w.shape, *([1] * len(m.kernel_size)))
                return m._conv_forward(x, w, m.bias)  # type: ignore[no-any-return]
            mod.forward = forward  # type: ignore[method-assign]
    return plain


def interleaved_ratio(a: Callable[[], Any], b: Callable[[], Any], rounds: int,
                      sync: Callable[[], None]) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, calls alternating ``rounds`` times each."""
    ta, tb = interleaved(a, b, rounds, sync)
    return statistics.median(ta), statistics.median(tb)


def ratio_spread(ta: list[float], tb: list[float]) -> str:
    """``median(b) / median(a)``, and the 25th-75th percentiles of the per-round ratios
    ``b_i / a_i`` (each pair ran back to back, so load hits both)."""
    ratios = sorted(y / x for x, y in zip(ta, tb, strict=True) if x > 0)
    if not ratios or statistics.median(ta) <= 0:
        return f"{'n/a':>17}"
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
    return f"{statistics.median(tb) / statistics.median(ta):>5.2f}x [{q1:.2f}-{q3:.2f}]"


def realistic(device: torch.device, batch: int, length: int) -> dict[str, tuple[Any, tuple]]:
    """BERT-base-like and Llama-like stacks from configs (random weights, never downloaded)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=2,
                                intermediate_size=3072, vocab_size=1000,
                                attn_implementation="sdpa"), add_pooling_layer=False)
    llama = LlamaModel(LlamaConfig(hidden_size=768, num_attention_heads=12,
                                   num_key_value_heads=12, num_hidden_layers=2,
                                   intermediate_size=2048, vocab_size=1000, use_cache=False,
                                   attn_implementation="sdpa"))
    ids = torch.randint(0, 1000, (batch, length), device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    return {f"bert-base-like {batch}x{length}": (bert, (ids, mask)),
            f"llama-like {batch}x{length}": (llama, (ids, mask))}


def onnx_row(model: Any, inputs: tuple, rounds: int) -> str:
    """Transposes original -> converted and ORT converted/original latency."""
    import io

    import onnx
    import onnxruntime as ort

    from fc2conv.onnx import to_conv as onnx_to_conv

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.cpu(), tuple(t.cpu() for t in inputs), buf, dynamo=False)
    original = onnx.load_from_string(buf.getvalue())
    converted = onnx_to_conv(original)
    def count(m: onnx.ModelProto) -> int:
        return sum(n.op_type == "Transpose" for n in m.graph.node)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (original, converted)]
    names = [i.name for i in sessions[0].get_inputs()]
    feeds = {n: t.cpu().numpy() for n, t in zip(names, inputs, strict=False)}
    ta, tb = interleaved_ratio(lambda: sessions[0].run(None, feeds),
                               lambda: sessions[1].run(None, feeds), rounds, lambda: None)
    return f"Transpose {count(original)}->{count(converted)}, ORT {tb / ta:.2f}x"


@torch.no_grad()
def variants(device: torch.device, batch: int, length: int, rounds: int,
             sync: Callable[[], None]) -> None:
    """The converted BERT-base-like model in the forms the pass could pick, each timed
    interleaved against the original: Conv2d on (B, C, 1, S) as converted (channel_attention
    einsums), the same with SDPA on head views instead (:func:`sdpa_pass`, moves around each
    attention), Conv2d weights and inputs in channels_last, and Conv1d on (B, C, S) (dims=1)."""
    from fc2conv.pytorch.attention import sdpa_pass

    name, (model, inputs) = next(iter(realistic(device, batch, length).items()))
    model = model.to(device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv2d = to_conv(model, inputs, verify=False).to(device)
        conv1d = to_conv(model, inputs, dims=1, verify=False).to(device)
        sdpa = to_conv(model, inputs, verify=False).to(device)
    sdpa_pass(sdpa)
    sdpa.graph.lint()
    sdpa.recompile()
    last = to_conv(model, inputs, verify=False).to(device).to(memory_format=torch.channels_last)
    matmul = to_conv(model, inputs, verify=False).to(device)
    for mod in matmul.modules():  # the same 1x1 convs computed as one batched GEMM each
        if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1):
            mod.forward = _conv_as_matmul(mod)  # type: ignore[method-assign]
    forms = {"Conv2d (B,C,1,S), einsum attention": conv2d,
             "Conv2d + SDPA on head views": sdpa,
             "Conv2d, channels_last weights": last,
             "Conv2d 1x1 run as W @ x.view(B,C,S)": matmul,
             "Conv1d (B,C,S), dims=1": conv1d}
    print(f"{name}: {'variant':38} {'moves':>5} {'original ms':>12} {'variant ms':>11} "
          f"{'ratio [IQR]':>17}")
    for label, form in forms.items():
        ta, tb = interleaved(lambda: model(*inputs), lambda f=form: f(*inputs), rounds, sync)
        print(f"{'':{len(name) + 2}}{label:38} {len(layout_changes(form)):>5} "
              f"{statistics.median(ta) * 1e3:>12.2f} {statistics.median(tb) * 1e3:>11.2f} "
              f"{ratio_spread(ta, tb)}", flush=True)


def _conv_as_matmul(conv: torch.nn.Conv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """``conv``'s forward on ``(B, C, 1, S)`` as ``baddbmm(b, W, x.view(B, C, S))``: the same
    linear map per position, another summation order (a bench variant, not what the pass
    emits: an exported graph must keep the convolution)."""
    w = conv.weight.detach()[:, :, 0, 0]
    bias = conv.bias.detach()[None, :, None] if conv.bias is not None else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, c, h, s = x.shape
        flat = x.reshape(b, c, h * s)
        y = torch.matmul(w, flat) if bias is None else torch.baddbmm(
            bias, w.expand(b, -1, -1), flat)
        return y.reshape(b, -1, h, s)
    return forward


@torch.no_grad()
def profile(name: str, model: Any, inputs: tuple, device: torch.device, calls: int) -> None:
    """Where the converted model loses time: torch.profiler's calls and self time per aten op
    and per call of the model, original and converted side by side, joined by op (``calls``
    profiled calls each, after two warm-up calls). Ops the converted model calls more often
    than the original are what the conversion adds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = model.to(device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = to_conv(model, inputs, verify=False).to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables: list[dict[str, tuple[float, float]]] = []
    for m in (model, conv):
        m(*inputs)
        m(*inputs)
        with torch_profile(activities=acts) as prof:
            for _ in range(calls):
                m(*inputs)
        tables.append({e.key: (e.count / calls, getattr(e, key, 0) / calls / 1e3)
                       for e in prof.key_averages()})
    ops = sorted(set(tables[0]) | set(tables[1]),
                 key=lambda k: -max(t.get(k, (0, 0))[1] for t in tables))
    print(f"{name}: per call of the model, {calls} calls profiled")
    print(f"{'op':44} {'orig calls':>10} {'ms':>8} {'conv calls':>10} {'ms':>8}")
    for op in ops[:30]:
        (na, ta), (nb, tb) = (t.get(op, (0.0, 0.0)) for t in tables)
        print(f"{op[:44]:44} {na:>10.0f} {ta:>8.3f} {nb:>10.0f} {tb:>8.3f}")
    totals = [(sum(n for n, _ in t.values()), sum(ms for _, ms in t.values())) for t in tables]
    print(f"{'all ops':44} {totals[0][0]:>10.0f} {totals[0][1]:>8.3f} {totals[1][0]:>10.0f} "
          f"{totals[1][1]:>8.3f}")


def set_tf32(on: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (both sides of a row alike)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def tf32_settings(choice: str, device: torch.device) -> list[str]:
    """The TF32 rows to time: ``on``/``off``/both on CUDA; one ``n/a`` row elsewhere (TF32 is
    a CUDA math mode)."""
    if device.type != "cuda":
        return ["n/a"]
    return ["on", "off"] if choice == "both" else [choice]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tf32", choices=("on", "off", "both"), default="off",
                        help="CUDA TF32 for matmuls and convs; both: a row with each")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=0,
                        help="interleaved calls per model (default: 30 zoo, 10 realistic CPU)")
    parser.add_argument("--quick", action="store_true", help="zoo sizes and reference blocks only")
    parser.add_argument("--realistic", action="store_true",
                        help="only the BERT-base-like and Llama-like stacks")
    parser.add_argument("--only", action="append", default=[],
                        help="run only these models (by the name in the first column)")
    parser.add_argument("--onnx", action="store_true", help="add onnxruntime ratios (CPU)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (default: torch's; 1 on a shared machine)")
    parser.add_argument("--plain", action="store_true",
                        help="also time the converted model with plain Conv calls (each 1x1 "
                        "conv never runs as F.linear), interleaved with the other two")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler calls and self time per op, original and "
                        "converted, for the models chosen (--only, --quick, --realistic)")
    parser.add_argument("--variants", action="store_true",
                        help="only the BERT-base-like model: the converted graph's variants "
                        "(Conv1d, channels_last, SDPA instead of channel_attention)")
    return parser.parse_args(argv)


def all_cases(args: argparse.Namespace, device: torch.device
              ) -> dict[str, Callable[[], tuple[Any, tuple]]]:
    """Model name -> a builder of ``(model, inputs)``, in the order of the table."""
    def reference(kind: str) -> tuple[Any, tuple]:
        x = torch.randn(args.batch, args.length, 256, device=device)
        model = archs.MLP(dim=256, hidden=1024) if kind == "mlp" else \
            archs.EncoderBlock(dim=256, heads=4, hidden=1024)
        return model, (x,)

    cases: dict[str, Callable[[], tuple[Any, tuple]]] = {}
    if not args.realistic:
        cases["mlp 256"] = lambda: reference("mlp")
        cases["encoder block 256"] = lambda: reference("block")
        for name in ZOO_NAMES:
            cases[f"zoo {name}"] = lambda name=name: zoo_case(name, device)
    if not args.quick:
        built = functools.cache(lambda: realistic(device, args.batch, args.length))
        for name in (f"bert-base-like {args.batch}x{args.length}",
                     f"llama-like {args.batch}x{args.length}"):
            cases[name] = lambda name=name: built()[name]
    return {k: v for k, v in cases.items() if not args.only or k in args.only}


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"CUDA is not available here (torch {torch.__version__}); --device cuda skipped")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = tf32_settings(args.tf32, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"tf32 {'/'.join(settings)}, load {os.getloadavg()[0]:.1f}")
    set_tf32(settings[0] == "on")
    if args.profile:
        for name, build in all_cases(args, device).items():
            model, inputs = build()
            profile(name, model, inputs, device, 50 if "zoo" in name else 3)
        return
    if args.variants:
        variants(device, args.batch, args.length, args.rounds or 10, sync)
        return
    print(f"{'model':28} {'tf32':>4} {'layout changes':>14} {'original ms':>12} "
          f"{'to_conv ms':>11} {'ratio [IQR]':>17} {'cpu ratio [IQR]':>17} {'max |diff|':>10}"
          + (f" {'plain conv ratio':>17} {'to_conv/plain':>17}" if args.plain else "")
          + ("  onnx" if args.onnx else ""))
    for name, build in all_cases(args, device).items():
        model, inputs = build()
        model = model.to(device).eval()
        set_tf32(settings[0] == "on")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = to_conv(model, inputs, verify=False).to(device)
        found = layout_changes(conv)
        tables = sum(c.direction == "table" for c in found)
        changes = f"{len(found) - tables}" + (f" +{tables}tab" if tables else "")
        big = "zoo" not in name
        rounds = args.rounds or (10 if big and device.type == "cpu" else 30)
        plain = plain_convs(conv) if args.plain else None
        for tf32 in settings:
            set_tf32(tf32 == "on")
            row = timed_row(name, tf32, changes, model, conv, plain, inputs, rounds, sync)
            if args.onnx and "zoo" in name:
                try:
                    row += "  " + onnx_row(model, inputs, rounds)
                except Exception as exc:  # an exporter failure is a row, not the end of the run
                    row += f"  onnx n/a ({type(exc).__name__})"
            print(row, flush=True)


def zoo_case(name: str, device: torch.device) -> tuple[Any, tuple]:
    """Zoo model ``name`` and its draw 0 (batch 2, length 8) on ``device``."""
    import zoo_models

    z = zoo_models.ZOO[name]
    return z.build(), tuple(v.to(device) for v in z.draw(0).values())


def timed_row(name: str, tf32: str, changes: str, model: Any, conv: Any, plain: Any,
              inputs: tuple, rounds: int, sync: Callable[[], None]) -> str:
    """One table row: the largest difference, then original / converted (/ plain) timed
    interleaved, wall and CPU."""
    def first(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out[0]
    diff = (first(conv(*inputs)) - first(model(*inputs))).abs().max().item()
    calls: list[Callable[[], Any]] = [lambda m=model, i=inputs: m(*i),
                                      lambda m=conv, i=inputs: m(*i)]
    if plain is not None:
        calls.append(lambda m=plain, i=inputs: m(*i))
    cpu: list[list[float]] = []
    ta, tb, *tc = interleaved_many(calls, rounds, sync, cpu)
    row = (f"{name:28} {tf32:>4} {changes:>14} {statistics.median(ta) * 1e3:>12.3f} "
           f"{statistics.median(tb) * 1e3:>11.3f} {ratio_spread(ta, tb)} "
           f"{ratio_spread(cpu[0], cpu[1])} {diff:>10.2g}")
    if tc:
        row += f" {ratio_spread(ta, tc[0])} {ratio_spread(tc[0], tb)}"
    return row


if __name__ == "__main__":
    main()
