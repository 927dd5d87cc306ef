"""Load the things ``compare`` accepts, as a :class:`Model` that runs on a backend.

Accepted: ``nn.Module``, ``torch.export.ExportedProgram``, ``onnx.ModelProto``, or a path to a
``.pt2`` (``torch.export.save``) or ``.onnx`` file. A ``.pt``/``.pth`` pickle is refused with
:class:`~fc2conv.errors.UnsafeFileError` unless ``trust_pickle=True``: unpickling runs arbitrary
code. onnx and onnxruntime are imported only on the ONNX path.

:meth:`Model.run` hands the model to its backend (:mod:`fc2conv.verify.torch_backend`,
:mod:`fc2conv.verify.onnx_backend`), in one of three modes: ``"native"`` (as given),
``"reference"`` (a float64 copy) or ``"magnitude"`` (the float64 copy with ``|W|`` on ``|x|``).
With ``capture=True`` a run also returns the intermediate layer outputs (forward hooks for
``nn.Module``, an FX interpreter for exported programs, extra graph outputs for ONNX). The
float64 copies and sessions a backend builds are kept on the model (``_twins``, ``cache``) and
reused across draws; the user's module and graph are never changed.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fc2conv.errors import Fc2ConvError, UnsafeFileError, load_or_explain
from fc2conv.pytorch.export_io import quiet
from fc2conv.verify import torch_backend
from fc2conv.verify.values import InputSpec, Run

__all__ = ["InputSpec", "Model", "load"]

log = logging.getLogger(__name__)


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
        return torch_backend.run(self.module, inputs, mode, dtype=self.dtype, device=self.device,
                                 capture=capture, graph=self.exported, twins=self._twins)


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
        model.cache.update(base_dir=base, split=split, path=path.resolve())
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
