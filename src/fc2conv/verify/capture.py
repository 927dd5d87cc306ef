"""Intermediate outputs of a PyTorch model, named as the user knows its layers.

- ``nn.Module``: forward hooks on every module but the root and plain containers (Sequential,
  ModuleList, ModuleDict); the layer's name is its qualified name (``backbone.0``). A block is
  recorded after the layers inside it (hooks fire when a forward returns).
- exported programs (``ExportedProgram.module()``, a GraphModule without submodules): an FX
  interpreter records every node, and the last node of each run of nodes that belong to the same
  innermost user module (``nn_module_stack``) is that module's output.

Layout-only layers (Flatten, Identity, reshapes, permutes) are not captured: they move values
without computing, and the comparison aligns layouts itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

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


def _run_hooked(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Run:
    layers: list[Layer] = []
    handles = []
    for name, sub in module.named_modules():
        if sub is module or isinstance(sub, LAYOUT_MODULES + CONTAINERS):
            continue

        def hook(mod: nn.Module, args: Any, output: Any, _name: str = name) -> None:
            out = _first_tensor(output)
            if out is None:
                return
            layers.append(Layer(
                name=_name, kind=describe(mod), output=out.detach(), source=source_of(mod),
                input=_first_tensor(args), module=mod,
            ))

        handles.append(sub.register_forward_hook(hook))
    try:
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
