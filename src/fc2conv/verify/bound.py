"""What floating-point rounding can explain: a forward-error bound for a whole model.

Method ("higham-magnitude"). Let ``M`` be the output of the *magnitude twin* of the reference
model (float64, every weight replaced by ``|W|``, every input by ``|x|``; see
:mod:`fc2conv.verify.models`). For a network of affine layers and 1-Lipschitz pointwise ops with
``f(0) = 0`` (ReLU, tanh, max/avg pooling, residual adds, eval-mode batch norm), Higham's bound
per layer (``core.rounding.affine_bound``: ``|W|e + γ_{n+1}(|W||x̂| + |b|)``) propagates by
induction to

    |ŷ - y| <= ((1 + δ)^(L+1) - 1) · M,    δ = γ_{n+1}(u_acc) + 2 u_op + u_out

where ``L`` counts the reducing ops run (matmuls, convs, reductions — a safe over-count of the
depth), ``n`` is the longest reduction, ``u_acc`` the unit roundoff of accumulation, ``u_op`` of
the operands (inputs and weights rounded to the model's dtype, or to TF32), ``u_out`` of the
stored result. The extra ``+1`` stage covers rounding the inputs into the model's dtype.
Half-precision types (float16, bfloat16) are modelled as PyTorch runs them on CPU and by default
in cuBLAS/cuDNN: operands in half precision, accumulation in float32.

The bound is worst case: correct implementations land far inside it (typically ~sqrt(n) u M),
while real bugs (a wrong weight, a permuted input) exceed it by orders of magnitude. This
closed form is the fallback of ``compare``: PyTorch models are bounded op by op by
:mod:`fc2conv.verify.running` (much tighter: each layer's rounding is charged against its actual
input, not against products of ``|W|``), and this one serves ONNX models and graphs with ops the
running bound has no rule for. When the model contains ops the magnitude twin does not bound
either (LayerNorm, softmax, subtraction of activations), model ``a``'s own float error against
its float64 reference can exceed it; ``compare`` then scales the bounds by
``EMPIRICAL_FACTOR`` times that excess and reports the method as *empirical*.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fc2conv.core.rounding import gamma, unit_roundoff

EMPIRICAL_FACTOR = 8.0

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
            _aten.matmul.default, _aten.linear.default, _aten.dot.default, _aten.mv.default}
_VARIANCES = (_aten.var_mean, _aten.var, _aten.std, _aten.std_mean)
_CONVS = {_aten.convolution.default, _aten.conv1d.default, _aten.conv2d.default,
          _aten.conv3d.default, _aten._convolution.default}


@dataclass
class OpStats:
    """What a run computed: reducing ops and the longest reduction length."""

    reductions: int = 0
    longest: int = 1
    convs: int = 0
    matmuls: int = 0


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.stats = OpStats()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        s = self.stats
        packet = getattr(func, "overloadpacket", None)
        if func in _MATMULS:
            a = args[1] if func in (_aten.addmm.default, _aten.baddbmm.default) else args[0]
            s.matmuls += 1
            s.reductions += 1
            s.longest = max(s.longest, int(a.shape[-1]))
        elif func in _CONVS:
            w = args[1]
            s.convs += 1
            s.reductions += 1
            s.longest = max(s.longest, int(w[0].numel()))
        elif packet in _VARIANCES:
            # var_mean(x, dims): ChannelLayerNorm's reduction over the channel axis outside
            # eager (exported, compiled, ONNX-traced graphs); one output element sums
            # numel(x) / numel(var) terms, whichever axes are reduced
            out = func(*args, **kwargs)
            first = out[0] if isinstance(out, tuple | list) else out
            s.reductions += 1
            s.longest = max(s.longest, args[0].numel() // max(1, first.numel()))
            return out
        elif packet in (_aten.sum, _aten.mean, _aten.avg_pool2d, _aten.avg_pool1d,
                        _aten._adaptive_avg_pool2d, _aten.native_layer_norm, _aten._softmax,
                        _aten.native_batch_norm, _aten._native_batch_norm_legit_no_training):
            s.reductions += 1
            x = args[0]
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                s.longest = max(s.longest, int(x.shape[-1]) * (
                    int(x.shape[-2]) if x.dim() > 2 and "pool" in str(packet) else 1))
        return func(*args, **kwargs)


def count_ops(run: Callable[[], Any]) -> tuple[Any, OpStats]:
    """Call ``run()`` while counting the reducing aten ops it dispatches (matmuls, convs, sums
    and means, variances, pools, norms, softmax)."""
    counter = _OpCounter()
    with counter:
        result = run()
    return result, counter.stats


@dataclass(frozen=True)
class Rounding:
    """The unit roundoffs a model computes with."""

    dtype: torch.dtype
    u_op: float
    u_acc: float
    u_out: float
    tf32: bool = False

    @property
    def label(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        if self.tf32:
            return f"{name} with TF32 matmuls/convs (u = 2^-11)"
        if not self.dtype.is_floating_point:
            return f"{name} (exact)"
        return f"{name} (u = 2^{round(torch.log2(torch.tensor(self.u_out)).item())})"


def tf32_in_play(device_type: str, dtype: torch.dtype, *, cudnn_allow_tf32: bool,
                 matmul_allow_tf32: bool, has_conv: bool, has_matmul: bool) -> bool:
    """Whether float32 convs/matmuls of a model run in TensorFloat-32.

    Only on CUDA, only for float32, and only for the op families whose flag is on:
    ``torch.backends.cudnn.allow_tf32`` (convs; PyTorch's default is True) and
    ``torch.backends.cuda.matmul.allow_tf32`` (matmuls; default False).
    """
    if device_type != "cuda" or dtype != torch.float32:
        return False
    return (cudnn_allow_tf32 and has_conv) or (matmul_allow_tf32 and has_matmul)


def current_tf32_flags() -> dict[str, bool]:
    """The process's TF32 switches (read, never changed)."""
    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def rounding_for(dtype: torch.dtype, *, tf32: bool = False) -> Rounding:
    """Unit roundoffs for a model computing in ``dtype`` (TF32 operands when ``tf32``)."""
    if not dtype.is_floating_point:
        return Rounding(dtype, 0.0, 0.0, 0.0)
    u = unit_roundoff(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return Rounding(dtype, u_op=u, u_acc=unit_roundoff(torch.float32), u_out=u)
    if tf32 and dtype == torch.float32:
        return Rounding(dtype, u_op=unit_roundoff("tf32"), u_acc=u, u_out=u, tf32=True)
    return Rounding(dtype, u_op=u, u_acc=u, u_out=u)


def coefficient(r: Rounding, stats: OpStats) -> float:
    """``(1 + δ)^(L+1) - 1`` with ``δ = γ_{n+1}(u_acc) + 2 u_op + u_out``: the bound is this
    times the magnitude ``M``."""
    if r.u_out == 0.0:
        return 0.0
    delta = gamma(stats.longest + 1, r.u_acc) + 2 * r.u_op + r.u_out
    return float((1.0 + delta) ** (stats.reductions + 1) - 1.0)


def elementwise_bound(magnitude: torch.Tensor, coef: float, r: Rounding,
                      stats: OpStats) -> torch.Tensor:
    """``coef · M`` plus an absolute floor for subnormal results (float64)."""
    if not r.dtype.is_floating_point:
        return torch.zeros_like(magnitude, dtype=torch.float64)
    info = torch.finfo(r.dtype)
    floor = (stats.reductions + 1) * (stats.longest + 2) * info.tiny * info.eps
    return coef * magnitude.double().abs() + floor


def describe_method(method: str, stats: OpStats, rounds: list[Rounding],
                    scale: float = 1.0) -> str:
    """One line saying which bound judged the models."""
    kinds = "; ".join(dict.fromkeys(r.label for r in rounds))
    if method == "running":
        text = (f"running Higham forward-error bound, op by op through the float64 run "
                f"(|fl(w.x) - w.x| <= γ_n |w|.|x| plus propagated errors), "
                f"{stats.reductions} reducing ops, longest reduction n = {stats.longest}, {kinds}")
    else:
        text = (f"Higham forward-error bound through |W||x| magnitudes: ((1+δ)^(L+1) - 1)·M, "
                f"L = {stats.reductions} reducing ops, longest reduction n = {stats.longest}, "
                f"{kinds}")
    if method == "empirical" or scale != 1.0:
        text = (f"empirical: {scale:.3g} x the Higham bound ({EMPIRICAL_FACTOR:g} x the largest "
                f"ratio of model A's own float error to it); " + text)
    return text


B_ERROR_RATIO = 10.0
"""B's error against the float64 reference may be at most this many times A's (same precision).

The *miss* definition of the zoo sweep (``bench/verdicts.py``): a planted bug must be caught
whenever B's largest error against A's float64 reference exceeds ``B_ERROR_RATIO`` times the
rounding error of a correct implementation: the larger of A's largest error and that of the
conversion without the bug (both over one output of one draw, floored at one unit roundoff of
the output's scale). A alone is one sample, and a lucky one can sit at the floor: on the
foreign ``hand_gemm_alpha_beta`` (two Gemms of 10 and 20 terms), draw 7, A errs 1.04 u x scale,
its clean conversion 1.93, and 400 random float32 summation orders 2.4 (median) to 6.05; a +1e-3
weight bug errs 11.2 ("10.8x A's") with ``|A - B|`` 10.3 against up to 6.9 for ``|A - order|``.
No rule that keeps every correct order "equivalent" separates that draw with a margin, so it is
not counted as significant; the rule above (``judge_relative``) still uses A's error alone, as
a necessary condition only."""
