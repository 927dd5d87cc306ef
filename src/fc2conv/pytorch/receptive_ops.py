"""Graph nodes that move, pad or re-window a feature map, as the receptive-field walk sees them.

:mod:`fc2conv.pytorch.ops` recognizes convolutions and pools with stored weights; the walk in
:mod:`fc2conv.pytorch.receptive_field` also has to read

* explicit padding (``nn.ZeroPad2d``, ``nn.ConstantPad*d``, reflection/replication pads,
  ``F.pad``, ``aten.pad`` / ``aten.constant_pad_nd``): a list ``(low_last, high_last,
  low_prev, high_prev, ...)`` from the last axis backwards, negative entries crop;
* convolutions whose weight is computed in ``forward`` (weight standardization as in BiT:
  ``F.conv2d(x, standardize(self.weight))``): the window is the weight's shape;
* transposed convolutions (``nn.ConvTranspose*d``, ``F.conv_transpose*d``, aten forms);
* layout moves (``permute``, ``transpose``) and ops over the last axes (``layer_norm``,
  reductions over channels), which are per position once the walk knows where the channels are.

Each recognizer returns ``None`` for a node it does not describe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fc2conv.pytorch.ops import WindowOp, _conv_padding, _tuple, module_of, tensor_shape, user_name

aten = torch.ops.aten


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _fname(node: fx.Node) -> str:
    """``permute`` for ``aten.permute.default``, ``x.permute`` and ``torch.permute`` alike."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


@dataclass(frozen=True)
class PadOp:
    """Explicit padding: ``pads`` in ``F.pad`` order (last axis first, low then high)."""

    input: fx.Node
    pads: tuple[int, ...]
    mode: str
    name: str

    def low_high(self, rank: int) -> dict[int, tuple[int, int]]:
        """``{tensor axis: (low, high)}`` for the padded axes of a rank-``rank`` tensor."""
        return {rank - 1 - i: (self.pads[2 * i], self.pads[2 * i + 1])
                for i in range(len(self.pads) // 2)}


_PAD_MODULES: tuple[type, ...] = tuple(
    c for c in (getattr(nn.modules.padding, n, None) for n in (
        "_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd"))
    if c is not None)
_PAD_FUNCS = {F.pad: None, torch.constant_pad_nd: "constant", aten.pad.default: None,
              aten.constant_pad_nd.default: "constant"}
for _mode, _fam in (("reflect", "reflection_pad"), ("replicate", "replication_pad")):
    for _n in (1, 2, 3):
        _op = getattr(aten, f"{_fam}{_n}d", None)
        if _op is not None:
            _PAD_FUNCS[_op.default] = _mode


def pad_of(gm: fx.GraphModule, node: fx.Node) -> PadOp | None:
    """Recognize explicit padding layers and functions."""
    mod = module_of(gm, node)
    if mod is not None:
        if not isinstance(mod, _PAD_MODULES) or not node.args:
            return None
        name = type(mod).__name__
        mode = ("reflect" if "Reflection" in name else "replicate" if "Replication" in name
                else "circular" if "Circular" in name else "constant")
        padding: Any = mod.padding
        return PadOp(node.args[0], tuple(int(p) for p in padding),  # type: ignore[arg-type]
                     mode, user_name(node))
    if node.op != "call_function" or node.target not in _PAD_FUNCS:
        return None
    pads = _arg(node, 1, "pad")
    if not isinstance(pads, (list, tuple)):
        return None
    pads = [_concrete(p) for p in pads]
    if not all(isinstance(p, int) for p in pads):
        return None
    mode = _PAD_FUNCS[node.target] or _arg(node, 2, "mode", "constant")
    return PadOp(_arg(node, 0, "input"), tuple(pads), str(mode), user_name(node))


#: ``node.meta`` key of the int a size computation took in the walk's run (see
#: :func:`fc2conv.pytorch.receptive_field._field`).
INT_VALUE = "fc2conv_int"


def _concrete(value: Any) -> Any:
    """An int, or the int a size computation (``x.shape`` arithmetic, ``sym_size`` in a
    torch.export graph: "same" padding computed from the input size) took on the run at the
    size asked for; anything else unchanged."""
    if isinstance(value, fx.Node):
        return value.meta.get(INT_VALUE, value)
    return value


_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, aten.conv1d.default: 1,
               aten.conv2d.default: 2, aten.conv3d.default: 3}


def computed_conv_of(node: fx.Node) -> WindowOp | None:
    """A functional convolution whose weight is not a stored tensor but computed in the graph
    (weight standardization): its window comes from the weight's recorded shape."""
    if node.op != "call_function" or node.target not in _CONV_FUNCS:
        return None
    shape = tensor_shape(_arg(node, 1, "weight"))
    if shape is None:
        return None
    n = _CONV_FUNCS[node.target]
    k = tuple(shape[2:])
    d = _tuple(_arg(node, 5, "dilation", 1), n, 1)
    return WindowOp(_arg(node, 0, "input"), "conv", k, _tuple(_arg(node, 3, "stride", 1), n, 1),
                    _conv_padding(_arg(node, 4, "padding", 0), k, d), d, False, user_name(node))


@dataclass(frozen=True)
class TransposedConv:
    """A transposed convolution: ``out[o] += in[i] w[k]`` for ``o = i s - p + k d``."""

    input: fx.Node
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    name: str


_TCONV_FUNCS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
                aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2,
                aten.conv_transpose3d.input: 3}


