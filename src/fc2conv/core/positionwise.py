"""What an op does to the channel axis, and what it becomes in the conv layout ``(B, C, 1, S)``.

One table, read by both front ends (the PyTorch layout pass and the ONNX layout rules), so
"per-position" means the same thing everywhere. An activation of the Linear layout
``x[b, s, c]`` moves to ``y[b, c, 0, s] = x[b, s, c]``; an op may stay in the conv layout when
it commutes with that move:

* ``ELEMENTWISE``: ``f(x)[i] = f(x[i])`` (and ``x op y`` for operands of one shape, or
  broadcast along the channel axis of a per-position value ``(B, S, 1) -> (B, 1, 1, S)``):
  the same op, unchanged.
* ``CHANNEL_REDUCE``: a reduction over the last axis with ``keepdim`` (``mean(x, -1)``, the
  ``x.pow(2).mean(-1)`` of an RMSNorm): the same reduction over axis 1.
* ``CHANNEL_NORM``: ``LayerNorm(C)`` over the last axis: :class:`ChannelLayerNorm`, the same
  normalization over axis 1 (``y = (x - mean_c x) / sqrt(var_c x + eps) * w + b``).
* ``CHANNEL_MIX``: ``x @ W.T + b`` at every position: a 1x1 convolution,
  ``K[o, c, 0, 0] = W[o, c]``.
* ``ATTENTION``: scaled dot-product attention over heads split along ``C``: per head ``h``
  with channels ``hD..hD+D-1``, ``scores[b, h, q, k] = scale * sum_d Q[b, hD+d, 0, q]
  K[b, hD+d, 0, k]`` and ``out[b, hD+d, 0, q] = sum_k softmax_k(scores + mask)[b, h, q, k]
  V[b, hD+d, 0, k]`` -- an einsum over the channel slice of the head, no activation transpose.

Anything not in the table reads the Linear layout, so the value moves back before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Channel(Enum):
    """How an op acts on the channel axis of a ``(B, S, C)`` activation."""

    ELEMENTWISE = "elementwise"
    CHANNEL_REDUCE = "reduce over channels"
    CHANNEL_NORM = "normalize over channels"
    CHANNEL_MIX = "mix channels per position"
    ATTENTION = "attention over positions, heads split along channels"


@dataclass(frozen=True)
class PerPosition:
    """One table row: how the op acts on channels, and what it is in ``(B, C, 1, S)``."""

    action: Channel
    in_conv_layout: str
    onnx: tuple[str, ...] = ()  # the ONNX op types of this kind


_SAME = "the same op"
_E = Channel.ELEMENTWISE

OPS: dict[str, PerPosition] = {
    # unary elementwise
    **{name: PerPosition(_E, _SAME, onnx) for name, onnx in {
        "relu": ("Relu",), "relu6": (), "gelu": ("Gelu",), "silu": (), "sigmoid": ("Sigmoid",),
        "tanh": ("Tanh",), "erf": ("Erf",), "leaky_relu": ("LeakyRelu",), "elu": ("Elu",),
        "selu": ("Selu",), "celu": ("Celu",), "hardsigmoid": ("HardSigmoid",),
        "hardswish": ("HardSwish",), "hardtanh": (), "softplus": ("Softplus",),
        "softsign": ("Softsign",), "mish": ("Mish",), "identity": ("Identity",),
        "dropout": (), "clone": (), "contiguous": (), "alias": (), "abs": ("Abs",),
        "neg": ("Neg",), "exp": ("Exp",), "sqrt": ("Sqrt",), "rsqrt": (),
        "reciprocal": ("Reciprocal",),
        "pow": ("Pow",), "to": ("Cast",), "_to_copy": (), "type_as": (), "float": (),
        "thresholded_relu": ("ThresholdedRelu",), "cos": ("Cos",), "sin": ("Sin",),
    }.items()},
    # binary elementwise (broadcasting only along the channel axis or over all positions)
    **{name: PerPosition(_E, _SAME, onnx) for name, onnx in {
        "add": ("Add",), "sub": ("Sub",), "mul": ("Mul",), "div": ("Div",),
        "truediv": (), "iadd": (),
    }.items()},
    "mean": PerPosition(Channel.CHANNEL_REDUCE, "mean over axis 1, keepdim", ("ReduceMean",)),
    "layer_norm": PerPosition(Channel.CHANNEL_NORM, "ChannelLayerNorm over axis 1",
                              ("LayerNormalization",)),
    "linear": PerPosition(Channel.CHANNEL_MIX, "1x1 Conv2d", ("Gemm", "MatMul")),
    "scaled_dot_product_attention": PerPosition(
        Channel.ATTENTION, "per-head einsum over channel slices, softmax over keys"),
}


def kind_of(name: str) -> PerPosition | None:
    """The table row of an op named ``name`` (``add``, ``aten.add.Tensor``, ``__add__``,
    ``add_``), or ``None`` when the op is not per-position."""
    base = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name.split(".")[0]
    base = base.strip("_") if base.startswith("__") else base
    base = base.removesuffix("_") if base not in OPS else base
    return OPS.get(base)


def onnx_types(action: Channel) -> frozenset[str]:
    """The ONNX op types the table gives ``action``."""
    return frozenset(t for row in OPS.values() if row.action is action for t in row.onnx)


def elementwise(name: str) -> bool:
    """Whether the op named ``name`` acts on each element alone (any layout computes it)."""
    row = kind_of(name)
    return row is not None and row.action is Channel.ELEMENTWISE
