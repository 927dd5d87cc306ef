"""Every conversion checks itself: the converted model against the original, with
:func:`fc2conv.compare`'s judgement, on the example inputs and on one fresh draw like them.

A graph capture can take another Python branch than eager execution (``torch.jit.isinstance``
is False on an fx Proxy), so a rewrite that is right op by op can still compute another
function. The check runs both models; a ``"different"`` verdict raises
:class:`~fc2conv.errors.Fc2ConvError` naming the first layer whose outputs diverge.

The fresh draw keeps what the example says about each input: float tensors are drawn normal
with the example's mean and standard deviation, integer ids uniformly in the example's range
``[min, max]``, 0/1 masks and booleans are kept (a random mask is not a mask the model saw).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fc2conv.errors import Fc2ConvError
from fc2conv.pytorch.trace import Inputs, quiet_deepcopy

log = logging.getLogger(__name__)


class _Positional(nn.Module):
    """``model`` called as ``model(*args, **kwargs)`` from the tensors of ``inputs`` given
    positionally (``compare`` feeds tensors positionally); non-tensor inputs stay as given."""

    def __init__(self, model: Any, inputs: Inputs) -> None:
        super().__init__()
        self.model = model
        self.args = list(inputs.args)
        self.kwargs = dict(inputs.kwargs)
        self.slots: list[tuple[str, Any]] = [
            ("a", i) for i, v in enumerate(self.args) if isinstance(v, torch.Tensor)]
        self.slots += [("k", k) for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> Any:
        args, kwargs = list(self.args), dict(self.kwargs)
        for (kind, key), t in zip(self.slots, tensors, strict=True):
            if kind == "a":
                args[key] = t  # type: ignore[call-overload]
            else:
                kwargs[key] = t  # type: ignore[index]
        return self.model(*args, **kwargs)


def positional(model: Any, inputs: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``model`` and ``inputs`` (a tuple or keyword :class:`Inputs`) as ``compare`` takes
    them: a module called with the tensors positionally, and those tensors."""
    ins = inputs if isinstance(inputs, Inputs) else Inputs(tuple(inputs))
    return _Positional(model, ins), tuple(t for _, t in ins.tensors())


def fresh_draw(inputs: Inputs, seed: int = 0) -> Inputs:
    """Inputs like ``inputs`` with new random values (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def draw(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.dtype == torch.bool:
            return x
        if x.is_floating_point():
            xf = x.double()
            std = float(xf.std()) if x.numel() > 1 else 1.0
            std = std if std > 0 else 1.0
            new = torch.randn(x.shape, generator=g, dtype=torch.float64) * std + float(xf.mean())
            return new.to(x.dtype)
        if x.is_complex():
            return x
        lo, hi = int(x.min()), int(x.max())
        if lo >= 0 and hi <= 1:
            return x  # a mask
        return torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype)

    return Inputs([draw(a) for a in inputs.args], {k: draw(v) for k, v in inputs.kwargs.items()})


@contextlib.contextmanager
def _eval(*models: Any) -> Iterator[None]:
    """Run ``models`` in eval mode, restoring each submodule's flag afterwards."""
    modes = [(m, m.training) for model in models if isinstance(model, nn.Module)
             for m in model.modules()]
    for m, _ in modes:
        m.training = False  # not .eval(): torch.export's modules refuse it
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def in_training(model: Any) -> bool:
    """Whether a dropout or batch norm of ``model`` is in training mode (random outputs)."""
    if not isinstance(model, nn.Module):
        return False
    return any(m.training for m in model.modules()
               if isinstance(m, nn.modules.dropout._DropoutNd | nn.modules.batchnorm._NormBase))


def reference_copy(model: Any, inplace: bool, verify: bool) -> Any:
    """The original to check against: ``model`` itself, or a copy when the conversion is
    about to change it in place."""
    if not verify:
        return None
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    return quiet_deepcopy(model) if inplace else model


def self_check(original: Any, converted: nn.Module, inputs: Inputs, what: str) -> None:
    """Raise :class:`Fc2ConvError` when ``converted`` computes another function than
    ``original`` on ``inputs`` or on a fresh draw like them (``compare``'s verdict
    ``"different"``)."""
    from fc2conv.verify import compare

    if original is None:
        return
    if in_training(original):
        log.warning("%s is in training mode: the conversion is checked in eval semantics "
                    "(dropout off, batch norm running statistics)", type(original).__name__)
    draws = [("the example inputs", inputs), ("a fresh random draw", fresh_draw(inputs))]
    with _eval(original, converted), torch.no_grad():
        try:
            inputs.call(converted)
        except Exception as exc:  # never hand back a model that does not run
            text = str(exc).strip().splitlines()
            raise Fc2ConvError(
                f"the {what} does not run on the example inputs ({type(exc).__name__}: "
                f"{text[0][:200] if text else ''}); please report this model"
            ) from None
        for label, draw in draws:
            a, b = _Positional(original, draw), _Positional(converted, draw)
            tensors = tuple(t for _, t in draw.tensors())
            try:
                report = compare(a, b, inputs=tensors, layers=False)
            except Fc2ConvError as err:
                log.warning("could not check the %s on %s: %s", what, label, err)
                return
            if report.verdict != "different":
                continue
            where = _first_divergence(a, b, tensors)
            raise Fc2ConvError(
                f"the {what} computes another function than the original on {label}"
                f"{where}: max abs error {report.max_abs_error:.3g} (rounding bound "
                f"{report.bound:.3g}); please report this model (verify=False skips the check)"
            )


def _first_divergence(a: nn.Module, b: nn.Module, tensors: tuple[torch.Tensor, ...]) -> str:
    """`` (first diverging at 'layer')`` from a layer-by-layer compare, or ``""``."""
    from fc2conv.verify import compare

    try:
        report = compare(copy.copy(a), copy.copy(b), inputs=tensors, layers=True)
    except Exception as exc:  # the layer walk is a diagnosis, not the check itself
        log.info("layer-by-layer comparison failed: %s", exc)
        return ""
    name = report.first_divergence
    return f" (first diverging at {name.removeprefix('model.')!r})" if name else ""
