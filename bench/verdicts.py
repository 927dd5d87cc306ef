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
against A's float64 twin exceeds 10x the rounding error of a correct implementation, measured
here independently of compare (plain float64 forward of A): the larger of A's own largest
error and that of the conversion without the bug (the B a correct converter gives), floored at
one unit roundoff of the output's scale. Two samples, because one is luck: on
hand_gemm_alpha_beta draw 7, A (two Gemms, 20 terms) rounds to 1.04 u x scale, the clean
conversion to 1.93, 400 random float32 summation orders to 2.4 (median) .. 6.05 (max); the
+1e-3 bug's B errs 11.2 u x scale, "10.8x A's" but within 2x of what correct orders do, and
|A - B| (10.3) within 1.5x of their |A - order| (up to 6.9): no rule that also passes every
correct order could call that draw different with any margin. The first
divergence must name the planted layer: the changed Linear or any other module that reads the
planted Parameter (``readers``: a tied weight is read by each module holding it, so GPT-2's
``lm_head`` bug is also located at the token embedding ``transformer.wte``, where a draw that
looks up a changed row diverges first); nothing else counts. Printed per model and path:
draws, false alarms, bug draws, significant ones, misses, mislocalized; then compare's time per
extra draw (ratio to the two float32 forward passes, interleaved rounds, wall and CPU:
``bench/compare_cost.py``, which also pins threads and covers the issue's cases) and peak RSS
against the models' weight size.

    PYTHONPATH=src:tests/zoo python bench/verdicts.py                 # full sweep, 20 draws
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --draws 3 --models bert,vit
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --paths onnx_to_conv,onnx_bugs
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --models gpt2 --no-cost --out r.jsonl
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --table r.jsonl   # table from saved rows
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --models foreign:tf_mlp  # one foreign file
    PYTHONPATH=src:tests/zoo python bench/verdicts.py --models monai_efficientnet3d \
        --paths bugs,onnx_bugs --bugs "+1e-3 weight" --no-cost          # one planted bug

With ``--out FILE.jsonl`` every finished model x path row is appended as one JSON line (with
the draws that false-alarmed, missed or mislocalized, and the cause each caught bug draw was
given); a rerun with the same file skips the rows already there with at least ``--draws``
draws, so a long sweep can be stopped and resumed model by model. ``--table`` prints the table
of one or more such files and runs nothing.

Each row also counts the draws where compare consulted B's own float64 twin (its grey zone:
B's error beyond 10x A's, within the worst-case bound and the measured noise;
``fc2conv.verify.verdict``), those it decided "different", those where it fell back (no float64
twin for B), and the share of B's error the twin attributed to another function (%; above 50
is "different"): a rule never consulted on a clean row cannot false-alarm there.

The cause check (column ``wrong_cause``): a caught bug draw whose diagnosis names a cause
(flatten order, transposed weight, bias, constant scale, shared kernel, train/eval mode) other
than the planted one. A planted change no hypothesis models (+1e-3 on one weight, two rows
swapped, one row scaled) must read "none of the tested causes explains it".
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
import resource
import statistics
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_cost  # noqa: E402

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


