"""``compare`` is a one-way pipeline (issue 9, "Shape of the code").

- The import graph of ``fc2conv.verify`` (module-level *and* function-level imports, read with
  ``ast``) is acyclic and follows the stage order written in ``fc2conv/verify/__init__.py``'s
  docstring: a module imports only modules listed before it.
- The stages do not change what they are given: the verdict, ``localize`` and ``diagnose`` run
  by hand on a planted bug leave their inputs (models, draws, runs, earlier values) as they
  were, deep-compared against snapshots; and chaining them by hand gives what ``compare`` says.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fc2conv.verify as verify
from fc2conv.verify import bound
from fc2conv.verify.inputs import draw
from fc2conv.verify.models import InputSpec, Model, load

VERIFY = Path(verify.__file__).parent
PACKAGE = "fc2conv.verify"


def _stages() -> list[list[str]]:
    """The modules of each stage, in order, from the table in verify's docstring."""
    doc = verify.__doc__ or ""
    rows = re.findall(r"^ {4}(\d+) (\w+) +([\w ]+)$", doc, flags=re.M)
    assert rows, "fc2conv/verify/__init__.py's docstring holds no stage table"
    assert [int(n) for n, _, _ in rows] == list(range(1, len(rows) + 1))
    return [mods.split() for _, _, mods in rows]


def _modules() -> list[str]:
    return sorted(p.stem for p in VERIFY.glob("*.py") if p.stem != "__init__")


def _imports(module: str, text: str | None = None) -> set[str]:
    """The verify modules ``module`` imports anywhere in its file (or in ``text``), at module
    level or inside functions (``"__init__"`` for names taken from the package itself)."""
    if text is None:
        text = (VERIFY / f"{module}.py").read_text()
    tree = ast.parse(text, filename=f"{module}.py")
    mods = set(_modules())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.split(".")[2])
                elif alias.name == PACKAGE:
                    found.add("__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against fc2conv.verify
                base = PACKAGE if node.level == 1 else "fc2conv"
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name == PACKAGE:
                for alias in node.names:
                    found.add(alias.name if alias.name in mods else "__init__")
            elif name.startswith(PACKAGE + "."):
                found.add(name.split(".")[2])
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m) for m in _modules()}


def test_import_graph_is_acyclic() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("verify's imports go in a circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_imports_follow_the_documented_stage_order() -> None:
    stages = _stages()
    order = [m for stage in stages for m in stage]
    assert sorted(order) == _modules(), (
        "the stage table must list every module of fc2conv/verify exactly once: missing "
        f"{sorted(set(_modules()) - set(order))}, unknown or repeated "
        f"{sorted(m for m in order if order.count(m) > 1 or m not in _modules())}")
    rank = {m: i for i, m in enumerate(order)}
    stage_of = {m: i + 1 for i, stage in enumerate(stages) for m in stage}
    wrong = [f"{src} (stage {stage_of[src]}) imports {dst}"
             + (f" (stage {stage_of[dst]})" if dst in stage_of else " (the package face)")
             for src, dsts in _graph().items() for dst in sorted(dsts)
             if dst not in rank or rank[dst] >= rank[src]]
    assert not wrong, "imports that point up the pipeline: " + "; ".join(wrong)


def test_the_graph_reader_sees_every_kind_of_import() -> None:
    # the checks above are only as good as the reader: lazy and relative imports count
    text = ("from fc2conv.verify.values import Run\n"
            "def f():\n"
            "    from fc2conv.verify import localize\n"
            "    if True:\n"
            "        import fc2conv.verify.match as m\n"
            "class C:\n"
            "    def g(self):\n"
            "        from . import diagnose\n"
            "        from .noise import noise_factor\n"
            "        from fc2conv.verify import compare as c, Report\n"
            "import fc2conv.core.rounding\n")
    assert _imports("x", text) == {"values", "localize", "match", "diagnose", "noise",
                                   "compare", "__init__"}


# -- stages leave their inputs as they were ---------------------------------------------------

def _snapshot(obj: Any, seen: dict[int, Any] | None = None) -> Any:
    """A deep, comparable copy of ``obj``: tensors cloned, modules as their state and flags,
    dataclasses field by field (a Model's caches, memoized twins and sessions, left out)."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.detach().clone())
    if id(obj) in seen:
        return ("seen", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if isinstance(obj, nn.Module):
        return ("module", type(obj).__name__,
                {k: v.detach().clone() for k, v in obj.state_dict().items()},
                [(n, m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
                 for n, m in obj.named_modules()])
    if isinstance(obj, Model):
        return ("model", obj.label, obj.kind, _snapshot(obj.specs, seen), obj.exported,
                _snapshot(obj.module, seen), _snapshot(obj.pristine, seen))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__, {f.name: _snapshot(getattr(obj, f.name), seen)
                                     for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return ("dict", {k: _snapshot(v, seen) for k, v in obj.items()})
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return (type(obj).__name__, [_snapshot(v, seen) for v in items])
    return ("value", obj)


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                and x.dtype == y.dtype and x.shape == y.shape
                and bool(((x == y) | (x.isnan() & y.isnan()) if x.is_floating_point()
                          else (x == y)).all()))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return (isinstance(y, list | tuple) and len(x) == len(y)
                and all(_same(a, b) for a, b in zip(x, y, strict=True)))
    return bool(x == y)


def _unchanged(before: Any, *values: Any) -> bool:
    return _same(before, _snapshot(values))


@pytest.fixture(scope="module")
def planted() -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, ...]]]:
    """A small MLP and a copy with one weight of its last Linear changed (a real bug)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                      nn.Linear(32, 8)).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[2].weight[3, 5] += 0.25
    draws = draw([InputSpec("x", (4, 16), torch.float32)], 3, torch.float32, seed=1)
    return a, b, draws


