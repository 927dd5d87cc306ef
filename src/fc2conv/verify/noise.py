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

The roundings of ops without weights (attention scores ``q kᵀ``, layer-norm statistics,
softmax, residual adds) are modelled too: while the perturbed twin runs, every aten op that
rounds has its result multiplied by ``1 + sqrt(n) u ξ`` (``n`` terms per output element).

Each op with its own ``n``: a weight, buffer or input is perturbed with the ``n`` of the ops that
read it (one recording pass over the float64 twin, :func:`read_lengths`): a conv weight with
``Cin/groups · prod(kernel) + 1``, a Linear's with ``in_features + 1``, BatchNorm's scale, shift
and running statistics and a tensor that is only added or multiplied with 1. A single
model-wide ``n`` (the longest reduction) made the noise of a deep BatchNorm'd CNN 20-60x A's
actual error. ONNX models are measured the same way, op by op
(:mod:`fc2conv.verify.onnx_noise`): softmax, LayerNorm/RMSNorm and attention graphs included.

Unlike the worst-case bound, this does not grow through ``|W|`` when weights cancel, so it
exposes a real difference hiding under that bound: ``compare`` calls two models different when
``max |A - B|`` exceeds :data:`NOISE_FACTOR` times the noise (and four units in the last place of
the output's scale). The factor is calibrated on the zoo sweep (:data:`NOISE_FACTOR`) and in the
tests: summation-order variants in float32, float16 and bfloat16 stay below it, a single weight
changed by 1e-3 does not.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from fc2conv.verify.capture import run_torch
from fc2conv.verify.onnx_noise import onnx_noise
from fc2conv.verify.spread import TRIALS, accumulate, maxima
from fc2conv.verify.torch_backend import cast_inputs

NOISE_FACTOR = 4.0
"""How many times the measured noise ``|A - B|`` may reach before rounding cannot explain it,
for PyTorch and ONNX models alike: both measure the noise op by op, each op with its own
reduction length (here :func:`read_lengths` and :class:`_ShakeOps`; for ONNX
:mod:`fc2conv.verify.onnx_noise`), so no op's noise is inflated by the model's longest
reduction and the measured level is already the typical error of naive (sequential)
summation, the least accurate order a correct B uses.

Calibration. Until stop 17 the PyTorch twin perturbed every weight, buffer and input with the
model's longest ``n`` and allowed 16x; on deep BatchNorm'd CNNs with tiny outputs that envelope
was 20-60x A's actual error, and the zoo sweep (``bench/verdicts.py``) missed +1e-3 weight bugs
erring 15-460x A's (monai_efficientnet3d 20 of 20 draws at 0.6-1.1x the noise, mobilenet_v2
2 of 20). With per-op ``n`` the same efficientnet3d draws measure 2.5-6.6x the noise, so the
factor had to come down with the envelope; 4 is the ONNX path's, which has 0 false alarms in
every clean ONNX row of the sweep, and the PyTorch envelope is never below the ONNX one for the
same op (it perturbs the inputs, biases and normalization parameters too, and shares one ``ξ``
per output row). Evidence at 4 (``bench/verdicts.py``, stop 18): 0 false alarms in 420 clean
PyTorch-path draws (every zoo model x to_conv / to_linear / order / export, 5 draws each); the
misses above are caught (mobilenet_v2 +1e-3 draws 0 and 7 at 24x and 47x the noise, densenet2d
row x1.01 draw 7 at 29x); efficientnet3d +1e-3 draws 0-3 measure 6.6, 4.6, 2.5 and 4.9x, so one
in four is still missed there: its envelope is still ~10x A's error (naive vs blocked sums).

The ONNX path keeps its example of why 4 is conservative: on the foreign
``hand_gemm_alpha_beta`` (two Gemms, 10 and 20 terms), draw 7, the measured level at the worst
element is ~19 units of roundoff of the output's scale, so the line sits at ~76, while 400
random float32 summation orders differ from A by at most 6.9. Where the noise is that loose the
worst-case bound is tight (11.4 there, shallow graphs), and a B beyond it and beyond 10x A's
error is "different"; the noise decides only within the bound, in deep graphs where the bound
is loose. A +1e-3 weight bug erring 11.2 units there (10.8x A's 1.04, A at its floor, its clean
conversion at 1.93) is within 2x of what correct orders do and is not called a miss
(:data:`fc2conv.verify.bound.B_ERROR_RATIO`)."""

# Op-level rounding of parameterless ops (attention scores, layer-norm statistics, softmax)
_EXACT = ("view", "reshape", "permute", "transpose", "t", "expand", "squeeze", "unsqueeze",
          "clone", "_to_copy", "copy", "cat", "stack", "slice", "select", "index", "relu",
          "max_pool", "detach", "alias", "contiguous", "split", "unbind", "flatten",
          "_unsafe_view", "as_strided", "zeros", "empty", "full", "ones", "arange", "lift_fresh",
          "max", "min", "amax", "amin", "argmax", "where", "masked_fill", "gather", "scatter",
          "pad", "constant_pad", "neg", "abs", "lt", "gt", "le", "ge", "eq", "ne", "clamp",
          "hardtanh", "threshold", "sym_size", "unfold", "roll", "flip", "repeat", "new_zeros",
          "new_empty", "zeros_like", "ones_like", "empty_like", "full_like", "bernoulli",
          "native_dropout", "dropout", "scalar_tensor", "_assert", "mask", "embedding")


def _reduction_length(name: str, args: tuple[Any, ...], out: Any) -> int | None:
    """Terms summed per output element of aten op ``name`` (1 for one rounding), or ``None`` for
    ops that compute exactly (views, copies, selections)."""
    base = name.split(".")[0].lstrip("_")
    if base.endswith("_") or any(base == e or base.startswith(e + "_") for e in _EXACT):
        return None
    if base in ("mm", "bmm", "matmul", "linear"):
        return int(args[0].shape[-1])
    if base in ("addmm", "baddbmm", "addbmm"):
        return int(args[1].shape[-1]) + 1
    if base.startswith("convolution") or base.startswith("conv"):
        w = args[1]
        return int(math.prod(w.shape[1:])) + 1
    if base.startswith("native_layer_norm") or base.startswith("layer_norm"):
        return int(math.prod(args[1]))
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    result = out[0] if isinstance(out, tuple | list) else out
    if (first is not None and isinstance(result, torch.Tensor)
            and 0 < result.numel() < first.numel()):
        return first.numel() // result.numel()
    if base.endswith("softmax") and first is not None:
        return int(first.shape[args[1]]) if len(args) > 1 else 1
    return 1


class _ShakeOps(TorchDispatchMode):
    """Multiplies the result of every rounding aten op by ``1 + sqrt(n) u ξ`` (``n`` terms per
    output element, ``ξ ~ N(0, 1)``): the roundings of ops without weights (attention scores,
    layer-norm statistics, softmax, residual adds) that perturbing the parameters misses."""

    def __init__(self, u: float, gen: torch.Generator) -> None:
        super().__init__()
        self.u, self.gen = u, gen

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        n = _reduction_length(str(func.__name__), tuple(args), out)
        if n is None:
            return out
        scale = math.sqrt(max(n, 1)) * self.u

        def shake(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
                return t
            xi = torch.randn(t.shape, generator=self.gen, dtype=t.dtype).to(t.device)
            return t * (1 + scale * xi)

        return tree_map(shake, out)


def _storage(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (shared by its views); 0 for a tensor without one."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse, nested, meta
        return 0


class _ReadLengths(TorchDispatchMode):
    """Records, for each stored tensor (parameter, buffer, input), the longest reduction of the
    rounding ops that read it: the ``n`` of its own backward error. Views and copies
    (:data:`_EXACT` ops) pass the tensors they hold on to their result, so a Linear's weight is
    credited to the ``addmm`` that reads it through ``t``; the results are kept alive while
    recording, so no later tensor reuses their storage."""

    def __init__(self, stored: list[torch.Tensor]) -> None:
        super().__init__()
        self.holds: dict[int, set[int]] = {}
        for k, t in enumerate(stored):
            self.holds.setdefault(_storage(t), set()).add(k)
        self.holds.pop(0, None)
        self.n: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        read: set[int] = set()
        for a in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(a, torch.Tensor):
                read |= self.holds.get(_storage(a), set())
        if not read:
            return out
        n = _reduction_length(str(func.__name__), tuple(args), out)
        if n is None:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor) and _storage(o):
                    self.holds.setdefault(_storage(o), set()).update(read)
                    self._alive.append(o)
        else:
            for k in read:
                self.n[k] = max(self.n.get(k, 1), n)
        return out


def read_lengths(module: nn.Module, feed: tuple[torch.Tensor, ...], *,
                 graph: bool) -> tuple[dict[int, int], list[int]]:
    """One run of ``module`` (a float64 twin) on ``feed``: per floating parameter/buffer
    (``id``) and per floating input (position), the longest reduction ``n`` of the ops that
    read it (1 where no rounding op reads it). A conv weight gets ``Cin/groups·prod(kernel)+1``,
    a Linear's ``in_features+1``, BatchNorm's statistics and scale, and a tensor only added or
    multiplied, 1."""
    stored = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    inputs = [k for k, t in enumerate(feed) if t.is_floating_point()]
    rec = _ReadLengths([*stored, *(feed[k] for k in inputs)])
    with rec:
        run_torch(module, feed, capture=False, graph=graph)
    by_id = {id(t): rec.n.get(k, 1) for k, t in enumerate(stored)}
    return by_id, [rec.n.get(len(stored) + j, 1) for j in range(len(inputs))]


def rounding_noise(model: Any, draws: list[tuple[torch.Tensor, ...]],
                   u: float) -> list[list[float]]:
    """Per draw, per output: the largest element of :func:`elementwise_noise`."""
    return maxima(elementwise_noise(model, draws, u))


def elementwise_noise(model: Any, draws: list[tuple[torch.Tensor, ...]], u: float, *,
                      exact: list[list[torch.Tensor]] | None = None,
                      only: set[int] | None = None) -> list[list[Any]]:
    """Per draw, per output, elementwise (a float64 tensor shaped like the output; ``0.0`` for an
    integer or empty output): max over :data:`TRIALS` perturbations of ``|ỹ - y|`` for the float64
    twin of ``model`` (a :class:`~fc2conv.verify.models.Model`, PyTorch or ONNX). PyTorch: every
    floating weight, buffer and input ``t`` is perturbed to ``t (1 + sqrt(n_t) u ξ)``, ``n_t`` the
    longest reduction of the ops that read it (:func:`read_lengths`), and every rounding op's
    result by its own ``n`` (:class:`_ShakeOps`). ``exact``: the float64 reference outputs per
    draw when the caller has them (else they are run here); ``only``: the draws to measure (the
    others get ``0.0``: measuring costs ``TRIALS`` float64 runs per draw)."""
    if model.kind == "onnx":
        return onnx_noise(model, draws, u, TRIALS, exact=exact, only=only)
    wanted = [k for k in range(len(draws)) if only is None or k in only]
    if "reference" not in model._twins:
        model.run(draws[0], "reference")  # builds the float64 twin (once per model)
    exact_runs = {k: list(exact[k]) if exact is not None
                  else model.run(draws[k], "reference").outputs for k in wanted}
    twin = model._twins["reference"]
    gen = torch.Generator().manual_seed(0)

    def shake(t: torch.Tensor, n: int) -> torch.Tensor:
        # independent per element (cancelling sums) plus one shared per output row (sums of
        # one sign, whose roundings accumulate coherently along the row)
        xi = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if t.dim() >= 1:
            xi = xi + torch.randn((t.shape[0],) + (1,) * (t.dim() - 1), generator=gen,
                                  dtype=t.dtype)
        return t * (1 + math.sqrt(max(n, 1)) * u * xi.to(t.device))

    n_out = len(next(iter(exact_runs.values()))) if exact_runs else 0
    noise: list[list[Any]] = [[0.0] * n_out for _ in draws]
    if not wanted:
        return noise
    feeds = {k: cast_inputs(draws[k], "reference", model.dtype, model.device) for k in wanted}
    stored_n, input_n = read_lengths(twin, feeds[wanted[0]], graph=model.exported)
    stored = [t for t in [*twin.parameters(), *twin.buffers()] if t.is_floating_point()]
    for _ in range(TRIALS):
        shaken = copy.deepcopy(twin)
        copies = [t for t in [*shaken.parameters(), *shaken.buffers()] if t.is_floating_point()]
        with torch.no_grad():
            for t, orig in zip(copies, stored, strict=True):
                t.copy_(shake(t, stored_n.get(id(orig), 1)))
        for k in wanted:
            floats = iter(input_n)
            feed = tuple(shake(t, next(floats, 1)) if t.is_floating_point() else t
                         for t in feeds[k])
            with _ShakeOps(u, gen):
                got = run_torch(shaken, feed, capture=False, graph=model.exported).outputs
            accumulate(noise[k], got, exact_runs[k])
    return noise
