"""The spread of perturbed float64 runs around the exact one: what the noise twins measure
(:mod:`fc2conv.verify.noise` for PyTorch models, :mod:`fc2conv.verify.onnx_noise` for ONNX)."""

from __future__ import annotations

from typing import Any

import torch

TRIALS = 3
"""Perturbed runs per draw; the noise is the elementwise max of their deviations."""


def accumulate(noise: list[Any], got: list[torch.Tensor], exact: list[torch.Tensor]) -> None:
    """Elementwise max over trials of ``|ỹ - y|`` (float64 tensors; 0.0 until the first)."""
    for i, (g, e) in enumerate(zip(got, exact, strict=True)):
        if g.is_floating_point() and g.numel():
            d = (torch.as_tensor(g).double() - torch.as_tensor(e).double()).abs()
            d = d.nan_to_num(0, 0, 0)
            prev = noise[i]
            noise[i] = d if not isinstance(prev, torch.Tensor) else torch.maximum(prev, d)


def maxima(noise: list[list[Any]]) -> list[list[float]]:
    """Per draw, per output: the largest element of the noise (0.0 where there is none)."""
    return [[float(t.max()) if isinstance(t, torch.Tensor) and t.numel() else 0.0 for t in row]
            for row in noise]
