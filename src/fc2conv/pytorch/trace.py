"""Turn what the user gave (an ``nn.Module``, an fx ``GraphModule``, a ``torch.export``
program) into a GraphModule the passes can rewrite, with every value's shape recorded.

``torch.fx.symbolic_trace`` comes first: it keeps the user's modules (``nn.Linear`` at
``blocks.0.up`` stays a ``call_module`` of ``blocks.0.up``), so converted layers keep their names.
When a model cannot be traced symbolically (data-dependent control flow), ``torch.export``
with the example inputs is the fallback: its graph holds aten ops with ``get_attr`` weights
named by the user's parameter paths, which :mod:`fc2conv.pytorch.ops` recognizes too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)


class Inputs(tuple):  # type: ignore[type-arg]
    """Positional example inputs (a tuple, as before) that also carry keyword inputs
    (``kwargs``): a tokenizer's output ``{"input_ids": ..., "attention_mask": ...}`` is passed
    as keywords, the way the model is called."""

    kwargs: dict[str, Any]

    def __new__(cls, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Inputs:
        obj = super().__new__(cls, tuple(args))
        obj.kwargs = dict(kwargs or {})
        return obj

    @property
    def args(self) -> tuple[Any, ...]:
        return tuple(self)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every tensor input (positional ones named ``args[i]``)."""
        named = [(f"args[{i}]", a) for i, a in enumerate(self)]
        named += list(self.kwargs.items())
        return [(k, v) for k, v in named if isinstance(v, torch.Tensor)]

    def call(self, model: Any) -> Any:
        return model(*self, **self.kwargs)


def as_inputs(example_inputs: Any) -> Inputs:
    """A single tensor, a sequence of them or a dict of keyword inputs -> :class:`Inputs`.

    A sequence without any tensor (a shape like ``(2, 3)``) is refused with a sentence: the
    passes need example tensors."""
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,))
    if isinstance(example_inputs, Mapping) and example_inputs \
            and all(isinstance(k, str) for k in example_inputs) \
            and any(isinstance(t, torch.Tensor) for t in example_inputs.values()):
        return Inputs((), dict(example_inputs))
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str) \
            and any(isinstance(t, torch.Tensor) for t in example_inputs):
        return Inputs(tuple(example_inputs))
    hint = ""
    if isinstance(example_inputs, Sequence) and example_inputs \
            and all(isinstance(d, int) for d in example_inputs):
        dims = ", ".join(str(d) for d in example_inputs)
        hint = f"; it looks like a shape: pass (torch.randn({dims}),)"
    raise Fc2ConvError(
        "example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors "
        f"(example inputs, not a shape), got {_short(example_inputs)}{hint}"
    )


