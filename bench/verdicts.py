"""compare's verdicts over the model zoo: false alarms, misses, localization, cost per draw.

For every zoo model (``tests/zoo/zoo_models.py``, small random configs) and ``--draws`` random
input draws:

- clean pairs, which must never be "different": ``A`` vs ``to_conv(A)`` (path ``to_conv``),
  ``A`` vs ``to_linear(to_conv(A))`` (path ``to_linear``); ``A`` vs its own ONNX export
  (``export``, torch.onnx, legacy exporter); ``A`` vs ``A`` with every Linear summing its input
  features in two halves (``order``: another summation order); the export ``E`` vs
  ``fc2conv.onnx.to_conv(E)`` (``onnx_to_conv``) and ``to_conv(E)`` vs
  ``to_linear(to_conv(E))`` (``onnx_to_linear``);
- planted bugs, ``A`` vs ``to_conv(A')`` where ``A'`` is ``A`` with one Linear changed: +1e-3 on
  one weight, the square weight transposed, two rows swapped, the bias dropped, one row scaled by
  1.01 (and, on a small CNN with Flatten -> Linear, the Linear's input read in HWC order); the
  same on the ONNX path (``onnx bug: ...``: ``E`` vs ``fc2conv.onnx.to_conv(export(A'))``);
- the foreign ONNX files (``tests/zoo/foreign``, tf2onnx / skl2onnx / hand-built): ``to_conv``,
  ``to_linear`` and +1e-3 on element 0 of each weight (``--models`` entry ``foreign``).

A bug must be caught ("different") on every draw where it is *significant*: B's largest error
against A's float64 twin exceeds 10x A's own largest error (floored at one unit roundoff of the
output's scale), measured here independently of compare (plain float64 forward of A). The first
divergence must name the planted layer. Printed per model and path: draws, false alarms, bug
draws, significant ones, misses, mislocalized; then compare's time per draw (ratio to the two
float32 forward passes, measured interleaved) and peak RSS against the models' weight size.

    PYTHONPATH=src:tests/zoo python bench/verdicts.py                 # full sweep, 20 draws
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --draws 3 --models bert,vit
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --paths onnx_to_conv,onnx_bugs
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))

from zoo_models import ZOO, ZooModel, foreign_draws, foreign_models, logits  # noqa: E402

import fc2conv  # noqa: E402

DEFAULT = ["bert", "roberta", "distilbert", "t5_encoder", "llama", "vit", "whisper_encoder",
           "resnet_hf", "cnn_flatten", "foreign"]
PATHS = "to_conv,to_linear,export,order,onnx_to_conv,onnx_to_linear,bugs,onnx_bugs"
RATIO = 10.0


class Logits(nn.Module):
    """The model with its main output only (what is exported to ONNX)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return logits(self.m(*args))


def export(model: nn.Module, x: tuple[torch.Tensor, ...], names: list[str]) -> Any:
    """``model`` (its main output) exported by torch.onnx's legacy exporter, as a ModelProto."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = f"{tmp}/m.onnx"
        torch.onnx.export(Logits(model).eval(), x, path, dynamo=False, input_names=names,
                          opset_version=18)
        return onnx.load(path)


class SplitLinear(nn.Linear):
    """``lin`` (same parameters) summing its input features in two halves: the same map,
    another summation order (same precision)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.weight = lin.weight
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        w = self.weight
        y = x[..., h:] @ w[:, h:].T + x[..., :h] @ w[:, :h].T
        return y if self.bias is None else y + self.bias


