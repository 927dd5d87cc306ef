"""Load the things ``compare`` accepts and run them three ways.

Accepted: ``nn.Module``, ``torch.export.ExportedProgram``, ``onnx.ModelProto``, or a path to a
``.pt2`` (``torch.export.save``) or ``.onnx`` file. A ``.pt``/``.pth`` pickle is refused with
:class:`~fc2conv.errors.UnsafeFileError` unless ``trust_pickle=True``: unpickling runs arbitrary
code. onnx and onnxruntime are imported only on the ONNX path.

Each loaded model runs in one of three *modes* (see :mod:`fc2conv.verify.bound`):

- ``"native"``: as given (its own dtype and device);
- ``"reference"``: a float64 copy on float64 inputs (the exact-arithmetic stand-in);
- ``"magnitude"``: a float64 copy whose weights are replaced by ``|W|`` (batch-norm running means
  by ``-|mean|``) run on ``|x|``: every affine map becomes ``|W||x| + |b|``, the magnitudes that
  Higham's bound multiplies.

With ``capture=True`` a run also returns the intermediate layer outputs (forward hooks for
``nn.Module``, an FX interpreter for exported programs, extra graph outputs for ONNX).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fc2conv.errors import Fc2ConvError, UnsafeFileError, load_or_explain
from fc2conv.pytorch.export_io import quiet

log = logging.getLogger(__name__)

MODES = ("native", "reference", "magnitude")


@dataclass(eq=False)
class Layer:
    """One captured intermediate output, named as the user knows the layer."""

    name: str
    kind: str  # "Linear 256->64", "ReLU", "Gemm", ...
    output: torch.Tensor
    source: str | None = None  # fc2conv provenance: the user's layer this one replaces
    input: torch.Tensor | None = None
    module: nn.Module | None = None


@dataclass
class Run:
    outputs: list[torch.Tensor]
    layers: list[Layer] = field(default_factory=list)
    engine: str = ""  # ONNX: what ran it ("onnxruntime (float64)", "onnx reference evaluator")


@dataclass
class InputSpec:
    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype
    high: int | None = None  # integer inputs: ids are drawn in [0, high) (a table's rows)


@dataclass
class Model:
    """A loaded model: ``torch`` (an nn.Module, exported programs unwrapped) or ``onnx``."""

    label: str
    kind: str  # "torch" or "onnx"
    module: nn.Module | None = None
    onnx_model: Any = None
    specs: list[InputSpec] = field(default_factory=list)
    exported: bool = False
    pristine: nn.Module | None = None  # the user's module, when ``module`` is a working copy
    _twins: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    # ONNX: the weights read once, the float64 twins, sessions by mode and outputs
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "onnx" and self.onnx_model is not None:
            from fc2conv.verify import onnx_backend

            onnx_backend.register(self.onnx_model, self.cache)

    def __del__(self) -> None:
        if self.kind == "onnx" and self.onnx_model is not None:
            backend = sys.modules.get("fc2conv.verify.onnx_backend")
            if backend is not None:
                backend.forget(self.onnx_model, self.cache)

    # -- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the model computes in (its first floating parameter or input)."""
        if self.module is not None:
            for t in [*self.module.parameters(), *self.module.buffers()]:
                if t.is_floating_point():
                    return t.dtype
        for s in self.specs:
            if s.dtype.is_floating_point:
                return s.dtype
        if self.onnx_model is not None:
            from fc2conv.verify import onnx_backend

            return onnx_backend.float_dtype(self.onnx_model)
        return torch.float32

    @property
    def device(self) -> torch.device:
        if self.module is not None:
            for t in [*self.module.parameters(), *self.module.buffers()]:
                return t.device
        return torch.device("cpu")

    def describe(self) -> str:
        fmt = "ONNX" if self.kind == "onnx" else ("exported program" if self.exported else "torch")
        return f"{self.label} ({fmt}, {str(self.dtype).replace('torch.', '')})"

    # -- running ------------------------------------------------------------------------------
    def run(self, inputs: tuple[torch.Tensor, ...], mode: str = "native",
            capture: bool = False) -> Run:
        """Run on ``inputs`` in ``mode``; outputs are flattened to a list of tensors."""
        if self.kind == "onnx":
            from fc2conv.verify import onnx_backend

            return onnx_backend.run(self.onnx_model, inputs, mode, capture, self.cache)
        assert self.module is not None
        if mode != "native" and mode not in self._twins:
            self._twins[mode] = _twin(self.module, mode)
        module = self.module if mode == "native" else self._twins[mode]
        feed = _cast_inputs(inputs, mode, self.dtype, self.device)
        from fc2conv.verify.capture import run_torch

        return run_torch(module, feed, capture=capture, graph=self.exported)


