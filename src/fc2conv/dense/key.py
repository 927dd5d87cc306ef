"""The key of a cached dense net: what its geometry and prepared copy depend on.

:func:`fc2conv.dense.model.prepare` keeps, per model object, the dense net and geometry it
traced; they are served again only while :func:`model_token` is unchanged: the module tree
(every module's type and identity, its plain settings, its children's names) and every
weight's identity, version counter, shape and device.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

_PLAIN = (bool, int, float, str, type(None))


def model_token(module: nn.Module) -> tuple[Any, ...]:
    """What a cached dense net and geometry depend on: the module tree's structure (every
    module's type and identity, its plain settings such as a conv's stride or a
    GraphModule's code, its children's names) and the identity, version, shape and device of
    every weight (an in-place update bumps ``_version``). One walk of the modules' own dicts:
    ``repr`` and ``named_parameters`` cost a few hundred microseconds a call on a small net,
    a few percent of its dense map on a 512^2 image."""
    out: list[Any] = []
    _walk(module, out)
    return tuple(out)


_SETTINGS: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _settings(module: nn.Module, state: dict[str, Any]) -> tuple[str, ...]:
    """The names of ``module``'s own settings: its public attributes and a GraphModule's
    ``_code`` (found once per module; torch's private bookkeeping, hooks and the like, is
    not the structure)."""
    try:
        return _SETTINGS[module]
    except KeyError:
        names = tuple(k for k in state if not k.startswith("_") or k == "_code")
        _SETTINGS[module] = names
        return names


def _walk(module: nn.Module, out: list[Any]) -> None:
    state = module.__dict__
    out.append((type(module), id(module)))
    for key in _settings(module, state):
        value = state.get(key)
        kind = type(value)
        if kind in _PLAIN:
            out.append((key, value))
        elif isinstance(value, (tuple, list)):  # kernel sizes, strides, paddings
            frozen = tuple(value)
            try:
                hash(frozen)
            except TypeError:  # something unhashable inside: its text
                out.append((key, repr(value)))
            else:
                out.append((key, frozen))
    for group in (state["_parameters"], state["_buffers"]):
        for name, t in group.items():
            if t is not None:
                try:
                    version = t._version
                except RuntimeError:  # an inference tensor
                    version = _version(t)
                out.append((name, t.data_ptr(), version, t.shape, t.device))
    for name, child in state["_modules"].items():
        out.append(name)
        if child is not None:
            _walk(child, out)


def _version(t: torch.Tensor) -> Any:
    """The tensor's version counter; an inference tensor has none: then its sum."""
    try:
        return t._version
    except RuntimeError:
        with torch.inference_mode():
            return float(t.detach().double().sum()) if t.is_floating_point() else int(t.sum())
