"""Running a PyTorch model for ``compare`` in one of three *modes* (see
:mod:`fc2conv.verify.bound`):

- ``"native"``: as given (its own dtype and device);
- ``"reference"``: a float64 copy on float64 inputs (the exact-arithmetic stand-in);
- ``"magnitude"``: a float64 copy whose weights are replaced by ``|W|`` (batch-norm running means
  by ``-|mean|``) run on ``|x|``: every affine map becomes ``|W||x| + |b|``, the magnitudes that
  Higham's bound multiplies.

The copies are built once per model and kept by the caller (``twins``); the user's module is
never changed. Layer capture: :mod:`fc2conv.verify.capture`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fc2conv.verify.capture import run_torch
from fc2conv.verify.values import Run

MODES = ("native", "reference", "magnitude")


def run(module: nn.Module, inputs: tuple[torch.Tensor, ...], mode: str, *, dtype: torch.dtype,
        device: torch.device, capture: bool, graph: bool, twins: dict[str, nn.Module]) -> Run:
    """Run ``module`` (``graph``: an exported program's GraphModule) on ``inputs`` in ``mode``,
    the model computing in ``dtype`` on ``device``; the float64 copy of a mode is built on first
    use and kept in ``twins``."""
    if mode != "native" and mode not in twins:
        twins[mode] = twin(module, mode)
    target = module if mode == "native" else twins[mode]
    return run_torch(target, cast_inputs(inputs, mode, dtype, device), capture=capture,
                     graph=graph)


def twin(module: nn.Module, mode: str) -> nn.Module:
    """A float64 copy of ``module`` (``|W|`` weights in ``"magnitude"`` mode); ``module`` is
    left untouched."""
    out = copy.deepcopy(module).to(torch.float64)
    if mode == "magnitude":
        _bound_activations(out)
        with torch.no_grad():
            for name, t in [*out.named_parameters(), *out.named_buffers()]:
                if not t.is_floating_point():
                    continue
                if name.endswith("running_mean"):
                    t.copy_(-t.abs())  # BN: (x - mean) -> x + |mean|
                elif not name.endswith("running_var"):
                    t.copy_(t.abs())
    return out


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


def cast_inputs(inputs: tuple[torch.Tensor, ...], mode: str, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, ...]:
    """``inputs`` as the model sees them in ``mode``: floating inputs in the model's dtype and
    on its device (rounded as the native model rounds them), then float64 (and ``|x|`` in
    ``"magnitude"`` mode); integer inputs only moved."""
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