def _twin(module: nn.Module, mode: str) -> nn.Module:
    """A float64 copy of ``module`` (``|W|`` weights in ``"magnitude"`` mode); ``module`` is
    left untouched."""
    twin = copy.deepcopy(module).to(torch.float64)
    if mode == "magnitude":
        _bound_activations(twin)
        with torch.no_grad():
            for name, t in [*twin.named_parameters(), *twin.named_buffers()]:
                if not t.is_floating_point():
                    continue
                if name.endswith("running_mean"):
                    t.copy_(-t.abs())  # BN: (x - mean) -> x + |mean|
                elif not name.endswith("running_var"):
                    t.copy_(t.abs())
    return twin


class LipschitzMagnitude(nn.Module):
    """In the magnitude twin, stands in for a pointwise op ``f`` with Lipschitz constant ``k``
    and ``|f(x)| <= k|x| + c``: maps a magnitude ``M >= 0`` to ``k M + c``, which bounds both the
    op's output and the error it passes on."""

    def __init__(self, k: float, c: float = 0.0) -> None:
        super().__init__()
        self.k, self.c = k, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * x + self.c


# (k, c) of pointwise activations; ReLU-like ops are the identity on magnitudes already.
_ACTIVATION_BOUNDS: dict[type[nn.Module], tuple[float, float]] = {
    nn.Tanh: (1.0, 0.0), nn.Hardtanh: (1.0, 0.0), nn.Softsign: (1.0, 0.0),
    nn.GELU: (1.13, 0.0), nn.SiLU: (1.1, 0.0), nn.Mish: (1.1, 0.0), nn.Hardswish: (1.5, 0.0),
    nn.ELU: (1.0, 0.0), nn.CELU: (1.0, 0.0), nn.SELU: (1.0507 * 1.6733, 0.0),
    nn.LeakyReLU: (1.0, 0.0), nn.Sigmoid: (1.0, 0.5), nn.Hardsigmoid: (1.0, 0.5),
    nn.Softplus: (1.0, 0.7),
}


def _bound_activations(twin: nn.Module) -> None:
    for name, sub in list(twin.named_modules()):
        bound = _ACTIVATION_BOUNDS.get(type(sub))
        if bound is not None and name:
            parent_name, _, attr = name.rpartition(".")
            parent = twin.get_submodule(parent_name) if parent_name else twin
            setattr(parent, attr, LipschitzMagnitude(*bound))