def flat_inputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[Any, ...]:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``.

    A ``torch.export`` module flattens ``(args, kwargs)`` by its input spec; a traced module
    binds them to its ``forward`` signature (defaults filled in)."""
    ins = as_inputs(inputs) if not isinstance(inputs, Inputs) else inputs
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return tuple(tree_flatten_spec((ins.args, ins.kwargs), info.in_spec))
    if not ins.kwargs:
        return ins.args
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values: list[Any] = list(ins.args)
    for node in placeholders[len(values):]:
        name = str(node.target).lstrip("*")
        if name in ins.kwargs:
            values.append(ins.kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise Fc2ConvError(f"the example inputs give no value for {name!r}")
    return tuple(values)


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
        concrete = _omitted(root, example_inputs)
        return fx.symbolic_trace(root, concrete_args=concrete or None)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...
        if example_inputs is None:
            raise Fc2ConvError(
                f"torch.fx cannot trace {type(model).__name__} ({exc}); pass example inputs so "
                f"fc2conv can use torch.export instead"
            ) from None
        log.info("torch.fx could not trace %s (%s); using torch.export", type(model).__name__, exc)
    ep = export_dynamic(root, as_inputs(example_inputs))
    return strip_guards(ep.module())  # type: ignore[arg-type]


def _omitted(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """The ``forward`` parameters with defaults that the example inputs leave out: traced at
    their default (``mask=None``), so the graph takes the branch the eager call takes."""
    import inspect

    if example_inputs is None:
        return {}
    ins = as_inputs(example_inputs)
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    given = {p.name for p in params[:len(ins.args)]} | set(ins.kwargs)
    return {p.name: p.default for p in params if p.name not in given
            and p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and (p.default is None or isinstance(p.default, bool | int | float | str))}


def _auto_shapes(model: nn.Module, inputs: Inputs) -> Any:
    """``dynamic_shapes`` marking every axis of every tensor input ``Dim.AUTO`` (dynamic
    unless the model's code pins it), in the form ``torch.export`` wants: keyed by the
    ``forward`` parameter each input binds to."""
    import inspect

    from torch.export import Dim

    def spec(v: Any) -> Any:
        return {i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None

    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    except TypeError:
        return None
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


def export_dynamic(model: nn.Module, inputs: Inputs) -> torch.export.ExportedProgram:
    """``torch.export`` ``model`` with every input axis dynamic where its code allows
    (``Dim.AUTO``); warns, by input and axis, for each one the model pins to the example's size.
    """
    shapes = _auto_shapes(model, inputs)
    try:
        with _quiet_export():
            try:
                ep = torch.export.export(model, inputs.args, inputs.kwargs,
                                         dynamic_shapes=shapes, strict=False)
            except Exception as exc:
                if shapes is None:
                    raise
                log.info("dynamic export failed (%s); exporting with static shapes", exc)
                ep = torch.export.export(model, inputs.args, inputs.kwargs, strict=False)
                shapes = None
    except Exception as exc:
        if getattr(getattr(model, "config", None), "use_cache", False):
            raise Fc2ConvError(
                f"Cannot capture {type(model).__name__}: it returns a key/value cache "
                f"(config.use_cache=True), which torch.export cannot hold; build it with "
                f"use_cache=False (or set model.config.use_cache = False) before converting"
            ) from None
        raise Fc2ConvError(
            f"neither torch.fx nor torch.export can capture {type(model).__name__} as a graph "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    _warn_static(ep, inputs, dynamic=shapes is not None)
    return ep


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 200 else line[:197] + "..."


def _warn_static(ep: torch.export.ExportedProgram, inputs: Inputs, dynamic: bool) -> None:
    """Warn, by input name and axis, for each axis that stays fixed to the example's size."""
    from torch.utils._pytree import SequenceKey, keystr, tree_flatten_with_path

    flat, _ = tree_flatten_with_path((inputs.args, inputs.kwargs))
    nodes = [n for n in ep.graph.nodes if n.op == "placeholder"
             and ep.graph_signature.inputs_to_parameters.get(n.name) is None
             and ep.graph_signature.inputs_to_buffers.get(n.name) is None
             and n.name not in ep.graph_signature.inputs_to_lifted_tensor_constants]
    user = [n for n in nodes if n.name in set(ep.graph_signature.user_inputs)]
    fixed: list[str] = []
    for (path, value), node in zip(flat, user, strict=False):
        val = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or val is None:
            continue
        name = keystr(path[1:]).strip("[]'\"")
        name = f"args[{name}]" if path[0] == SequenceKey(0) else name
        for axis, size in enumerate(val.shape):
            if _static(size):
                fixed.append(f"{name} axis {axis} = {int(size)}")
    if fixed:
        why = ("the model's code requires these sizes" if dynamic
               else "torch.export could not make them dynamic")
        log.warning("the converted model accepts only these input sizes (%s): %s", why,
                    ", ".join(fixed))


def _static(size: Any) -> bool:
    """Whether an exported axis size is a plain number (no free symbol)."""
    if isinstance(size, torch.SymInt):
        return not size.node.expr.free_symbols
    return isinstance(size, int)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def record_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> Any:
    """Run ``gm`` once on the example inputs, recording each value's shape in ``node.meta``.

    Returns the output. A wrong input shape is reported as a sentence, not a traceback.
    """
    interp = _ShapeRecorder(gm)
    flat = flat_inputs(gm, example_inputs)
    try:
        with torch.no_grad():
            return interp.run(*flat)
    except Exception as exc:
        shapes = ", ".join(
            "x".join(str(s) for s in a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            for a in flat
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
