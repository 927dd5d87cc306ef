"""The rounding noise of a model, measured rather than bounded.

Backward-error view (Higham, ch. 3): a float evaluation of ``y = f(W, x)`` built from inner
products of length ``n`` is the *exact* result for weights and inputs perturbed by relative
amounts ``|δ| <= γ_n``; with rounding errors behaving as independent, mean-zero variables the
perturbations are typically ``~ sqrt(n) u`` (Higham & Mary, "A new approach to probabilistic
rounding error analysis", SIAM J. Sci. Comput., 2019). So the spread of A's float64 twin under
random relative perturbations ``W (1 + sqrt(n) u ξ)``, ``x (1 + sqrt(n) u ξ)`` is the size of
the differences that rounding, in any summation order, produces. ``ξ = ξ_elem + ξ_row`` with
independent ``N(0, 1)`` parts: one per element (the partial-sum roundings of a cancelling sum
look independent) and one shared by each output row of a weight (in a sum of one sign they
accumulate coherently, ~sqrt(n) u |y|).

Unlike the worst-case bound, this does not grow through ``|W|`` when weights cancel, so it
exposes a real difference hiding under that bound: ``compare`` calls two models different when
``max |A - B|`` exceeds :data:`NOISE_FACTOR` times the noise (and four units in the last place of
the output's scale). The factor is calibrated in the tests: summation-order variants in float32,
float16 and bfloat16 stay below it, a single weight changed by 1e-3 does not.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

NOISE_FACTOR = 16.0
TRIALS = 3


def rounding_noise(model: Any, draws: list[tuple[torch.Tensor, ...]], u: float,
                   longest: int) -> list[float]:
    """Per output: max over draws and :data:`TRIALS` perturbations of ``|ỹ - y|`` for the float64
    twin of ``model`` (a PyTorch :class:`~fc2conv.verify.models.Model`) with weights, buffers and
    inputs perturbed by relative Gaussian noise of size ``sqrt(max(longest, 1)) * u``."""
    from fc2conv.verify.capture import run_torch
    from fc2conv.verify.models import _cast_inputs

    scale = math.sqrt(max(longest, 1)) * u
    exact_runs = [model.run(x, "reference").outputs for x in draws]  # builds the float64 twin
    twin = model._twins["reference"]
    gen = torch.Generator().manual_seed(0)

    def shake(t: torch.Tensor) -> torch.Tensor:
        # independent per element (cancelling sums) plus one shared per output row (sums of
        # one sign, whose roundings accumulate coherently along the row)
        xi = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if t.dim() >= 1:
            xi = xi + torch.randn((t.shape[0],) + (1,) * (t.dim() - 1), generator=gen,
                                  dtype=t.dtype)
        return t * (1 + scale * xi.to(t.device))

    noise = [0.0] * len(exact_runs[0])
    for _ in range(TRIALS):
        shaken = copy.deepcopy(twin)
        with torch.no_grad():
            for t in [*shaken.parameters(), *shaken.buffers()]:
                if t.is_floating_point():
                    t.copy_(shake(t))
        for x, exact in zip(draws, exact_runs, strict=True):
            feed = tuple(shake(t) if t.is_floating_point() else t
                         for t in _cast_inputs(x, "reference", model.dtype, model.device))
            got = run_torch(shaken, feed, capture=False, graph=model.exported).outputs
            for i, (g, e) in enumerate(zip(got, exact, strict=True)):
                if g.is_floating_point() and g.numel():
                    d = (g.double() - e.double()).abs().nan_to_num(0, 0, 0)
                    noise[i] = max(noise[i], float(d.max()))
    return noise
