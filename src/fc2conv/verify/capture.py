"""Intermediate outputs of a PyTorch model, named as the user knows its layers.

- ``nn.Module``: forward hooks on every module but the root and plain containers (Sequential,
  ModuleList, ModuleDict); the layer's name is its qualified name (``backbone.0``). A block is
  recorded after the layers inside it (hooks fire when a forward returns).
- exported programs (``ExportedProgram.module()``, a GraphModule without submodules): an FX
  interpreter records every node, and the last node of each run of nodes that belong to the same
  innermost user module (``nn_module_stack``) is that module's output.

Layout-only layers (Flatten, Identity, reshapes, permutes) are not captured: they move values
without computing, and the comparison aligns layouts itself.

Lookups in a stored table (``aten.embedding`` / ``aten.index_select`` whose table is one of the
module's parameters or buffers, :class:`_Lookups`) are layers of their own, wherever they are
called: an ``nn.Embedding`` (also hooked: its hook's row replaces the lookup's), ``F.embedding``
in a user's forward, or a converted GraphModule's ``aten.embedding`` over a ``get_attr``. The
lookup's name is its table's qualified name (without ``.weight``: ``transformer.wte``; an
``nn.Embedding`` owner first when the table is tied to several modules), so the same table is
the same layer in both models. Its output ``y[i] = T[ids[i]]`` is exact: a changed table row
diverges at the lookup, not in the first layer after it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fc2conv.core.describe import describe
from fc2conv.core.provenance import source_of
from fc2conv.verify.values import Layer, Run

LAYOUT_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
LAYOUT_CLASSES = {"Flatten", "Unflatten", "Identity", "Sequential", "ModuleList", "ModuleDict"}


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """Tensors of a (possibly nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in flatten_outputs(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for k in value.__dataclass_fields__ for t in flatten_outputs(getattr(value, k))]
    return []


def run_torch(module: nn.Module, inputs: tuple[torch.Tensor, ...], *, capture: bool,
              graph: bool) -> Run:
    """Run ``module(*inputs)`` without autograd; with ``capture``, also its layer outputs."""
    with torch.no_grad():
        if not capture:
            return Run(flatten_outputs(module(*inputs)))
        if graph and isinstance(module, fx.GraphModule):
            return _run_graph(module, inputs)
        return _run_hooked(module, inputs)


def _first_tensor(value: Any) -> torch.Tensor | None:
    tensors = flatten_outputs(value)
    return tensors[0] if tensors else None


_LOOKUPS = {torch.ops.aten.embedding.default: 0, torch.ops.aten.index_select.default: 0}


def stored_tensors(module: nn.Module) -> dict[tuple[int, tuple[int, ...]], list[str]]:
    """Every float parameter and buffer of ``module`` by (data pointer, shape): all its qualified
    names, tied ones included (``transformer.wte.weight`` and ``lm_head.weight``)."""
    out: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t.is_floating_point() and t.numel():
            names = out.setdefault((t.data_ptr(), tuple(t.shape)), [])
            if name not in names:
                names.append(name)
    return out


def lookup_name(module: nn.Module, names: list[str]) -> str:
    """The layer name of a lookup in the stored tensor called ``names``: an ``nn.Embedding``
    owner's path first, else the first name; ``.weight`` dropped (the owner's path)."""
    def owner(name: str) -> nn.Module | None:
        path = name.rpartition(".")[0]
        try:
            return module.get_submodule(path)
        except AttributeError:
            return None

    best = next((n for n in names if isinstance(owner(n), nn.Embedding)), names[0])
    head, _, leaf = best.rpartition(".")
    return head if leaf == "weight" and head else best


def weight_sharers(module: nn.Module, layer: str) -> list[str]:
    """The other modules (qualified names) holding a parameter or buffer of ``layer`` (a module
    path or a stored tensor's name, as captured): the same tensor, or one on the same memory
    (``lm_head.weight`` tied to ``transformer.wte.weight``)."""
    try:
        sub = module.get_submodule(layer)
        own = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
    except AttributeError:
        try:
            own = [module.get_parameter(layer)]
        except AttributeError:
            return []
    ptrs = {t.data_ptr() for t in own if t.is_floating_point() and t.numel()}
    out: list[str] = []
    for (ptr, _), names in stored_tensors(module).items():
        if ptr not in ptrs:
            continue
        for name in names:
            owner = name.rpartition(".")[0] or name
            if owner != layer and name != layer and owner not in out:
                out.append(owner)
    return out


class _Lookups(TorchDispatchMode):
    """Records lookups in a stored table of ``module`` (see the module docstring)."""

    def __init__(self, module: nn.Module, layers: list[Layer]) -> None:
        super().__init__()
        self.module, self.layers = module, layers
        self.tables = stored_tensors(module)
        # id of each Layer this mode added -> the data pointer of the lookup's live output
        self.recorded: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _LOOKUPS and isinstance(out, torch.Tensor) and out.is_floating_point():
            table = args[_LOOKUPS[func]]
            if func is torch.ops.aten.index_select.default and args[1] != 0:
                return out
            names = self.tables.get((table.data_ptr(), tuple(table.shape)))
            if names:
                layer = Layer(name=lookup_name(self.module, names),
                              kind=f"Embedding {table.shape[0]}x{table.shape[-1]} (lookup)",
                              output=out.detach().clone())  # in-place ops may follow
                self.layers.append(layer)
                self.recorded[id(layer)] = out.data_ptr()
        return out


class _Snapshots:
    """Copies of recorded tensors as they are when their hook fires.

    A hook's ``output`` is the live tensor: an in-place op after the layer (``out += residual``
    in a ResNet block, ``ReLU(inplace=True)``) rewrites it, so a recorded ``bn2`` would read
    ``relu(bn2(x) + residual)`` by the end of the run while a functional twin's reads
    ``bn2(x)``: a spurious divergence, named before the real one. A tensor seen again at the
    same version (a layer's input that is the previous layer's output) reuses its copy."""

    def __init__(self) -> None:
        self.kept: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        hit = self.kept.get(id(t))
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2]
        copy = t.detach().clone()
        self.kept[id(t)] = (t, t._version, copy)  # t held: its id is not reused meanwhile
        return copy


