"""Why two models part: tested hypotheses at the first diverging pair of layers.

:func:`diagnose` takes the first :class:`~fc2conv.verify.values.Divergence` that
:mod:`fc2conv.verify.localize` found (or none) and returns a
:class:`~fc2conv.verify.values.Diagnosis`: the layer, in the user's names, and the first of
these hypotheses that holds, each a test on real numbers:

- train vs eval mode: a model has Dropout/BatchNorm layers in training mode that the other has
  not, and re-running it after ``.eval()`` makes the outputs agree within rounding;
- flatten order: B's layer output equals A's layer (float64) applied to its input flattened in
  the other order (CHW vs HWC, CL vs LC), the shape taken from the layer feeding it;
- transposed weight: equals A's layer with ``W.T`` (convs: in/out channels swapped);
- bias missing / doubled: equals A's layer with bias 0 / 2b;
- constant scale: ``B = c A`` with ``c`` fitted by least squares;
- shared kernel: B's output is fitted exactly by one affine map applied at every position of
  the input, while A's is not (or the other way round).

"Equals" means within twice the layer's allowed error, elementwise, and leaving at most
:data:`EXPLAINED` of ``max |A - B|`` unexplained: a hypothesis close to "no change" (a flatten
order over one position, whose two orders are the same sequence) fits a difference smaller than
the bound without explaining it, and is not named. When none holds, the
diagnosis says so ("none of the tested causes explains it"). When the layer's weight is read
by other layers too (:func:`shared_weight`: a tied Parameter or buffer in either model, or one
ONNX initializer read by several layers, directly or through layout-only nodes), one more
sentence names them: a change made for any of them shows first where the weight is read
first (GPT-2's ``lm_head`` bug at the token embedding ``transformer.wte``). Hypotheses run on
copies: the models and the captured layers are left as they are.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from fc2conv.verify.judge import Judge
from fc2conv.verify.models import Model
from fc2conv.verify.reference import reference
from fc2conv.verify.values import Diagnosis, Divergence, Layer, Pair

log = logging.getLogger(__name__)

_MODE_LAYERS = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
                nn.modules.instancenorm._InstanceNorm)


def diagnose(ma: Model, mb: Model, draws: list[tuple[torch.Tensor, ...]], judge: Judge,
             first: Divergence | None) -> Diagnosis:
    """The diagnosis of two models whose outputs differ, ``first`` their first diverging pair of
    layers (``None`` when no matched layer diverges). See the module docstring."""
    mode = _mode_hypothesis(ma, mb, draws[0], judge)
    if first is None:
        return Diagnosis(None, mode or ("no matched layer diverges beyond its bound; the "
                                        "difference arises in a layer without a counterpart in "
                                        "the other model, or in the final layout of the "
                                        "outputs"))
    pair = first.pair
    where = pair.a.name if pair.a.name == pair.b.name else f"{pair.a.name} (B: {pair.b.name})"
    text = mode or _layer_hypotheses(pair, first.allowed, list(first.a_layers))
    shared = shared_weight(ma, mb, pair)
    if shared:
        what = "Parameter" if ma.kind == "torch" or mb.kind == "torch" else "initializer"
        users = ", ".join(f"'{n}'" for n in shared[:6]) + (
            f" and {len(shared) - 6} more" if len(shared) > 6 else "")
        text += (f" Its weight is shared with {users} (the same {what}): a change made for "
                 f"any of them shows first where the weight is read first, here.")
    return Diagnosis(where, text, tuple(shared))


def shared_weight(ma: Model, mb: Model, pair: Pair) -> list[str]:
    """The other layers that read the weight of ``pair``'s layer in A or in B (tied weights:
    the same Parameter or buffer, or the same ONNX initializer read by several layers)."""
    out: list[str] = []
    for model, name in ((ma, pair.a.name), (mb, pair.b.name)):
        for other in _sharers(model, name):
            if other not in (pair.a.name, pair.b.name) and other not in out:
                out.append(other)
    return out


def _sharers(model: Model, name: str) -> list[str]:
    try:
        if model.kind == "torch" and model.module is not None:
            from fc2conv.verify.capture import weight_sharers

            return weight_sharers(model.module, name)
        if model.kind == "onnx" and model.onnx_model is not None:
            from fc2conv.verify import onnx_backend as ob
            from fc2conv.verify.structure import initializer_readers

            proto = model.onnx_model
            tables = ob.lookup_tables(proto)
            consts = {i.name for i in proto.graph.initializer}

            def is_layer(node: object) -> bool:
                return (getattr(node, "op_type", "") not in ob.LAYOUT_OPS
                        or ob.is_lookup(node, tables, consts))

            readers = initializer_readers(proto, ob._user_name, is_layer)
            return [u for users in readers.values() if name in users for u in users
                    if u != name]
    except Exception as err:  # best effort: the diagnosis stands without it
        log.debug("shared weights of %s not found: %s", name, err)
    return []


# -- train vs eval ----------------------------------------------------------------------------

def _training_layers(model: Model) -> list[str]:
    if model.module is None or model.exported:
        return []
    return [f"{name} ({type(m).__name__})" for name, m in model.module.named_modules()
            if isinstance(m, _MODE_LAYERS) and m.training]


def _mode_hypothesis(ma: Model, mb: Model, x: tuple[torch.Tensor, ...], judge: Judge) -> str | None:
    ta, tb = _training_layers(ma), _training_layers(mb)
    if not ta and not tb:
        return None
    culprit, other, names = (mb, ma, tb) if len(tb) >= len(ta) else (ma, mb, ta)
    which = "B" if culprit is mb else "A"
    other_which = "A" if which == "B" else "B"
    assert culprit.module is not None
    fixed = Model(label=culprit.label, kind="torch",
                  module=copy.deepcopy(culprit.pristine or culprit.module).eval())
    other_mod = other
    if _training_layers(other) and other.module is not None:
        other_mod = Model(label=other.label, kind="torch",
                          module=copy.deepcopy(other.pristine or other.module).eval())
    a_new, b_new = (other_mod, fixed) if which == "B" else (fixed, other_mod)
    ya, yb = a_new.run(x).outputs, b_new.run(x).outputs
    ref = reference(a_new, x, judge.ra, judge.rb)
    agree = len(ya) == len(yb) and all(
        u.numel() == v.numel() and not bool(judge.check(
            u, v.reshape(u.shape), ref.outputs[i], *judge.bounds(ref, i))["fail"].any())
        for i, (u, v) in enumerate(zip(ya, yb, strict=True)))
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    both = bool(ta) and bool(tb)
    state = "also in training mode" if both else "in eval mode"
    if agree:
        return (f"{which} has {len(names)} layer(s) in training mode ({listed}) while "
                f"{other_which} is {state}: after {which}.eval() the outputs agree within "
                f"rounding. Call .eval() on the model before comparing or exporting it.")
    return (f"{which} has {len(names)} layer(s) in training mode ({listed}), which makes its "
            f"outputs random (dropout) or batch-dependent (batch norm); call .eval() first. "
            "Even in eval mode the outputs still differ, so there is a second cause.")


# -- layer hypotheses --------------------------------------------------------------------------

EXPLAINED = 0.1
"""A hypothesis explains a difference when it leaves at most this fraction of it unexplained."""


def _close(h: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor,
           ya: torch.Tensor | None = None) -> bool:
    """``h`` (A's layer under a hypothesis, float64) reproduces B's ``y``: within twice the
    layer's allowed error elementwise and, when A's output ``ya`` is given, leaving at most
    :data:`EXPLAINED` of the difference ``max |A - B|`` unexplained (a hypothesis close to
    "no change" fits a small difference within a loose bound without explaining it)."""
    if h.shape != y.shape:
        return False
    res = (h.double() - y.double()).abs()
    if not bool((res <= 2 * allowed + 1e-300).all()):
        return False
    if ya is None:
        return True
    diff = float((ya.double() - y.double()).abs().nan_to_num(0.0, 0.0, 0.0).max())
    return float(res.nan_to_num(0.0, 0.0, 0.0).max()) <= EXPLAINED * diff


def _variant(module: nn.Module, change: Callable[[nn.Module], None]) -> nn.Module:
    twin = copy.deepcopy(module).double()
    with torch.no_grad():
        change(twin)
    return twin


def _layer_hypotheses(pair: Pair, allowed: torch.Tensor, a_layers: list[Layer]) -> str:
    la, lb = pair.a, pair.b
    ya, yb = la.output, pair.b_aligned
    a_name, b_name = f"'{la.name}'", f"'{lb.name}'"
    where = f"B's {b_name}" + (f" (converted from A's {a_name})" if lb.source == la.name else "")
    tests: list[Callable[[], str | None]] = []
    if la.module is not None and la.input is not None and la.input.is_floating_point():
        mod, x = la.module, la.input.double()
        tests += [
            lambda: _flatten_order(mod, x, ya, yb, allowed, la, a_layers, where),
            lambda: _transposed(mod, x, ya, yb, allowed, where, a_name),
            lambda: _bias(mod, x, ya, yb, allowed, where, a_name),
        ]
    tests.append(lambda: _scale(ya, yb, allowed, where, a_name))
    x_in = la.input
    if x_in is not None and x_in.is_floating_point():
        tests.append(lambda: _shared_kernel(x_in, ya, yb, allowed, where, a_name))
    if la.module is not None and isinstance(la.module, _MODE_LAYERS):
        tests.append(lambda: f"{a_name} is a {type(la.module).__name__}; the models run it in "
                     "different modes (call .eval() on both)")
    for test in tests:
        try:
            sentence = test()
        except Exception as err:  # a hypothesis that cannot be evaluated is not evidence
            log.debug("hypothesis failed to evaluate: %s", err)
            continue
        if sentence:
            return sentence
    d = (ya.double() - yb.double()).abs()
    flat = int(torch.argmax(d.nan_to_num(float("inf"))))
    return (f"{where} differs from A's {a_name} by up to {float(d.reshape(-1)[flat]):.3g} "
            f"(rounding allows {float(allowed.reshape(-1)[flat]):.3g} there); none of the tested "
            "causes (flatten order, transposed weight, missing or doubled bias, constant scale, "
            "train/eval mode, shared kernel) explains it: compare the two layers' weights.")


def _flatten_order(mod: nn.Module, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor,
                   allowed: torch.Tensor, la: Layer, a_layers: list[Layer],
                   where: str) -> str | None:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or x.dim() != 2:
        return None  # a Linear (or an exported aten.linear) on a flattened input
    n, f = x.shape
    idx = next((i for i, layer in enumerate(a_layers) if layer is la), len(a_layers))
    shape = None
    for prev in reversed(a_layers[:idx]):
        s = tuple(prev.output.shape[1:])
        if len(s) >= 2 and prev.output.shape[0] == n and int(torch.tensor(s).prod()) == f:
            shape = s
            break
    if shape is None or sum(d > 1 for d in shape) < 2:
        return None  # one position (or only channels): both orders are the same sequence
    mod64 = copy.deepcopy(mod).double()
    cf = {2: "CL", 3: "CHW", 4: "CDHW"}.get(len(shape), "C" + "*" * (len(shape) - 1))
    cl = cf[1:] + "C"
    dims = "x".join(map(str, shape))
    chan_last = (shape[1:] + shape[:1])
    # B reads an input flattened channel-first as if it were channel-last
    g_cl = x.view(n, *chan_last).movedim(-1, 1).reshape(n, f)
    # B reads an input flattened channel-first, permuted to channel-last order
    g_cf = x.view(n, *shape).movedim(1, -1).reshape(n, f)
    if _close(mod64(g_cl), yb, allowed, ya):
        return (f"{where} matches A's '{la.name}' after reading its flattened input as "
                f"{cl}-ordered: B's weights are laid out for the {dims} ({cf}) feature map "
                f"flattened in {cl} (channels-last) order, but the input arrives flattened in "
                f"{cf} order. Convert with order='{cf.lower()}' (the order A flattens in).")
    if _close(mod64(g_cf), yb, allowed, ya):
        return (f"{where} matches A's '{la.name}' after permuting its flattened input from "
                f"{cf} to {cl} order: B was converted for the {dims} ({cf}) feature map "
                f"flattened in {cl} (channels-last) order, but A flattens it in {cf} order. "
                f"Convert with order='{cf.lower()}'.")
    return None


def _transposed(mod: nn.Module, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor,
                allowed: torch.Tensor, where: str, a_name: str) -> str | None:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.shape[0] != w.shape[1]:
        return None

    def flip(m: nn.Module) -> None:
        m.weight.copy_(m.weight.transpose(0, 1).clone())  # type: ignore[operator, union-attr]

    if _close(_variant(mod, flip)(x), yb, allowed, ya):
        return (f"{where} matches A's {a_name} with its weight transposed "
                f"({'W.T' if w.dim() == 2 else 'in/out channels swapped'}): the weight was "
                "transposed when it was copied (a Linear stores (out, in); x @ W.T is the map).")
    return None


def _bias(mod: nn.Module, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor,
          allowed: torch.Tensor, where: str, a_name: str) -> str | None:
    b = getattr(mod, "bias", None)
    if not isinstance(b, torch.Tensor) or not bool(b.detach().abs().max() > 0):
        return None
    for factor, what in ((0.0, "without its bias (bias missing)"),
                         (2.0, "with its bias added twice (bias doubled)")):
        def scale(m: nn.Module, f: float = factor) -> None:
            m.bias.mul_(f)  # type: ignore[operator, union-attr]

        if _close(_variant(mod, scale)(x), yb, allowed, ya):
            return f"{where} matches A's {a_name} computed {what}."
    return None


def _scale(ya: torch.Tensor, yb: torch.Tensor, allowed: torch.Tensor, where: str,
           a_name: str) -> str | None:
    a, b = ya.double(), yb.double()
    denom = float((a * a).sum())
    if denom == 0.0:
        return None
    c = float((a * b).sum()) / denom
    if abs(c - 1.0) < 1e-6 or not _close(c * a, b, allowed, a):
        return None
    return (f"{where} is A's {a_name} times a constant {c:.6g} (fitted by least squares, "
            "exact within rounding): a scale factor (e.g. a folded normalization or 1/N) was "
            "applied twice or not at all.")


def _shared_kernel(x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, allowed: torch.Tensor,
                   where: str, a_name: str) -> str | None:
    if x.dim() < 3 or x.dim() != ya.dim():
        return None
    tol = float(2 * allowed.max()) + 1e-300
    for ch in (1, x.dim() - 1):
        pos = [d for d in range(1, x.dim()) if d != ch]
        if any(x.shape[d] != ya.shape[d] for d in pos):
            continue
        n_pos = int(torch.tensor([x.shape[d] for d in pos]).prod())
        if n_pos < 2:
            continue
        xs = x.double().movedim(ch, -1).reshape(-1, x.shape[ch])
        rows = xs.shape[0]
        if rows < 2 * (xs.shape[1] + 1):
            continue
        design = torch.cat([xs, torch.ones(rows, 1, dtype=torch.float64)], dim=1)

        rb, ra = _fit_residual(design, yb, ch), _fit_residual(design, ya, ch)
        axes = ", ".join(str(d) for d in pos)
        if rb <= tol < ra:
            return (f"{where} applies one kernel shared across axis {axes} ({n_pos} positions): "
                    f"a single affine map fits its output at every position (residual {rb:.2g}), "
                    f"while A's {a_name} has separate weights per position (residual {ra:.2g}). "
                    "The converted layer needs a kernel spanning those positions, not a 1x1 one.")
        if ra <= tol < rb:
            return (f"A's {a_name} applies one kernel shared across axis {axes} ({n_pos} "
                    f"positions) (residual {ra:.2g}), while {where} has separate weights per "
                    f"position (residual {rb:.2g}): its weights were not tied when converted.")
    return None


def _fit_residual(design: torch.Tensor, y: torch.Tensor, ch: int) -> float:
    """Max residual of the least-squares fit ``y ≈ design @ K`` (one map for all positions)."""
    ys = y.double().movedim(ch, -1).reshape(design.shape[0], -1)
    k = torch.linalg.lstsq(design, ys).solution
    return float((design @ k - ys).abs().max())
