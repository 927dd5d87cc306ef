"""Running forward-error bounds: Higham's analysis carried op by op through a float64 run.

While model ``a``'s float64 twin runs, a ``TorchDispatchMode`` keeps beside every tensor ``x``
an elementwise bound ``E_x`` on how far the same computation in the model's precision can be
from it (``|x̂ - x| <= E_x``). Rules, with ``u`` the unit roundoff of the stored result,
``u_acc`` of accumulation and ``n`` the reduction length:

- leaves (inputs, weights): ``E = u |x|`` (rounding into the model's dtype);
- matmul / conv ``y = A B (+ c)``: ``E = |A| E_B + E_A |B| + E_A E_B + E_c
  + (γ_{n+1}(u_acc) + 2 u_tf32)(|A| + E_A)(|B| + E_B) (+ |c|) [+ u |y|]`` — Higham's
  ``|fl(a·b) - a·b| <= γ_n |a|·|b|`` plus the propagated input errors; the last term is the
  final rounding when accumulation is wider than storage (half precision), ``u_tf32`` the
  operand rounding of TensorFloat-32;
- sums, means, average pools: the same with ``|A| = 1``;
- layout ops (view, permute, cat, slice, pad, max-pool...): the same op applied to ``E``;
- pointwise ops with Lipschitz constant ``k`` (ReLU 1 exact, tanh 1, sigmoid 1/4, GELU 1.13):
  ``E = k E_in + u |y|``; ``a ± b``: ``E_a + E_b + u |y|``; ``a * b``: ``|a|E_b + |b|E_a +
  E_a E_b + u |y|``; eval-mode batch norm as the affine map it is.

Unlike the magnitude twin (which multiplies ``|W|`` through all layers), every layer's new
rounding is charged against its *actual* input, so the bound does not blow up with depth.
Ops without a rule (softmax, layer norm, training-mode batch norm...) make the bound unknown
(``unsupported``); ``compare`` then falls back to the magnitude twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from fc2conv.core.rounding import gamma
from fc2conv.verify.bound import OpStats, Rounding

_LAYOUT = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze",
    "unsqueeze", "flatten", "select", "slice", "cat", "stack", "clone", "contiguous", "alias",
    "detach", "lift_fresh", "index_select", "gather", "repeat", "constant_pad_nd", "unbind",
    "split", "split_with_sizes", "chunk", "narrow", "unfold", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool2d", "adaptive_max_pool1d", "movedim",
    "_to_copy", "to", "zeros_like", "flip", "roll", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "upsample_nearest2d", "upsample_nearest1d", "max", "amax",
}
_MOVES = {  # layout ops that only move or copy values (no max, no resampling)
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze",
    "unsqueeze", "flatten", "select", "slice", "clone", "contiguous", "alias", "detach",
    "lift_fresh", "_to_copy", "to", "movedim", "narrow",
}
_EXACT_POINTWISE = {"relu", "neg", "abs", "hardtanh", "clamp", "threshold", "relu6"}
_LIPSCHITZ = {"tanh": 1.0, "sigmoid": 0.25, "gelu": 1.13, "silu": 1.1, "mish": 1.1,
              "hardswish": 1.5, "hardsigmoid": 1 / 6, "elu": 1.0, "celu": 1.0, "softplus": 1.0,
              "selu": 1.0507 * 1.6733, "sin": 1.0, "cos": 1.0, "softsign": 1.0,
              "erf": 2 / math.sqrt(math.pi), "leaky_relu": 1.0}
_ADD = {"add", "sub", "rsub"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "dot", "mv"}
_MATMUL_FN: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mm": torch.mm, "addmm": torch.mm, "bmm": torch.bmm, "baddbmm": torch.bmm, "dot": torch.dot,
    "mv": torch.mv,
}
_REDUCE = {"sum", "mean", "avg_pool2d", "avg_pool1d", "avg_pool3d", "_adaptive_avg_pool2d",
           "_adaptive_avg_pool3d", "adaptive_avg_pool1d"}
_IGNORED = {"empty", "zeros", "ones", "full", "arange", "scalar_tensor", "_local_scalar_dense",
            "sym_size", "sym_stride", "is_same_size", "new_empty", "new_zeros", "empty_like",
            "argmax", "argmin", "eq", "ne", "lt", "gt", "le", "ge", "isnan", "isinf",
            "copy_", "fill_", "zero_", "sort", "topk", "nonzero"}


class Tracker(TorchDispatchMode):
    """Carries ``E_x`` beside every float tensor of a float64 run (see module docstring)."""

    def __init__(self, rounding: Rounding) -> None:
        super().__init__()
        self.rounding = rounding
        self.stats = OpStats()
        self.unsupported: set[str] = set()
        self._err: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._leaf: dict[int, torch.Tensor] = {}  # the leaf errors, u |t| (see _leaf_u)

    # -- bookkeeping -------------------------------------------------------------------------
    def error_of(self, t: torch.Tensor) -> torch.Tensor:
        entry = self._err.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        if not t.is_floating_point():
            return torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        with torch.utils._python_dispatch._disable_current_modes():
            e = (self.rounding.u_out * t.detach().abs()).to(torch.float64)
        self._err[id(t)] = (t, e)
        self._leaf[id(t)] = e
        return e

    def _leaf_u(self, t: torch.Tensor, e: torch.Tensor) -> float | None:
        """``u`` when ``e`` is the leaf error ``u |t|`` of ``t`` (a weight or an input), else
        None."""
        return self.rounding.u_out if self._leaf.get(id(t)) is e else None

    def _set(self, t: Any, e: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            self._err[id(t)] = (t, e.to(torch.float64).reshape(t.shape))
            self._leaf.pop(id(t), None)

    # -- dispatch -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inplace = name.endswith("_") and not name.startswith("_")
        base = name[:-1] if inplace else name
        pre = None
        if inplace and base == "mul":
            pre = args[0].detach().clone()
        out = (conv3d_by_depth(*args) if base == "convolution" and _by_depth_pays(args)
               else func(*args, **kwargs))
        with torch.utils._python_dispatch._disable_current_modes():
            try:
                self._rule(base, func, args, kwargs, out, pre)
            except Exception:  # a rule that cannot apply: the bound is unknown, not wrong
                self.unsupported.add(name)
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        self._set(t, torch.full(t.shape, math.inf, dtype=torch.float64))
        return out

    def _E(self, x: Any) -> Any:
        return self.error_of(x) if isinstance(x, torch.Tensor) else x

    def _rule(self, name: str, func: Any, args: Any, kwargs: Any, out: Any,
              pre: torch.Tensor | None) -> None:
        r = self.rounding
        outs = _tensors(out)
        if not any(t.is_floating_point() for t in outs) or name in _IGNORED:
            return
        y = outs[0]
        u = r.u_out
        if name in _LAYOUT:
            e_args = tree_map(lambda a: self.error_of(a) if isinstance(a, torch.Tensor) and
                              a.is_floating_point() else a, args)
            e_kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "memory_format")}
            e_out = func(*e_args, **e_kwargs)
            e_flat = _tensors(e_out)
            # moving values moves their leaf errors u|t| along: still u|y| (kept as such)
            leaf = name in _MOVES and all(
                self._leaf.get(id(a)) is self._err.get(id(a), (None, None))[1]
                for a in _tensors(args) if a.is_floating_point())
            for t, e in zip(outs, e_flat, strict=False):
                if t.is_floating_point():
                    # errors are >= 0, and so is any layout of them (no copy: views stay
                    # views), except a pad's fill value
                    self._set(t, (e.abs() if name == "constant_pad_nd" else e)
                              if e.is_floating_point() else torch.zeros(t.shape))
                    if leaf and e.is_floating_point():
                        self._leaf[id(t)] = self._err[id(t)][1]
            return
        if name in _EXACT_POINTWISE:
            self._set(y, self.error_of(args[0]))
            return
        if name in ("maximum", "minimum"):
            self._set(y, torch.maximum(self._E(args[0]), self._E(args[1])))
            return
        if name in _LIPSCHITZ:
            self._set(y, _LIPSCHITZ[name] * self.error_of(args[0]) + 2 * u * y.abs())
            return
        if name in _ADD:
            alpha = abs(float(kwargs.get("alpha", args[2] if len(args) > 2 else 1)))
            ea, eb = self._E(args[0]), self._E(args[1])
            eb = eb * alpha if isinstance(eb, torch.Tensor) else 0.0
            ea = ea if isinstance(ea, torch.Tensor) else 0.0
            self._set(y, ea + eb + u * (y.abs() + ea + eb))
            return
        if name == "mul":
            a = pre if pre is not None else args[0]
            b = args[1]
            ea, eb = self._E(a), self._E(b)
            if isinstance(b, torch.Tensor):
                e = a.abs() * eb + b.abs() * ea + ea * eb
            else:
                e = ea * abs(float(b))
            self._set(y, e + u * (y.abs() + e))
            return
        if name == "div" and not isinstance(args[1], torch.Tensor):
            self._set(y, self._E(args[0]) / abs(float(args[1])) + u * y.abs())
            return
        if name in _MATMUL or name == "convolution":
            self._affine(name, func, args, kwargs, y)
            return
        if name in _REDUCE:
            x = args[0]
            n = max(1, x.numel() // max(1, y.numel()))
            if name.startswith("avg_pool"):
                n = max(n, math.prod(args[1]))
            ex = self.error_of(x)
            e_prop = func(ex, *args[1:], **kwargs)
            e_mag = func(x.abs() + ex, *args[1:], **kwargs)
            self.stats.reductions += 1
            self.stats.longest = max(self.stats.longest, n)
            self._set(y, e_prop + gamma(n + 1, r.u_acc) * e_mag + u * y.abs())
            return
        eval_bn = name == "_native_batch_norm_legit_no_training" or (
            name in ("native_batch_norm", "_native_batch_norm_legit") and len(args) > 5
            and args[5] is False and args[3] is not None)
        if eval_bn:  # (x, w, b, running_mean, running_var, [training,] momentum, eps)
            x, w, b, mean, var, eps = args[0], args[1], args[2], args[3], args[4], args[-1]
            shape = [1, -1] + [1] * (x.dim() - 2)
            s = (var + eps).rsqrt().reshape(shape)
            ws = (w.reshape(shape) if w is not None else 1.0) * s
            bb = b.reshape(shape).abs() if b is not None else 0.0
            mag = (x.abs() + mean.reshape(shape).abs()) * ws.abs() + bb
            self._set(y, self.error_of(x) * ws.abs() + 6 * u * mag)
            return
        self.unsupported.add(name)
        for t in outs:
            if t.is_floating_point():
                self._set(t, torch.full(t.shape, math.inf, dtype=torch.float64))

    def _affine(self, name: str, func: Any, args: Any, kwargs: Any, y: torch.Tensor) -> None:
        r = self.rounding
        u_op = (2 * r.u_op) if r.tf32 else 0.0
        if name == "convolution":
            x, w, bias = args[0], args[1], args[2]
            n = int(w[0].numel())
            rest = tuple(args[3:])

            def conv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
                return func(p, q, None, *rest)  # type: ignore[no-any-return]

            op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = conv
            self.stats.convs += 1
        else:
            if name in ("addmm", "baddbmm"):
                bias, x, w = args[0], args[1], args[2]
            else:
                bias, x, w = None, args[0], args[1]
            n = int(x.shape[-1])
            op = _MATMUL_FN[name]
            self.stats.matmuls += 1
        self.stats.reductions += 1
        self.stats.longest = max(self.stats.longest, n)
        ex, ew = self.error_of(x), self.error_of(w)
        xa, wa = x.abs(), w.abs()
        # (|x|+E_x)(|W|+E_W) - |x||W| = |x|E_W + E_x(|W|+E_W) (bilinear), each product of
        # non-negative terms, computed as such (no difference of two large sums); a weight
        # that is a leaf has E_W = u|W| exactly, so |x|E_W = u |x||W| and E_x(|W|+E_W) =
        # (1+u) E_x|W|: two products
        u_w = self._leaf_u(w, ew)
        p = upper_product(op, xa, wa, n)
        if u_w is not None:
            e = u_w * p + (1 + u_w) * upper_product(op, ex, wa, n)
        else:
            e = upper_product(op, xa, ew, n) + upper_product(op, ex, wa + ew, n)
        mag = p + e
        k = n
        if bias is not None:
            k += 1
            eb = self.error_of(bias)
            shape = [1, -1] + [1] * (y.dim() - 2) if name == "convolution" else None
            babs = bias.abs() + eb
            if shape is not None:
                babs, eb = babs.reshape(shape), eb.reshape(shape)
            mag = mag + babs
            e = e + eb
        e = e + (gamma(k, r.u_acc) + u_op) * mag
        if r.u_acc < r.u_out:  # accumulated wider than stored: one final rounding
            e = e + r.u_out * (y.abs() + e)
        self._set(y, e)


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors in ``x`` (a tensor, or a pytree of them), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple | list) and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


_U32 = 2.0**-24


def _fast_float32() -> bool:
    """Float32 products on this CPU are IEEE float32 (no TF32 or bfloat16 stand-ins)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mk = torch.backends.mkldnn
    return all(getattr(getattr(mk, k, None), "fp32_precision", "none") in ("none", "ieee")
               for k in ("matmul", "conv"))