class Keywords(nn.Module):
    """``m`` called with its draw's inputs by name, for a model whose positional parameters
    are in another order (GPT-2's second one is ``past_key_values``, not the attention mask)."""

    def __init__(self, m: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.m, self.names = m, names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.m(**dict(zip(self.names, args, strict=True)))


def build(name: str, seed: int = 0) -> nn.Module:
    if name == "cnn_flatten":
        torch.manual_seed(seed)
        return CnnFlatten().eval()
    m = ZOO[name].build(seed)
    names = list(named_draw(name, 0))
    params = list(inspect.signature(m.forward).parameters)
    return m if params[:len(names)] == names else Keywords(m, names).eval()


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


def errors(a: Any, a64: nn.Module, b: Any, x: tuple[torch.Tensor, ...],
           clean: Any = None) -> tuple[float, float]:
    """(the rounding error of a correct implementation, B's error), both against A's float64
    twin: the first is the larger of A's error and the error of ``clean`` (the conversion
    without the bug, another correct implementation), floored at u x scale."""
    with torch.no_grad():
        r = logits(a64(*[t.double() if t.is_floating_point() else t for t in x])).double()
    ya = output(a, x).double()
    yb = output(b, x).double().reshape(ya.shape)
    u = torch.finfo(torch.float32).eps / 2
    ea = max(float((ya - r).abs().max()), u * float(r.abs().max()))
    if clean is not None:
        ea = max(ea, float((output(clean, x).double().reshape(ya.shape) - r).abs().max()))
    return ea, float((yb - r).abs().max())


def readers(model: nn.Module, lname: str) -> tuple[str, ...]:
    """The planted layer, as scored: ``lname`` and every other module that holds one of its
    parameters (a tied weight is one bug in each module that reads it: GPT-2's ``lm_head``
    shares its weight with the token embedding ``transformer.wte``, and a draw that looks up a
    changed row diverges first at the lookup)."""
    own = {id(p) for p in model.get_submodule(lname).parameters(recurse=False)}
    names = [lname] + [n.rpartition(".")[0] for n, p in
                       model.named_parameters(remove_duplicate=False) if id(p) in own]
    return tuple(dict.fromkeys(n for n in names if n))


def located(planted: str | tuple[str, ...], where: str | None) -> bool:
    """The first divergence names the planted layer, or one of the modules that read the
    planted Parameter (:func:`readers`; a module path, or an ONNX node path)."""
    names = (planted,) if isinstance(planted, str) else planted
    return where is not None and any(p in where or p.replace(".", "/") in where for p in names)


CAUSES = {"flatten order": "flattened input", "transposed": "weight transposed",
          "bias missing": "bias missing", "bias doubled": "bias doubled",
          "scale": "times a constant", "shared kernel": "kernel shared",
          "mode": "training mode", "none": "none of the tested causes",
          "no layer": "no matched layer diverges"}
EXPECTED = {"flatten order": "flatten order", "transposed": "transposed",
            "bias dropped": "bias missing"}


def cause(diagnosis: str | None) -> str:
    """The cause a diagnosis names (a key of :data:`CAUSES`), ``other`` or ``-``."""
    if not diagnosis:
        return "-"
    low = diagnosis.lower()
    for key, words in CAUSES.items():
        if words in low:
            return key
    return "other"


def wrong_cause(bug: str, named: str) -> bool:
    """A named cause that is not the planted one (no cause named is never wrong)."""
    kind = bug.split(": ", 1)[-1]
    return named not in ("none", "no layer", "-", "other") and named != EXPECTED.get(kind)


def weight_bytes(*models: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def model_pairs(name: str, paths: list[str], done: frozenset[str] = frozenset(),
                only_bugs: set[str] | None = None
                ) -> tuple[Any, list[tuple[str, Any, Any, tuple[str, ...] | None, Any]]]:
    """(A's float64 twin, [(path, A, B, planted layer (:func:`readers`) or None, B without the
    bug)]) for one zoo model, without the paths in ``done`` (rows already saved); ``only_bugs``:
    the planted bugs to build (all when None)."""
    import fc2conv.onnx

    a = build(name)
    nd = named_draw(name, 10_000)
    x0 = tuple(nd.values())
    a64 = copy.deepcopy(a).double()
    pairs: list[tuple[str, Any, Any, tuple[str, ...] | None, Any]] = []
    clean: dict[str, Any] = {}

    def add(path: str, a: Any, make_b: Any, planted: tuple[str, ...] | None = None) -> None:
        if path in done:
            return
        try:
            key = "onnx" if path.startswith("onnx") else "torch"
            if planted is not None and key not in clean:  # the conversion without the bug
                clean[key] = fc2conv.onnx.to_conv(e) if key == "onnx" else fc2conv.to_conv(a, x0)
            pairs.append((path, a, make_b(), planted, clean.get(key) if planted else None))
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
    if onnx_paths and not (onnx_paths <= done):
        try:
            e = export(a, x0, list(nd))
        except Exception as err:  # an exporter failure is reported, not fatal
            print(f"{name}\texport failed: {str(err).splitlines()[0][:120]}", flush=True)
    if e is not None:
        if "export" in paths and "export" not in done:
            pairs.append(("export", Logits(a).eval(), e, None, None))  # the exported output only
        if "onnx_to_conv" in paths:
            add("onnx_to_conv", e, lambda: fc2conv.onnx.to_conv(e))
        if "onnx_to_linear" in paths and "onnx_to_linear" not in done:
            try:
                ec = fc2conv.onnx.to_conv(e)
                add("onnx_to_linear", ec, lambda: fc2conv.onnx.to_linear(ec))
            except Exception as err:
                print(f"{name}\tonnx_to_linear\tnot built: {str(err)[:150]}", flush=True)
    if ({"bugs", "onnx_bugs"} & set(paths)) and (pl := planted_layer(a)) is not None:
        lname, lin = pl
        planted = readers(a, lname)
        for bug, change in bugs(name, lin).items():
            if only_bugs is not None and bug not in only_bugs:
                continue
            a_bug = copy.deepcopy(a)
            change(a_bug.get_submodule(lname))
            if "bugs" in paths:
                add(f"bug: {bug}", a, lambda ab=a_bug: fc2conv.to_conv(ab, x0), planted)
            if "onnx_bugs" in paths and e is not None:
                add(f"onnx bug: {bug}", e, lambda ab=a_bug: fc2conv.onnx.to_conv(
                    export(ab, x0, list(nd))), planted)
    return a64, pairs


def row(model: str, path: str, planted: bool) -> dict[str, Any]:
    """An empty result row; clean rows count false alarms, bug rows the rest."""
    return {"model": model, "path": path, "draws": 0, "false_alarms": 0 if not planted else None,
            "bug_draws": 0 if planted else None, "significant": 0 if planted else None,
            "misses": 0 if planted else None, "mislocalized": 0 if planted else None,
            "wrong_cause": 0 if planted else None, "causes": {}, "worst": 0.0, "events": [],
            "seconds": 0.0, "twin": {"consulted": 0, "different": 0, "fallback": 0,
                                     "shares": []}}


SHARE = re.compile(r"\(([0-9.e+-]+)% of B's error")


def count_twin(r: dict[str, Any], rep: Any) -> None:
    """Count whether B's float64 twin was consulted on this draw (the verdict's grey zone), what
    it decided, and the share of B's error it attributed to another function (in %)."""
    t = r.setdefault("twin", {"consulted": 0, "different": 0, "fallback": 0, "shares": []})
    for n in rep.notes:
        if "B's own float64 twin is" in n:
            t["consulted"] += 1
            t["different"] += "B computes something else" in n
            m = SHARE.search(n)
            if m:
                t["shares"].append(float(m.group(1)))
        elif "B's float64 twin was not consulted" in n or "B's float64 twin could not" in n:
            t["fallback"] += 1


def event(r: dict[str, Any], kind: str, k: int, rep: Any = None, **extra: Any) -> None:
    """Note one false alarm / miss / mislocalization / wrong cause in row ``r`` and print it."""
    e: dict[str, Any] = {"kind": kind, "draw": k, **extra}
    if rep is not None:
        e.update(verdict=rep.verdict, max_abs=rep.max_abs_error, bound=rep.bound,
                 first_divergence=rep.first_divergence,
                 diagnosis=(rep.diagnosis or "")[:400], notes=[n[:300] for n in rep.notes])
    r["events"].append(e)
    print(f"  {r['model']}\t{r['path']}\t{kind} draw {k}: "
          + json.dumps({k2: v for k2, v in e.items() if k2 not in ("kind", "draw")})[:600],
          flush=True)


def judge_draw(r: dict[str, Any], k: int, rep: Any, planted: str | tuple[str, ...] | None,
               errs: tuple[float, float] | None, localized: bool = True) -> None:
    """Count draw ``k``'s report ``rep`` into row ``r`` (``errs``: A's and B's errors;
    ``localized``: the report has a layer table, so localization and cause are judged)."""
    r["draws"] += 1
    count_twin(r, rep)
    if rep.bound > 0:
        r["worst"] = max(r["worst"], rep.max_abs_error / rep.bound)
    if planted is None:
        if rep.verdict == "different":
            r["false_alarms"] += 1
            event(r, "false alarm", k, rep)
        return
    assert errs is not None
    ea, eb = errs
    r["bug_draws"] += 1
    if eb <= RATIO * ea:
        return
    r["significant"] += 1
    if rep.verdict != "different":
        r["misses"] += 1
        event(r, "miss", k, rep, ea=ea, eb=eb)
        return
    if not localized:
        return
    named = cause(rep.diagnosis)
    r["causes"][named] = r["causes"].get(named, 0) + 1
    if not located(planted, rep.first_divergence):
        r["mislocalized"] += 1
        event(r, "mislocalized", k, rep, ea=ea, eb=eb)
    if wrong_cause(r["path"], named):
        r["wrong_cause"] += 1
        event(r, "wrong cause", k, rep, ea=ea, eb=eb, cause=named)


def foreign_rows(draws: int, saved: dict[tuple[str, str], dict[str, Any]],
                 out: Path | None, only: str | None = None) -> list[dict[str, Any]]:
    """The foreign ONNX files (or the one named ``only``): clean to_conv / to_linear, and +1e-3
    on element 0 of each 2-D weight (float64 reference: onnx's evaluator on a float64 copy of
    A)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import fc2conv.onnx
    from fc2conv.verify.compare import compare

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _onnx_helpers import reference64, run_ort

    rows = []
    for name, path in sorted(foreign_models().items()):
        if only is not None and name != only:
            continue
        model = f"foreign:{name}"
        todo = [p for p in ("to_conv", "to_linear", "bug: +1e-3 each weight")
                if not _done(saved, model, p, draws)]
        rows += [saved[(model, p)] for p in ("to_conv", "to_linear", "bug: +1e-3 each weight")
                 if (model, p) in saved and p not in todo]
        if not todo:
            continue
        m = onnx.load(str(path))
        conv = fc2conv.onnx.to_conv(m)
        shapes = {k: v.shape for k, v in foreign_draws(name)[0][0].items()}

        def feeds(k: int, shapes: dict[str, Any] = shapes) -> dict[str, Any]:
            rng = np.random.default_rng(k)
            return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}

        for path_name, a, b in (("to_conv", m, conv),
                                ("to_linear", conv, fc2conv.onnx.to_linear(conv))):
            if path_name not in todo:
                continue
            r, t0 = row(model, path_name, False), time.perf_counter()
            for k in range(draws):
                judge_draw(r, k, compare(a, b, inputs=tuple(feeds(k).values()), layers=False),
                           None, None)
            rows.append(_finish(r, t0, out))
        if "bug: +1e-3 each weight" not in todo:
            continue
        r, t0 = row(model, "bug: +1e-3 each weight", True), time.perf_counter()
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
                ea, eb = _foreign_errors(reference64(m, f), run_ort(m, f), run_ort(conv, f),
                                         run_ort(b, f))
                rep = compare(m, b, inputs=tuple(f.values()), layers=False)
                before = r["misses"]
                judge_draw(r, k, rep, init.name, (ea, eb), localized=False)
                if r["misses"] > before:
                    r["events"][-1]["weight"] = init.name
        r["mislocalized"] = None  # layers=False: localization is not judged here
        r["wrong_cause"] = None
        rows.append(_finish(r, t0, out))
    return rows


def _foreign_errors(ref: list[Any], ya: list[Any], yc: list[Any],
                    yb: list[Any]) -> tuple[float, float]:
    """(rounding error of a correct implementation, B's error) on the float output where B's
    error is the largest multiple of it (a classifier's labels are integers: its
    probabilities judge)."""
    import numpy as np

    best = (1.0, 0.0)
    for r, a, c, b in zip(ref, ya, yc, yb, strict=True):
        if np.asarray(a).dtype.kind != "f":
            continue
        r = np.asarray(r, dtype=np.float64)
        ea = max(float(np.abs(a - r).max()), float(np.abs(c - r).max()),
                 2**-24 * float(np.abs(r).max()), 1e-300)
        eb = float(np.abs(b - r).max())
        if eb / ea > best[1] / best[0]:
            best = (ea, eb)
    return best


def _done(saved: dict[tuple[str, str], dict[str, Any]], model: str, path: str,
          draws: int) -> bool:
    r = saved.get((model, path))
    return r is not None and r["draws"] >= draws


def _commit() -> str:
    """The source's git commit (``+`` when the work tree has changes), for saved rows."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+" if dirty else "")


COMMIT = _commit()


def _finish(r: dict[str, Any], t0: float, out: Path | None) -> dict[str, Any]:
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r["commit"] = COMMIT
    t = r.get("twin", {})
    print(*_cells(r), f"({r['seconds']} s; B's float64 twin consulted on "
          f"{t.get('consulted', 0)} draws, decided 'different' on {t.get('different', 0)}, "
          f"fell back on {t.get('fallback', 0)}; shares % {t.get('shares', [])})",
          sep="\t", flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
    return r


COLUMNS = ["model", "path", "draws", "false_alarms", "bug_draws", "significant", "misses",
           "mislocalized", "wrong_cause"]


def _cells(r: dict[str, Any]) -> list[str]:
    return [("-" if r.get(c) is None else str(r[c])) for c in COLUMNS]


def load(files: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """Saved rows by (model, path); for a row saved twice, the one with more draws."""
    saved: dict[tuple[str, str], dict[str, Any]] = {}
    for file in files:
        if not file.exists():
            continue
        for line in file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                key = (r["model"], r["path"])
                if key not in saved or r["draws"] >= saved[key]["draws"]:
                    saved[key] = r
    return saved


def table(rows: list[dict[str, Any]]) -> None:
    """The table (tab-separated and as markdown) and the totals."""
    print("\n" + "\t".join(COLUMNS))
    for r in rows:
        print(*_cells(r), sep="\t")
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(_cells(r)) + " |")

    def total(c: str) -> int:
        return sum(r[c] for r in rows if isinstance(r.get(c), int))

    sig, miss, loc = total("significant"), total("misses"), total("mislocalized")
    judged = sum(r["significant"] - r["misses"] for r in rows
                 if isinstance(r.get("mislocalized"), int))
    pct = 100 * (judged - loc) / max(judged, 1)
    causes: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["path"].startswith(("bug", "onnx bug")):
            kind = r["path"].split(": ", 1)[-1]
            for c, n in r["causes"].items():
                causes.setdefault(kind, {})[c] = causes.setdefault(kind, {}).get(c, 0) + n
    clean = sum(r["draws"] for r in rows if r.get("false_alarms") is not None)
    print(f"\nTOTAL false alarms {total('false_alarms')} of {clean} clean draws; misses {miss} "
          f"of {sig} significant bug draws (of {total('bug_draws')}); mislocalized {loc} of "
          f"{judged} caught bug draws with a planted layer ({pct:.1f}% "
          f"localized); wrong cause named {total('wrong_cause')}")
    consulted = [(r["model"], r["path"], r["twin"]) for r in rows
                 if r.get("twin", {}).get("consulted") or r.get("twin", {}).get("fallback")]
    print("B's float64 twin (the grey zone) per row: consulted / decided different / fell "
          "back; share of B's error it attributed to another function (%):")
    for m, p, t in consulted:
        print(f"  {m}\t{p}\t{t['consulted']}/{t['different']}/{t['fallback']}\t"
              + ", ".join(f"{s:.3g}" for s in t["shares"]))
    print("causes named on caught draws, by planted bug:")
    for kind, cs in sorted(causes.items()):
        print(f"  {kind}: " + ", ".join(f"{c} {n}" for c, n in sorted(cs.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--paths", default=PATHS)
    ap.add_argument("--no-cost", action="store_true", help="skip the time/memory measurement")
    ap.add_argument("--out", type=Path, help="append finished rows (JSON lines); skip saved ones")
    ap.add_argument("--table", type=Path, nargs="+", help="print the table of saved rows only")
    ap.add_argument("--bugs", help="only these planted bugs, comma-separated ('+1e-3 weight')")
    args = ap.parse_args()
    if args.table:
        table(list(load(args.table).values()))
        return
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    names = [n for n in args.models.split(",") if n]
    paths = args.paths.split(",")
    saved = load([args.out]) if args.out else {}
    rows: list[dict[str, Any]] = []
    cost = []
    for name in names:
        if name == "foreign" or name.startswith("foreign:"):
            only = name.split(":", 1)[1] if ":" in name else None
            rows += foreign_rows(args.draws, saved, args.out, only)
            continue
        done = frozenset(p for (m, p) in saved if m == name and _done(saved, m, p, args.draws))
        rows += [saved[(name, p)] for p in sorted(done)]
        a64, pairs = model_pairs(name, paths, done,
                                 set(args.bugs.split(",")) if args.bugs else None)
        for path, a, b, planted, b_clean in pairs:
            r, t0 = row(name, path, planted is not None), time.perf_counter()
            for k in range(args.draws):
                x = draw(name, k)
                xin = x if isinstance(a, nn.Module) else as_numpy(x)
                try:
                    rep = fc2conv.compare(a, b, inputs=xin, layers=planted is not None)
                except Exception as err:  # reported, not fatal: the other paths still run
                    print(f"{name}\t{path}\tcompare failed: {str(err)[:150]}", flush=True)
                    r["error"] = str(err)[:300]
                    break
                errs = None if planted is None else errors(a, a64, b, x, b_clean)
                judge_draw(r, k, rep, planted, errs)
            rows.append(_finish(r, t0, args.out))
        if args.no_cost or not pairs:
            continue
        # cost of one more draw against the two float32 forward passes, interleaved rounds
        # (bench/compare_cost.py; what runs once per compare, loading, cancels)
        _, a, b, _, _ = pairs[0]
        x = draw(name, 1)
        got = compare_cost.measure(name, a, b, x, rounds=3,
                                   samples=2, fwd_reps=3)
        size = weight_bytes(a, b) if isinstance(b, nn.Module) else 2 * weight_bytes(a64) / 2
        cost.append((name, size / 2**20, statistics.median(got["draw_w"]),
                     compare_cost.spread(got["ratio_w"]), compare_cost.spread(got["ratio_c"]),
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10))
    table(rows)
    if cost:
        print(f"\nthreads {torch.get_num_threads()}\nmodel\tweights A+B (MiB)\tcompare s per "
              "extra draw (layers=False)\tx two fp32 forwards, wall: median [min-max]\tCPU"
              "\tprocess peak RSS so far (MiB)")
        for c in cost:
            print(f"{c[0]}\t{c[1]:.2f}\t{c[2]:.3f}\t{c[3]}\t{c[4]}\t{c[5]:.0f}")


if __name__ == "__main__":
    main()
