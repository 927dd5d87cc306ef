"""compare's cost of one more draw, against the two float32 forward passes (issue 9: <= 10x).

For each case (model A against a clean B), each round runs, interleaved:

1. the two float32 forward passes (A and B natively, sessions built beforehand; the median of
   ``--fwd-reps`` repeats);
2. ``compare(a, b, inputs=[d0], layers=False)`` and ``compare(a, b, inputs=[d0, ..., dS],
   layers=False)`` on fresh draws; their difference over ``S`` is the cost of one more draw
   (what runs once per compare, loading and building sessions and twins, cancels).

Wall time (``time.perf_counter``) and CPU time (``time.process_time``: every thread of this
process) are measured for both. Torch and onnxruntime are pinned to the same thread count
(``--threads``, default 1; intra and inter op: compare's sessions use
``torch.get_num_threads()``). Printed per case: the medians of the per-round ratios with their
min-max spread, and the seconds behind them.

Cases: ``onnx_cnn`` (small CNN, batch 8, 32x32), ``onnx_bert`` (BERT hidden 256, 4 layers,
batch 4, length 128), ``onnx_llama`` (Llama-like, hidden 256, 4 layers, 2 K/V heads, batch 4,
length 128), each against ``fc2conv.onnx.to_conv`` of it; ``torch_bert`` and ``torch_cnn``
(the same models in PyTorch against ``fc2conv.to_conv``); ``monai3d`` (the zoo's MONAI ResNet
3-D, batch 2, 32^3, against ``to_conv``); ``export`` (torch BERT h256 against its own ONNX
export).

    PYTHONPATH=src:tests/zoo python bench/compare_cost.py                       # all cases
    PYTHONPATH=src:tests/zoo python bench/compare_cost.py --cases onnx_bert --rounds 7
    PYTHONPATH=src:tests/zoo python bench/compare_cost.py --cases onnx_bert --profile  # cProfile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "zoo"))

CASES = ["onnx_cnn", "onnx_bert", "onnx_llama", "torch_bert", "torch_cnn", "monai3d", "export"]


def _export(model: torch.nn.Module, x: tuple[torch.Tensor, ...], names: list[str],
            folder: Path) -> Any:
    import onnx

    path = folder / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), input_names=names, dynamo=False,
                          opset_version=18)
    return onnx.load(str(path))


def _llama_torch() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=688, max_position_embeddings=256,
                                   use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, attention_mask=mask).logits  # type: ignore[no-any-return]

    ids = torch.randint(0, 1000, (4, 128))
    return Wrap().eval(), (ids, torch.ones_like(ids))


def build(case: str, folder: Path) -> tuple[Any, Any, tuple[torch.Tensor, ...]]:
    """(A, B, a draw) for ``case``."""
    from verdicts_scale import _bert_torch, _cnn_torch

    import fc2conv

    if case in ("onnx_cnn", "torch_cnn"):
        model, x = _cnn_torch()
    elif case in ("onnx_bert", "torch_bert", "export"):
        model, x = _bert_torch()
    elif case == "onnx_llama":
        model, x = _llama_torch()
    elif case == "monai3d":
        from zoo_models import ZOO

        model = ZOO["monai_resnet3d"].build(0)
        x = tuple(ZOO["monai_resnet3d"].draw(0, batch=2).values())
    else:
        raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")
    names = ["input_ids", "attention_mask"] if len(x) == 2 else ["x"]
    if case.startswith("onnx_"):
        proto = _export(model, x, names, folder)
        return proto, fc2conv.onnx.to_conv(proto), x
    if case == "export":
        return model, _export(model, x, names, folder), x
    return model, fc2conv.to_conv(model, x), x


def fresh(x: tuple[torch.Tensor, ...], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A new draw like ``x``: floats redrawn, integers (ids; masks of ones) shuffled."""
    return tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else
                 t.reshape(-1)[torch.randperm(t.numel(), generator=gen)].reshape(t.shape)
                 for t in x)


def timed(f: Callable[[], Any]) -> tuple[float, float]:
    """(wall s, CPU s) of ``f()``."""
    w, c = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - w, time.process_time() - c


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def measure(case: str, a: Any, b: Any, x: tuple[torch.Tensor, ...], rounds: int,
            samples: int, fwd_reps: int) -> dict[str, list[float]]:
    from fc2conv.verify import compare
    from fc2conv.verify.models import load

    ma, mb = load(a, "A"), load(b, "B")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ma.run(x), mb.run(x)  # sessions built once, as compare builds them once

    def forwards() -> None:
        with torch.no_grad():
            ma.run(x)
            mb.run(x)

    got: dict[str, list[float]] = {k: [] for k in
                                   ("fwd_w", "fwd_c", "draw_w", "draw_c", "ratio_w", "ratio_c",
                                    "fixed_w")}
    for _ in range(rounds):
        reps = [timed(forwards) for _ in range(fwd_reps)]
        fw = statistics.median(r[0] for r in reps)
        fc = statistics.median(r[1] for r in reps)
        draws = [fresh(x, gen) for _ in range(1 + samples)]
        one = timed(lambda d=draws[:1]: compare(a, b, inputs=d, layers=False))
        many = timed(lambda d=draws: compare(a, b, inputs=d, layers=False))
        dw, dc = (many[0] - one[0]) / samples, (many[1] - one[1]) / samples
        got["fwd_w"].append(fw)
        got["fwd_c"].append(fc)
        got["draw_w"].append(dw)
        got["draw_c"].append(dc)
        got["ratio_w"].append(dw / fw)
        got["ratio_c"].append(dc / max(fc, 1e-9))
        got["fixed_w"].append(one[0] - dw)
    return got


def profile(a: Any, b: Any, x: tuple[torch.Tensor, ...], samples: int, top: int) -> None:
    """cProfile of one compare over ``1 + samples`` draws (cumulative time, top functions)."""
    from fc2conv.verify import compare

    gen = torch.Generator().manual_seed(0)
    draws = [fresh(x, gen) for _ in range(1 + samples)]
    compare(a, b, inputs=draws[:1], layers=False)  # warm imports
    prof = cProfile.Profile()
    prof.enable()
    compare(a, b, inputs=draws, layers=False)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=2, help="extra draws per measured compare")
    ap.add_argument("--fwd-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    ap.add_argument("--profile", action="store_true", help="cProfile one compare per case")
    ap.add_argument("--top", type=int, default=45)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    print(f"threads {args.threads}; {args.rounds} rounds; {args.samples} extra draws; ratios: "
          "median [min-max] over rounds", flush=True)
    print(f"{'case':<11} {'compare/draw wall x':>22} {'CPU x':>20} {'draw s':>7} "
          f"{'2 fwd s':>8} {'fixed s':>8}", flush=True)
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="fc2conv-cost-") as tmp:
            a, b, x = build(case, Path(tmp))
            if args.profile:
                print(f"=== {case}", flush=True)
                profile(a, b, x, args.samples, args.top)
                continue
            got = measure(case, a, b, x, args.rounds, args.samples, args.fwd_reps)
        print(f"{case:<11} {spread(got['ratio_w']):>22} {spread(got['ratio_c']):>20} "
              f"{statistics.median(got['draw_w']):7.3f} {statistics.median(got['fwd_w']):8.4f} "
              f"{statistics.median(got['fixed_w']):8.2f}", flush=True)


if __name__ == "__main__":
    main()