def upper_product(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], p: torch.Tensor,
                  q: torch.Tensor, n: int) -> torch.Tensor:
    """An upper bound, in float64, on the exact ``op(p, q)`` for non-negative float64 ``p``,
    ``q`` and a bilinear ``op`` summing ``n`` products per output element (matmul,
    convolution).

    On CPU ``op`` runs in float32 (a float64 convolution is ~15x slower than a float32 one) on
    ``p / 2^a`` and ``q / 2^b``, powers of two that bring each operand's largest element into
    ``[1/2, 1)`` (exact scalings: no overflow, and only elements below ``2^-126`` of the
    largest reach float32's subnormals). Rounding an operand ``t <= 1`` to float32 gives
    ``t̂ >= t(1-u) - 2^-150`` (``u = 2^-24``), and a float32 sum of ``n`` non-negative products
    is at least ``(1-γ_n)`` times their exact sum in any order (Higham, Lemma 3.4 with all
    terms >= 0), so ``exact <= 2^(a+b) (fl(...) / ((1-u)^2 (1-γ_n)) + n 2^-146)``, which is
    returned. On other devices, or for non-finite operands, ``op`` runs in float64 (the
    bounds' own float64 rounding, a relative ``γ_n(2^-53)``, is far below the ``u`` they
    carry)."""
    nu = gamma(n, _U32)
    if p.device.type == "cpu" and nu < 0.5 and p.numel() and q.numel() and _fast_float32():
        top_p, top_q = float(p.amax()), float(q.amax())
        if math.isfinite(top_p) and math.isfinite(top_q) and top_p > 0 and top_q > 0:
            a, b = math.frexp(top_p)[1], math.frexp(top_q)[1]
            got = op((p * 2.0**-a).to(torch.float32), (q * 2.0**-b).to(torch.float32))
            scale = math.ldexp(1.0, a + b)
            return (got.to(torch.float64) / ((1 - _U32) ** 2 * (1 - nu))
                    + n * 2.0**-146) * scale
    return op(p, q)