def test_stages_do_not_change_what_they_are_given(planted) -> None:
    from fc2conv.verify.compare import _run_all
    from fc2conv.verify.diagnose import diagnose
    from fc2conv.verify.localize import localize
    from fc2conv.verify.verdict import judge_outputs

    a, b, draws = planted
    ma, mb = load(a, "A"), load(b, "B")
    ra = rb = bound.rounding_for(torch.float32)
    runs, relayout = _run_all(ma, mb, draws, ra, rb)

    before = _snapshot((ma, mb, draws, runs, relayout))
    seen = judge_outputs(ma, draws, runs, relayout, ra, rb)
    assert _unchanged(before, ma, mb, draws, runs, relayout)
    assert seen.verdict == "different"

    before = _snapshot((ma, mb, draws, runs, seen))
    loc = localize(ma, mb, draws, seen.judge)
    assert _unchanged(before, ma, mb, draws, runs, seen)
    assert loc.captured and loc.first is not None
    assert loc.first.pair.a.name == "2"  # the planted layer

    before = _snapshot((ma, mb, draws, runs, seen, loc))
    diag = diagnose(ma, mb, draws, seen.judge, loc.first)
    assert _unchanged(before, ma, mb, draws, runs, seen, loc)
    assert diag.first_divergence == "2"

    # the stages chained by hand say what compare says
    report = verify.compare(a, b, inputs=draws)
    assert report.verdict == seen.verdict
    assert report.first_divergence == diag.first_divergence
    assert report.diagnosis == diag.text
    assert [(s.a_name, s.ok) for s in report.layers] == [(s.a_name, s.ok) for s in loc.table]


def test_the_snapshot_sees_a_change(planted) -> None:
    # the check above can fail: a stage that wrote into what it was given would be caught
    from fc2conv.verify.compare import _run_all

    a, _, draws = planted
    ma = load(copy.deepcopy(a), "A")
    ra = bound.rounding_for(torch.float32)
    runs, _ = _run_all(ma, ma, draws, ra, ra)
    before = _snapshot((ma, runs))
    runs[0].ref.outputs[0][0, 0] += 1e-6
    assert not _unchanged(before, ma, runs)
    before = _snapshot((ma, runs))
    assert ma.module is not None
    with torch.no_grad():
        ma.module[0].bias[0] += 1.0  # type: ignore[index]
    assert not _unchanged(before, ma, runs)
    before = _snapshot((ma, runs))
    runs[0].ya.append(torch.zeros(1))
    assert not _unchanged(before, ma, runs)


def test_stage_values_are_frozen(planted) -> None:
    from fc2conv.verify.compare import _run_all
    from fc2conv.verify.diagnose import diagnose
    from fc2conv.verify.localize import localize
    from fc2conv.verify.verdict import judge_outputs

    a, b, draws = planted
    ma, mb = load(a, "A"), load(b, "B")
    ra = bound.rounding_for(torch.float32)
    runs, relayout = _run_all(ma, mb, draws, ra, ra)
    seen = judge_outputs(ma, draws, runs, relayout, ra, ra)
    loc = localize(ma, mb, draws[:1], seen.judge)
    diag = diagnose(ma, mb, draws, seen.judge, loc.first)
    for value, field in ((seen, "verdict"), (loc, "beyond"), (diag, "text"),
                         (ma.specs[0] if ma.specs else InputSpec("x", (1,), torch.float32),
                          "high")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, None)


def test_id_ranges_leave_the_models_specs_alone(tmp_path: Path) -> None:
    # inputs (stage 4) used to write the id range into the loaded model's own InputSpec
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from fc2conv.verify.inputs import resolve_specs, with_id_ranges

    table = numpy_helper.from_array(torch.randn(11, 4).numpy(), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], [table])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ma, mb = load(proto, "A"), load(onnx.ModelProto.FromString(proto.SerializeToString()), "B")
    before = _snapshot(ma.specs)
    specs = with_id_ranges(resolve_specs(ma, mb, None), ma, mb)
    assert [s.high for s in specs] == [11]
    assert _same(before, _snapshot(ma.specs)) and ma.specs[0].high is None