def _cast_inputs(inputs: tuple[torch.Tensor, ...], mode: str, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    out = []
    for x in inputs:
        if x.is_floating_point():
            x = x.to(device=device, dtype=dtype)  # what the native model sees
            if mode != "native":
                x = x.to(torch.float64)
            if mode == "magnitude":
                x = x.abs()
        else:
            x = x.to(device)
        out.append(x)
    return tuple(out)


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


# -- loading ----------------------------------------------------------------------------------

def load(obj: Any, label: str, *, trust_pickle: bool = False) -> Model:
    """Wrap ``obj`` (module, exported program, ONNX proto or path) as a :class:`Model`."""
    if isinstance(obj, str | os.PathLike):
        model = _load_path(Path(obj), trust_pickle)
        model.label = f"{label}: {model.label}"
        return model
    if isinstance(obj, torch.export.ExportedProgram):
        return _from_exported(obj, f"{label}: ExportedProgram")
    if isinstance(obj, nn.Module):
        pristine = None
        if any(m.training for m in obj.modules() if isinstance(m, nn.modules.batchnorm._NormBase)):
            # a training-mode batch norm updates its running stats on every run: run a copy
            pristine, obj = obj, copy.deepcopy(obj)
        return Model(label=f"{label}: {type(obj).__name__}", kind="torch", module=obj,
                     pristine=pristine)
    if type(obj).__name__ == "ModelProto" and type(obj).__module__.startswith("onnx"):
        from fc2conv.verify import onnx_backend

        name = obj.graph.name or "ModelProto"
        return Model(label=f"{label}: {name}", kind="onnx", onnx_model=obj,
                     specs=onnx_backend.specs(obj))
    raise Fc2ConvError(
        f"cannot compare a {type(obj).__name__}: give an nn.Module, a torch.export."
        "ExportedProgram, an onnx.ModelProto, or a path to a .pt2 or .onnx file"
    )


def _load_path(path: Path, trust_pickle: bool) -> Model:
    if not path.exists():
        raise Fc2ConvError(f"{path}: no such file")
    if path.is_dir():
        raise Fc2ConvError(f"{path} is a folder, not a model file (.pt2 or .onnx)")
    suffix = path.suffix.lower()
    label = path.name
    if suffix == ".onnx":

        from fc2conv.verify import onnx_backend, onnx_weights

        # external data stays on disk: compare maps it (np.memmap) instead of reading it,
        # after onnx's checks of where it lives (no absolute paths, no '..', no symlinks)
        proto = load_or_explain(path, "onnx",  # as convert says
                                lambda: onnx_weights.load_mapped(path))
        proto = onnx_backend.load(path) if not proto.graph.node else proto
        # the weights split off once and the proto that held them dropped: compare keeps the
        # skeleton (the graph, no weights) and the arrays (see verify/onnx_weights.py)
        base = path.resolve().parent
        split = onnx_weights.split(proto, base)
        del proto
        model = Model(label=label, kind="onnx", onnx_model=split[0],
                      specs=onnx_backend.specs(split[0]))
        model.cache.update(base_dir=base, split=split)
        return model
    if suffix == ".pt2":
        def _load_pt2() -> torch.export.ExportedProgram:
            with quiet():
                return torch.export.load(str(path))

        # one sentence per problem, shared with convert; a damaged program may load and then
        # fail to unwrap, which is the same problem
        return load_or_explain(path, "pt2", lambda: _from_exported(_load_pt2(), label))
    if suffix in (".pt", ".pth", ".bin", ".pkl"):
        if not trust_pickle:
            raise UnsafeFileError(
                f"{path} is a pickle, and loading it runs whatever code it contains; pass "
                "trust_pickle=True (CLI: --trust-pickle) only if you trust its origin, or save "
                "the model with torch.export.save (.pt2) or as ONNX"
            )
        try:
            obj = torch.load(str(path), weights_only=False, map_location="cpu")
        except Exception as err:
            raise Fc2ConvError(f"{path} could not be unpickled: {err}") from None
        if isinstance(obj, torch.export.ExportedProgram):
            return _from_exported(obj, label)
        if not isinstance(obj, nn.Module):
            raise Fc2ConvError(
                f"{path} holds a {type(obj).__name__}, not a model (a state_dict has no "
                "architecture to run); save the whole module or use torch.export.save"
            )
        return Model(label=label, kind="torch", module=obj)
    raise Fc2ConvError(
        f"{path} has an unknown model format '{suffix or '(no suffix)'}'; fc2conv compares "
        ".pt2 (torch.export.save) and .onnx files, or .pt/.pth pickles with --trust-pickle"
    )


def _from_exported(ep: torch.export.ExportedProgram, label: str) -> Model:
    specs = []
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shape = tuple(d if isinstance(d, int) else None for d in val.shape)
                specs.append(InputSpec(node.name, shape, val.dtype))
    return Model(label=label, kind="torch", module=ep.module(), specs=specs, exported=True)