def _by_depth_pays(args: Any) -> bool:
    """A float64 3-D convolution on CPU with at least 16^3 outputs per sample and channel,
    where torch's own float64 kernel (``slow_conv3d``, one volume-to-columns copy of ``C k^3``
    times the output) is 2-4x slower than :func:`conv3d_by_depth`."""
    x, w = args[0], args[1]
    if len(args) < 9 or args[6] or x.dim() != 5 or x.dtype != torch.float64 \
            or x.device.type != "cpu" or w.dim() != 5:
        return False
    d, h, wd = x.shape[2:]
    sd, sh, sw = (int(v) for v in args[3])
    return d * h * wd // max(1, sd * sh * sw) >= 4096 and w.shape[3] * w.shape[4] > 1


def conv3d_by_depth(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                    stride: Any, padding: Any, dilation: Any, transposed: bool = False,
                    output_padding: Any = None, groups: int = 1) -> torch.Tensor:
    """``aten.convolution`` for a 3-D ``x`` (N, C, D, H, W), not transposed, as a sum over the
    kernel's depth of 2-D convolutions, the depth folded into the batch:

        y[n, :, i] = b + sum_kd conv2d(x_pad[n, :, s_d i + d_d kd], W[:, :, kd])

    the same float64 sums as torch's 3-D kernel in another order (a float64 reference of a
    float32 model does not depend on it), without its ``C k^3``-fold volume-to-columns copy."""
    del transposed, output_padding
    n, c, depth = x.shape[:3]
    kd = w.shape[2]
    sd, pd, dd = int(stride[0]), int(padding[0]), int(dilation[0])
    xp = F.pad(x, (0, 0, 0, 0, pd, pd)) if pd else x
    out_d = (depth + 2 * pd - dd * (kd - 1) - 1) // sd + 1
    y: torch.Tensor | None = None
    for k in range(kd):
        sl = xp[:, :, k * dd: k * dd + sd * (out_d - 1) + 1: sd]
        sl = sl.transpose(1, 2).reshape(n * out_d, c, *x.shape[3:])
        part = F.conv2d(sl, w[:, :, k], None, tuple(stride[1:]), tuple(padding[1:]),
                        tuple(dilation[1:]), groups)
        y = part if y is None else y.add_(part)
    assert y is not None
    y = y.reshape(n, out_d, *y.shape[1:]).transpose(1, 2)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1, 1)
    return y.contiguous()


def track(run: Any, rounding: Rounding) -> tuple[Any, Tracker]:
    """Call ``run()`` (a float64 forward pass) under a :class:`Tracker`."""
    tracker = Tracker(rounding)
    with tracker:
        result = run()
    return result, tracker
