"""Turn what the user gave (an ``nn.Module``, an fx ``GraphModule``, a ``torch.export``
program) into a GraphModule the passes can rewrite, with every value's shape recorded.

``torch.fx.symbolic_trace`` comes first: it keeps the user's modules (``nn.Linear`` at
``blocks.0.up`` stays a ``call_module`` of ``blocks.0.up``), so converted layers keep their names.
When a model cannot be traced symbolically (data-dependent control flow), ``torch.export``
with the example inputs is the fallback: its graph holds aten ops with ``get_attr`` weights
named by the user's parameter paths, which :mod:`fc2conv.pytorch.ops` recognizes too.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """A single tensor or a sequence of them -> a tuple of positional inputs.

    A sequence without any tensor (a shape like ``(2, 3)``) is refused with a sentence: the
    passes need example tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str) \
            and any(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    hint = ""
    if isinstance(example_inputs, Sequence) and example_inputs \
            and all(isinstance(d, int) for d in example_inputs):
        dims = ", ".join(str(d) for d in example_inputs)
        hint = f"; it looks like a shape: pass (torch.randn({dims}),)"
    raise Fc2ConvError(
        "example_inputs must be a tensor or a tuple of tensors (example inputs, not a shape), "
        f"got {_short(example_inputs)}{hint}"
    )


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, Sequence) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_model(model: Any) -> None:
    """Refuse what is neither an ``nn.Module`` nor a ``torch.export`` program, in a sentence."""
    if not isinstance(model, nn.Module | torch.export.ExportedProgram):
        raise Fc2ConvError(
            f"expected a torch.nn.Module or torch.export.ExportedProgram, got "
            f"{type(model).__name__}"
        )


def strip_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove the input-shape guards ``torch.export`` puts in ``ep.module()``.

    They pin the input to the exported shape; the converted model must accept other sizes.
    """
    for node in list(gm.graph.nodes):
        guard = node.op == "call_module" and str(node.target).startswith("_guards")
        check = node.op == "call_function" and "assert" in getattr(node.target, "__name__", "")
        if (guard or check) and not node.users:
            gm.graph.erase_node(node)
    for key, hook in list(gm._forward_pre_hooks.items()):
        if "input_constraints" in getattr(hook, "__name__", ""):
            del gm._forward_pre_hooks[key]
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def quiet_deepcopy(model: Any) -> Any:
    """``copy.deepcopy`` without torch's pytree FutureWarnings for exported modules."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(model)


def to_graph(model: Any, example_inputs: tuple[Any, ...] | None = None, *, inplace: bool = False
             ) -> fx.GraphModule:
    """A GraphModule computing ``model`` (a deep copy unless ``inplace``)."""
    if isinstance(model, torch.export.ExportedProgram):
        return strip_guards(model.module())  # type: ignore[arg-type]
    check_model(model)
    if isinstance(model, fx.GraphModule):
        gm = model if inplace else quiet_deepcopy(model)
        return strip_guards(gm)
    root = model if inplace else quiet_deepcopy(model)
    try:
        return fx.symbolic_trace(root)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...
        if example_inputs is None:
            raise Fc2ConvError(
                f"torch.fx cannot trace {type(model).__name__} ({exc}); pass example inputs so "
                f"fc2conv can use torch.export instead"
            ) from None
        log.info("torch.fx could not trace %s (%s); using torch.export", type(model).__name__, exc)
    try:
        ep = torch.export.export(root, tuple(example_inputs))
    except Exception as exc:
        raise Fc2ConvError(
            f"neither torch.fx nor torch.export can capture {type(model).__name__} as a graph "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return strip_guards(ep.module())  # type: ignore[arg-type]


def record_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> Any:
    """Run ``gm`` once on the example inputs, recording each value's shape in ``node.meta``.

    Returns the output. A wrong input shape is reported as a sentence, not a traceback.
    """
    interp = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            return interp.run(*example_inputs)
    except Exception as exc:
        shapes = ", ".join(
            "x".join(str(s) for s in a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            for a in example_inputs
        )
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        where = f" (at {interp.current!r})" if interp.current else ""
        raise Fc2ConvError(
            f"the model does not run on inputs of shape {shapes}{where}: {first}"
        ) from None


class _ShapeRecorder(fx.Interpreter):
    """Like ShapeProp, without printing a traceback when a node fails."""

    current: str | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = str(n.target) if n.op == "call_module" else n.name
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        else:
            n.meta.pop("tensor_meta", None)
        return result


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """``base`` if no attribute path of ``gm`` uses it, else ``base_1``, ``base_2``, ..."""
    def taken(name: str) -> bool:
        try:
            gm.get_submodule(name)
            return True
        except AttributeError:
            pass
        obj: Any = gm
        for part in name.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    if not taken(base):
        return base
    i = 1
    while taken(f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def drop_dead_attrs(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the tensors at ``targets`` (the weights a pass replaced) that no ``get_attr``
    node reads any more, so the result does not carry the old layers' weights as well."""
    gm.graph.eliminate_dead_code()
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for target in targets - read:
        owner_path, _, attr = target.rpartition(".")
        if owner_path and any(owner_path == c or owner_path.startswith(c + ".") for c in called):
            continue  # a module's own forward reads it (a converted layer now lives there)
        try:
            owner = gm.get_submodule(owner_path)
        except AttributeError:
            continue
        if isinstance(getattr(owner, attr, None), torch.Tensor):
            delattr(owner, attr)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, drop dead code and unused submodules, recompile (every pass ends here)."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