def transposed_conv_of(gm: fx.GraphModule, node: fx.Node) -> TransposedConv | None:
    """Recognize ``nn.ConvTranspose*d``, ``F.conv_transpose*d`` and
    ``aten.convolution(..., transposed=True)``."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        padding: Any = mod.padding
        return TransposedConv(node.args[0], tuple(mod.kernel_size), tuple(mod.stride),  # type: ignore[arg-type]
                              tuple(padding), tuple(mod.dilation), user_name(node))
    if node.op != "call_function":
        return None
    if node.target is aten.convolution.default and _arg(node, 6, "transposed", False):
        w = tensor_shape(_arg(node, 1, "weight"))
        if w is None:
            return None
        n = len(w) - 2
        return TransposedConv(node.args[0], tuple(w[2:]),  # type: ignore[arg-type]
                              _tuple(_arg(node, 3, "stride", 1), n, 1),
                              _tuple(_arg(node, 4, "padding", 0), n, 0),
                              _tuple(_arg(node, 5, "dilation", 1), n, 1), user_name(node))
    if node.target not in _TCONV_FUNCS:
        return None
    w = tensor_shape(_arg(node, 1, "weight"))
    if w is None:
        return None
    n = _TCONV_FUNCS[node.target]
    return TransposedConv(_arg(node, 0, "input"), tuple(w[2:]),
                          _tuple(_arg(node, 3, "stride", 1), n, 1),
                          _tuple(_arg(node, 4, "padding", 0), n, 0),
                          _tuple(_arg(node, 7, "dilation", 1), n, 1), user_name(node))


def permutation_of(node: fx.Node) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``(input, perm)`` for ``permute`` / ``transpose`` / ``swapaxes``: output axis ``j`` is
    input axis ``perm[j]``."""
    name = _fname(node)
    if name not in ("permute", "transpose", "swapaxes", "swapdims") or not node.args:
        return None
    src = node.args[0]
    shape = tensor_shape(src)
    if not isinstance(src, fx.Node) or shape is None:
        return None
    rank = len(shape)
    rest: Any = node.args[1:]
    if name == "permute":
        dims: Any = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or node.kwargs.get("dims", ())
        perm = tuple(int(d) % rank for d in dims)
    else:
        kw: Any = node.kwargs
        a, b = (int(rest[0]) % rank, int(rest[1]) % rank) if len(rest) >= 2 else (
            int(kw.get("dim0", 0)) % rank, int(kw.get("dim1", 1)) % rank)
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        perm = tuple(order)
    return (src, perm) if sorted(perm) == list(range(rank)) else None


_LN_FUNCS = {F.layer_norm, aten.layer_norm.default, aten.native_layer_norm.default}
_RMS = tuple(c for c in (getattr(nn, "RMSNorm", None),) if c is not None)


_GLOBAL_NORMS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def is_global_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """GroupNorm / InstanceNorm: statistics over all positions of the map."""
    if isinstance(module_of(gm, node), _GLOBAL_NORMS):
        return True
    return _fname(node) in ("group_norm", "native_group_norm", "instance_norm")


def last_axes_norm_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(input, L)`` for a LayerNorm/RMSNorm over the last ``L`` axes."""
    mod = module_of(gm, node)
    if isinstance(mod, (nn.LayerNorm, *_RMS)) and node.args:
        shape: Any = getattr(mod, "normalized_shape", ())
        return node.args[0], len(shape)  # type: ignore[return-value]
    if node.op == "call_function" and node.target in _LN_FUNCS:
        shape = _arg(node, 1, "normalized_shape")
        return _arg(node, 0, "input"), len(shape) if isinstance(shape, (list, tuple)) else 1
    return None


_REDUCTIONS = ("mean", "sum", "amax", "amin", "var", "std", "var_mean", "norm", "max", "min")


def reduction_of(node: fx.Node) -> tuple[fx.Node, tuple[int, ...] | None, bool] | None:
    """``(input, reduced axes or None for all, keepdim)`` for mean/sum/amax/var/std."""
    name = _fname(node)
    if name not in _REDUCTIONS or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    shape = tensor_shape(src)
    if shape is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if name in ("max", "min") and not isinstance(dim, int):
        return None  # max(a, b) is elementwise, not a reduction
    keep = bool(node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool)
                else node.kwargs.get("keepdim", False))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return src, None, keep
    dims: Any = (dim,) if isinstance(dim, int) else tuple(dim)  # type: ignore[arg-type]
    if not all(isinstance(d, int) for d in dims):
        return None
    return src, tuple(sorted(d % len(shape) for d in dims)), keep


def logits_node(value: Any) -> Any:
    """The logits in what the graph returns: the tensor itself, the one tensor of a
    one-element tuple, or a ModelOutput-like dict's ``logits`` (or its only tensor)."""
    while True:
        if isinstance(value, (tuple, list)) and len(value) == 1:
            value = value[0]
        elif isinstance(value, dict):
            nodes = [v for v in value.values() if isinstance(v, fx.Node)]
            if isinstance(value.get("logits"), fx.Node):
                value = value["logits"]
            elif len(nodes) == 1:
                value = nodes[0]
            else:
                return value
        else:
            return value