def reordered(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for mod in list(twin.modules()):
        for child, sub in list(mod.named_children()):
            if type(sub) is nn.Linear and sub.in_features >= 2:
                setattr(mod, child, SplitLinear(sub))
    return twin


class CnnFlatten(nn.Module):
    """A small CNN whose head flattens a C x H x W map (CHW order) into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build(name: str, seed: int = 0) -> nn.Module:
    if name == "cnn_flatten":
        torch.manual_seed(seed)
        return CnnFlatten().eval()
    return ZOO[name].build(seed)


def draw(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(named_draw(name, seed).values())


def named_draw(name: str, seed: int) -> dict[str, torch.Tensor]:
    if name == "cnn_flatten":
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(2, 3, 6, 6, generator=g)}
    z: ZooModel = ZOO[name]
    if z.family in ("text", "seq2seq"):
        return z.draw(seed, batch=2, length=8)
    return z.draw(seed, batch=2)


def as_numpy(x: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return tuple(t.numpy() for t in x)


def run_onnx(proto: Any, x: tuple[Any, ...]) -> torch.Tensor:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feeds = {i.name: v for i, v in zip(sess.get_inputs(), x, strict=True)}
    return torch.from_numpy(sess.run(None, feeds)[0])


def planted_layer(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """A Linear in the middle of the model, square with a bias when there is one."""
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not lins:
        return None
    square = [(n, m) for n, m in lins if m.weight.shape[0] == m.weight.shape[1]
              and m.bias is not None] or [(n, m) for n, m in lins
                                          if m.weight.shape[0] == m.weight.shape[1]] or lins
    return square[len(square) // 2]


def bugs(name: str, lin: nn.Linear) -> dict[str, Any]:
    out: dict[str, Any] = {}
    w = lin.weight
    out["+1e-3 weight"] = lambda m: m.weight.data.__setitem__((0, 1), m.weight.data[0, 1] + 1e-3)
    if w.shape[0] == w.shape[1]:
        out["transposed"] = lambda m: m.weight.data.copy_(m.weight.data.t().clone())
    if w.shape[0] >= 2:
        order = [1, 0, *range(2, w.shape[0])]
        out["rows swapped"] = lambda m: m.weight.data.copy_(m.weight.data[order])
    if lin.bias is not None and bool(lin.bias.abs().max() > 0):
        out["bias dropped"] = lambda m: m.bias.data.zero_()
    out["row x1.01"] = lambda m: m.weight.data[0].mul_(1.01)
    if name == "cnn_flatten":
        def hwc(m: nn.Linear) -> None:
            m.weight.data.copy_(m.weight.data.view(10, 4, 6, 6).permute(0, 2, 3, 1).reshape(10, -1))
        out["flatten order"] = hwc
    return out


def output(m: Any, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The main output of a torch model or an ONNX ModelProto (onnxruntime) on draw ``x``."""
    if isinstance(m, nn.Module):
        with torch.no_grad():
            return logits(m(*x))
    return run_onnx(m, as_numpy(x))


def errors(a: Any, a64: nn.Module, b: Any, x: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(A's error, B's error) against A's float64 twin, A's floored at u x scale."""
    with torch.no_grad():
        r = logits(a64(*[t.double() if t.is_floating_point() else t for t in x])).double()
    ya = output(a, x).double()
    yb = output(b, x).double().reshape(ya.shape)
    u = torch.finfo(torch.float32).eps / 2
    ea = max(float((ya - r).abs().max()), u * float(r.abs().max()))
    return ea, float((yb - r).abs().max())


def located(planted: str, where: str | None) -> bool:
    """The first divergence names the planted layer (a module path, or an ONNX node path)."""
    return where is not None and (planted in where or planted.replace(".", "/") in where)


def weight_bytes(*models: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def model_pairs(name: str, paths: list[str]) -> tuple[Any, list[tuple[str, Any, Any, str | None]]]:
    """(A's float64 twin, [(path, A, B, planted layer or None)]) for one zoo model."""
    import fc2conv.onnx

    a = build(name)
    nd = named_draw(name, 10_000)
    x0 = tuple(nd.values())
    a64 = copy.deepcopy(a).double()
    pairs: list[tuple[str, Any, Any, str | None]] = []

    def add(path: str, a: Any, make_b: Any, planted: str | None = None) -> None:
        try:
            pairs.append((path, a, make_b(), planted))
        except Exception as err:  # a conversion failure is reported, not fatal
            print(f"{name}\t{path}\tnot built: {str(err).splitlines()[0][:150]}", flush=True)

    if "to_conv" in paths:
        add("to_conv", a, lambda: fc2conv.to_conv(a, x0))
    if "to_linear" in paths:
        add("to_linear", a, lambda: fc2conv.to_linear(fc2conv.to_conv(a, x0), x0))
    if "order" in paths:
        add("order", a, lambda: reordered(a))
    onnx_paths = {"export", "onnx_to_conv", "onnx_to_linear", "onnx_bugs"} & set(paths)
    e = None
    if onnx_paths:
        try:
            e = export(a, x0, list(nd))
        except Exception as err:  # an exporter failure is reported, not fatal
            print(f"{name}\texport failed: {str(err).splitlines()[0][:120]}", flush=True)
    if e is not None:
        if "export" in paths:
            pairs.append(("export", Logits(a).eval(), e, None))  # the exported output only
        if "onnx_to_conv" in paths:
            add("onnx_to_conv", e, lambda: fc2conv.onnx.to_conv(e))
        if "onnx_to_linear" in paths:
            try:
                ec = fc2conv.onnx.to_conv(e)
                add("onnx_to_linear", ec, lambda: fc2conv.onnx.to_linear(ec))
            except Exception as err:
                print(f"{name}\tonnx_to_linear\tnot built: {str(err)[:150]}", flush=True)
    if ({"bugs", "onnx_bugs"} & set(paths)) and (pl := planted_layer(a)) is not None:
        lname, lin = pl
        for bug, change in bugs(name, lin).items():
            a_bug = copy.deepcopy(a)
            change(a_bug.get_submodule(lname))
            if "bugs" in paths:
                add(f"bug: {bug}", a, lambda ab=a_bug: fc2conv.to_conv(ab, x0), lname)
            if "onnx_bugs" in paths and e is not None:
                add(f"onnx bug: {bug}", e, lambda ab=a_bug: fc2conv.onnx.to_conv(
                    export(ab, x0, list(nd))), lname)
    return a64, pairs


def foreign_rows(draws: int) -> list[tuple[Any, ...]]:
    """The foreign ONNX files: clean to_conv / to_linear, and +1e-3 on each weight (float64
    reference: onnx's evaluator on a float64 copy of A)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import fc2conv.onnx
    from fc2conv.verify.compare import compare

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _onnx_helpers import reference64, run_ort

    rows = []
    for name, path in sorted(foreign_models().items()):
        m = onnx.load(str(path))
        conv = fc2conv.onnx.to_conv(m)
        shapes = {k: v.shape for k, v in foreign_draws(name)[0][0].items()}

        def feeds(k: int, shapes: dict[str, Any] = shapes) -> dict[str, Any]:
            rng = np.random.default_rng(k)
            return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}

        for path_name, a, b in (("to_conv", m, conv),
                                ("to_linear", conv, fc2conv.onnx.to_linear(conv))):
            fa = sum(compare(a, b, inputs=tuple(feeds(k).values()), layers=False).verdict
                     == "different" for k in range(draws))
            rows.append((f"foreign:{name}", path_name, draws, fa, "-", "-", "-"))
            print(*rows[-1], sep="\t", flush=True)
        n = sig = miss = 0
        for init in [t for t in m.graph.initializer
                     if len(t.dims) >= 2 and t.data_type == onnx.TensorProto.FLOAT]:
            bug = onnx.ModelProto()
            bug.CopyFrom(m)
            t = next(t for t in bug.graph.initializer if t.name == init.name)
            w = numpy_helper.to_array(t).copy()
            w.flat[0] += 1e-3
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            b = fc2conv.onnx.to_conv(bug)
            for k in range(draws):
                f = feeds(k)
                ref = reference64(m, f)[0].astype(np.float64)
                ea = max(float(np.abs(run_ort(m, f)[0] - ref).max()),
                         2**-24 * float(np.abs(ref).max()))
                eb = float(np.abs(run_ort(b, f)[0] - ref).max())
                n += 1
                if eb > RATIO * ea:
                    sig += 1
                    miss += compare(m, b, inputs=tuple(f.values()),
                                    layers=False).verdict != "different"
        rows.append((f"foreign:{name}", "bug: +1e-3 each weight", n, "-", sig, miss, "-"))
        print(*rows[-1], sep="\t", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--paths", default=PATHS)
    ap.add_argument("--no-cost", action="store_true", help="skip the time/memory measurement")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    names = [n for n in args.models.split(",") if n]
    paths = args.paths.split(",")
    rows: list[tuple[Any, ...]] = []
    cost = []
    for name in names:
        if name == "foreign":
            rows += foreign_rows(args.draws)
            continue
        a64, pairs = model_pairs(name, paths)
        for path, a, b, planted in pairs:
            n = fa = sig = miss = misloc = 0
            for k in range(args.draws):
                x = draw(name, k)
                xin = x if isinstance(a, nn.Module) else as_numpy(x)
                try:
                    rep = fc2conv.compare(a, b, inputs=xin, layers=planted is not None)
                except Exception as err:  # reported, not fatal: the other paths still run
                    print(f"{name}\t{path}\tcompare failed: {str(err)[:150]}", flush=True)
                    break
                n += 1
                if planted is None:
                    fa += rep.verdict == "different"
                    continue
                ea, eb = errors(a, a64, b, x)
                if eb > RATIO * ea:
                    sig += 1
                    miss += rep.verdict != "different"
                    if rep.verdict == "different" and not located(planted, rep.first_divergence):
                        misloc += 1
                        print(f"  mislocalized: {rep.first_divergence}", flush=True)
            rows.append((name, path, n, fa if planted is None else "-",
                         sig if planted else "-", miss if planted else "-",
                         misloc if planted else "-"))
            print(*rows[-1], sep="\t", flush=True)
        if args.no_cost or not pairs:
            continue
        # cost of one draw, interleaved with the two float32 forward passes
        _, a, b, _ = pairs[0]
        x = draw(name, 1)
        t_cmp = t_fwd = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            output(a, x)
            output(b, x)
            t_fwd += time.perf_counter() - t0
            t0 = time.perf_counter()
            fc2conv.compare(a, b, inputs=x if isinstance(a, nn.Module) else as_numpy(x),
                            layers=False)
            t_cmp += time.perf_counter() - t0
        size = weight_bytes(a, b) if isinstance(b, nn.Module) else 2 * weight_bytes(a64) / 2
        cost.append((name, size / 2**20, t_cmp / 3, t_cmp / max(t_fwd, 1e-9),
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10))
    print("\nmodel\tpath\tdraws\tfalse_alarms\tsignificant_bug_draws\tmisses\tmislocalized")
    for r in rows:
        print(*r, sep="\t")
    total_fa = sum(r[3] for r in rows if isinstance(r[3], int))
    total_miss = sum(r[5] for r in rows if isinstance(r[5], int))
    total_loc = sum(r[6] for r in rows if isinstance(r[6], int))
    total_sig = sum(r[4] for r in rows if isinstance(r[4], int))
    located_ok = total_sig - total_miss - total_loc
    print(f"TOTAL false alarms {total_fa}, misses {total_miss} of {total_sig} significant bug "
          f"draws, mislocalized {total_loc} (localized {located_ok} of "
          f"{total_sig - total_miss} caught bug draws with a planted layer)")
    if cost:
        print("\nmodel\tweights A+B (MiB)\tcompare s/draw (layers=False)\tx two fp32 forwards"
              "\tprocess peak RSS so far (MiB)")
        for c in cost:
            print(f"{c[0]}\t{c[1]:.2f}\t{c[2]:.3f}\t{c[3]:.1f}\t{c[4]:.0f}")


if __name__ == "__main__":
    main()