def _maybe(snapshot: _Snapshots, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else snapshot(t)


def _run_hooked(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Run:
    layers: list[Layer] = []
    handles = []
    lookups = _Lookups(module, layers)
    snapshot = _Snapshots()
    for name, sub in module.named_modules():
        if sub is module or isinstance(sub, LAYOUT_MODULES + CONTAINERS):
            continue

        def hook(mod: nn.Module, args: Any, output: Any, _name: str = name) -> None:
            out = _first_tensor(output)
            if out is None:
                return
            same_as_lookup = (layers and layers[-1].name == _name
                              and lookups.recorded.get(id(layers[-1])) == out.data_ptr())
            layer = Layer(name=_name, kind=describe(mod), output=snapshot(out),
                          source=source_of(mod), input=_maybe(snapshot, _first_tensor(args)),
                          module=mod)
            if same_as_lookup:
                layers[-1] = layer  # an nn.Embedding: its hook's row, with the module
            else:
                layers.append(layer)

        handles.append(sub.register_forward_hook(hook))
    try:
        with lookups:
            outputs = flatten_outputs(module(*inputs))
    finally:
        for h in handles:
            h.remove()
    return Run(outputs, layers)


class Replay(nn.Module):
    """A captured exported-program layer rebuilt as a module: ``target(x, weight, bias, *rest)``
    (``aten.linear`` / ``aten.conv*d``), so diagnosis can re-run it with changed weights."""

    def __init__(self, target: Any, weight: torch.Tensor, bias: torch.Tensor | None,
                 rest: tuple[Any, ...]) -> None:
        super().__init__()
        self.target = target
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.rest = rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(x, self.weight, self.bias, *self.rest)  # type: ignore[no-any-return]


_REPLAYABLE = ("aten.linear", "aten.conv1d", "aten.conv2d", "aten.conv3d")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.records: list[tuple[str, str, torch.Tensor, Any]] = []

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        stack = n.meta.get("nn_module_stack") if n.op == "call_function" else None
        out = _first_tensor(result)
        if stack and out is not None:
            path, cls = list(stack.values())[-1]
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            cls_name = cls_name.rsplit(".", 1)[-1]
            replay = None
            if str(n.target).startswith(_REPLAYABLE):
                args, _ = self.fetch_args_kwargs_from_env(n)
                if len(args) >= 2 and isinstance(args[0], torch.Tensor):
                    bias = args[2] if len(args) > 2 else None
                    replay = (args[0], Replay(n.target, args[1], bias, tuple(args[3:])))
            if path and cls_name not in LAYOUT_CLASSES:
                self.records.append((str(path), cls_name, out, replay))
        return result


def _run_graph(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> Run:
    rec = _Recorder(gm)
    outputs = flatten_outputs(rec.run(*inputs))
    layers: list[Layer] = []
    for path, cls_name, out, replay in rec.records:
        if layers and layers[-1].name == path:
            layers[-1].output = out  # the module's last node is its output
        else:
            layers.append(Layer(name=path, kind=cls_name, output=out))
        if replay is not None and layers[-1].module is None:
            layers[-1].input, layers[-1].module = replay
            w = replay[1].weight
            if cls_name == "Linear" and w.dim() == 2:
                layers[-1].kind = f"Linear {w.shape[1]}->{w.shape[0]}"
            elif cls_name.startswith("Conv") and w.dim() >= 3:
                kernel = "x".join(str(k) for k in w.shape[2:])
                layers[-1].kind = f"{cls_name} {w.shape[1]}->{w.shape[0]}, kernel {kernel}"
    return Run(outputs, layers)
