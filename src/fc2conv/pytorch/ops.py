"""What a graph node computes, whatever form it was written in.

A node of a torch.fx graph can say "linear" as ``call_module`` of an ``nn.Linear``, as
``F.linear(x, self.w, self.b)``, or, in a graph from ``torch.export``, as
``aten.linear.default`` with ``get_attr`` weights. The passes ask this module, not the node:
``linear_of(gm, node)`` returns an ``nn.Linear`` view of the weights (sharing them) and the
user's name for the layer, or ``None``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fc2conv.errors import Fc2ConvError

aten = torch.ops.aten

# Elementwise ops that act the same in any layout when all tensor operands have the output's
# shape (no broadcasting): activations, dropout, arithmetic.
POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout, nn.AlphaDropout, nn.Identity,
    nn.PReLU,
)
_POINTWISE_FUNCTIONS: set[Any] = {
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.dropout, torch.relu, torch.sigmoid,
    torch.tanh, torch.exp, torch.neg, torch.add, torch.sub, torch.mul, torch.div, torch.dropout,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default,
    aten.tanh.default, aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default,
    aten.hardswish.default, aten.dropout.default, aten.add.Tensor, aten.sub.Tensor,
    aten.mul.Tensor, aten.div.Tensor, aten.relu_.default, aten.add_.Tensor, aten.clone.default,
    aten.neg.default, aten.exp.default, aten.alias.default, aten.hardtanh_.default,
    aten.silu_.default, aten.leaky_relu_.default, aten.hardswish_.default, aten.sigmoid_.default,
    aten.tanh_.default, aten.elu_.default, aten.mul_.Tensor, aten.hardsigmoid.default,
    aten.hardsigmoid_.default, aten.mish.default, aten.softplus.default,
}
_POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "add", "sub", "mul", "div", "neg", "exp", "clone", "contiguous",
    "__add__", "__mul__", "__sub__", "__truediv__", "relu_", "add_", "mul_",
}


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else ``None``."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def attr_of(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, else ``None``."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def user_name(node: fx.Node) -> str:
    """The user's name for what ``node`` computes: the module path for ``call_module``, the
    innermost module path torch.export recorded (``features.0``), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if isinstance(stack, dict) and stack:
        path = list(stack.values())[-1]
        if isinstance(path, tuple) and path and isinstance(path[0], str) and path[0]:
            return path[0]
    return node.name


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape recorded by ShapeProp (or torch.export) for a node's value, if a tensor."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        val = node.meta.get("val")
        shape = getattr(val, "shape", None) if isinstance(val, torch.Tensor) else None
    return tuple(int(s) for s in shape) if shape is not None else None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The operand nodes of ``node`` that carry tensors."""
    found: list[fx.Node] = []
    def keep(a: fx.Node) -> fx.Node:
        found.append(a)
        return a

    fx.node.map_arg((node.args, node.kwargs), keep)
    return [a for a in found if tensor_shape(a) is not None]


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def linear_in_out(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight + bias`` for a weight stored ``(in, out)`` (GPT-2's ``Conv1D``): the
    Linear of ``weight.T`` over the last axis of ``x``."""
    return F.linear(x, weight.t(), bias)


class TransposedLinear(nn.Module):
    """A Linear whose weight is stored ``(in, out)``, as GPT-2's ``Conv1D``:
    ``y = x @ weight + bias`` over the last axis of ``x``. ``to_linear`` gives one back for a
    conv that ``to_conv`` made from such a layer, so the result loads the original state dict."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_in_out(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight stored (in, out)")


@dataclass
class LinearOp:
    """A node computing ``x @ W.T + b``: its input node, a Linear sharing W and b, and the
    user's name of the layer (module path, or the weight's path without ``.weight``).
    ``transposed``: the stored weight is ``(in, out)`` (``linear.weight`` is its ``.T``)."""

    input: fx.Node
    linear: nn.Linear
    name: str
    weight_target: str | None  # the get_attr target of W for function forms
    transposed: bool = False


def linear_of(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    """Recognize ``nn.Linear`` and :class:`TransposedLinear` modules, ``F.linear``,
    ``aten.linear`` and :func:`linear_in_out` with stored weights."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.Linear) and node.args:
        return LinearOp(node.args[0], mod, str(node.target), None)  # type: ignore[arg-type]
    if isinstance(mod, TransposedLinear) and node.args:
        lin = _linear_view(mod.weight.t(), mod.bias)
        return LinearOp(node.args[0], lin, str(node.target), None, True)  # type: ignore[arg-type]
    transposed = node.op == "call_function" and node.target is linear_in_out
    if node.op != "call_function" or not (transposed or node.target in (F.linear,
                                                                        aten.linear.default)):
        return None
    x, w_node, b_node = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if transposed and x is None:
        x = node.kwargs.get("x")
    weight = attr_of(gm, w_node)
    bias = attr_of(gm, b_node) if b_node is not None else None
    if weight is None or weight.dim() != 2 or (b_node is not None and bias is None):
        return None
    target = str(w_node.target)
    lin = _linear_view(weight.t() if transposed else weight, bias)
    return LinearOp(x, lin, layer_name(target), target, transposed)


def _linear_view(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters share ``weight`` (``(out, in)``) and ``bias``."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return lin


def layer_name(weight_target: str) -> str:
    """The user's name of the layer owning a weight: ``blocks.0.up.weight`` -> ``blocks.0.up``,
    ``self_attn.in_proj_weight`` -> ``self_attn.in_proj``; a weight of the root module keeps
    its own name (``weight``)."""
    for suffix in (".weight", "_weight"):
        if weight_target.endswith(suffix) and len(weight_target) > len(suffix):
            return weight_target.removesuffix(suffix)
    return weight_target


def new_module_name(name: str, weight_target: str | None, kind: str) -> str:
    """Where to register a converted layer that cannot take over ``name``: ``name`` itself
    unless that is the weight's own path (a weight of the root module, ``self.w`` used by
    ``F.linear``), then ``kind`` for the root's ``weight`` or ``<name>_<kind>``."""
    if name != weight_target:
        return name
    return kind if name == "weight" else f"{name}_{kind}"


@dataclass
class WindowOp:
    """A conv or pool node: the sliding-window geometry per spatial axis."""

    input: fx.Node
    kind: str  # "conv", "maxpool", "avgpool"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    name: str
    module: nn.Module | None = None


def _tuple(v: Any, n: int, default: int) -> tuple[int, ...]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return (default,) * n
    if isinstance(v, int):
        return (v,) * n
    vals = tuple(int(x) for x in v)
    return vals * n if len(vals) == 1 else vals


_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, aten.conv1d.default: 1,
               aten.conv2d.default: 2, aten.conv3d.default: 3}
_MAXPOOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
                  aten.max_pool1d.default: 1, aten.max_pool2d.default: 2,
                  aten.max_pool3d.default: 3}
_AVGPOOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
                  aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2,
                  aten.avg_pool3d.default: 3}


def _conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
                  ) -> tuple[int, ...]:
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    return _tuple(padding, len(kernel), 0)


def window_of(gm: fx.GraphModule, node: fx.Node) -> WindowOp | None:
    """Recognize convolutions and max/average pools (modules, functions, aten ops)."""
    mod = module_of(gm, node)
    name = user_name(node)
    if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        k, d = tuple(mod.kernel_size), tuple(mod.dilation)
        return WindowOp(node.args[0], "conv", k, tuple(mod.stride),  # type: ignore[arg-type]
                        _conv_padding(mod.padding, k, d), d, False, name, mod)
    if isinstance(mod, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d | nn.AvgPool1d | nn.AvgPool2d
                  | nn.AvgPool3d):
        n = 1 if "1d" in type(mod).__name__ else 3 if "3d" in type(mod).__name__ else 2
        kind = "maxpool" if "Max" in type(mod).__name__ else "avgpool"
        k = _tuple(mod.kernel_size, n, 1)
        return WindowOp(node.args[0], kind, k,  # type: ignore[arg-type]
                        _tuple(mod.stride, n, 0) if mod.stride else k, _tuple(mod.padding, n, 0),
                        _tuple(getattr(mod, "dilation", 1), n, 1), bool(mod.ceil_mode), name, mod)
    if node.op != "call_function":
        return None
    target = node.target
    if target in _CONV_FUNCS:
        n = _CONV_FUNCS[target]
        w = attr_of(gm, _arg(node, 1, "weight"))
        if w is None:
            return None
        k = tuple(int(s) for s in w.shape[2:])
        d = _tuple(_arg(node, 5, "dilation", 1), n, 1)
        return WindowOp(_arg(node, 0, "input"), "conv", k, _tuple(_arg(node, 3, "stride", 1), n, 1),
                        _conv_padding(_arg(node, 4, "padding", 0), k, d), d, False, name)
    if target in _MAXPOOL_FUNCS or target in _AVGPOOL_FUNCS:
        is_max = target in _MAXPOOL_FUNCS
        n = _MAXPOOL_FUNCS[target] if is_max else _AVGPOOL_FUNCS[target]
        k = _tuple(_arg(node, 1, "kernel_size"), n, 1)
        stride = _arg(node, 2, "stride")
        return WindowOp(
            _arg(node, 0, "input"), "maxpool" if is_max else "avgpool", k,
            _tuple(stride, n, 1) if stride else k, _tuple(_arg(node, 3, "padding", 0), n, 0),
            _tuple(_arg(node, 4, "dilation", 1), n, 1) if is_max else (1,) * n,
            bool(_arg(node, 5 if is_max else 4, "ceil_mode", False)), name)
    return None


@dataclass
class AdaptiveOp:
    input: fx.Node
    kind: str  # "avg" or "max"
    output_size: tuple[int | None, ...]
    name: str


_ADAPTIVE_FUNCS = {F.adaptive_avg_pool2d: "avg", F.adaptive_max_pool2d: "max",
                   aten.adaptive_avg_pool2d.default: "avg",
                   aten._adaptive_avg_pool2d.default: "avg",
                   aten.adaptive_max_pool2d.default: "max", F.adaptive_avg_pool1d: "avg",
                   aten.adaptive_avg_pool1d.default: "avg"}


def adaptive_of(gm: fx.GraphModule, node: fx.Node) -> AdaptiveOp | None:
    """Recognize adaptive average/max pooling."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d
                  | nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d | nn.AdaptiveMaxPool3d):
        size = mod.output_size
        shape = tensor_shape(node.args[0]) or ()
        n = max(len(shape) - 2, 1)
        out = (size,) * n if isinstance(size, int) or size is None else tuple(size)
        return AdaptiveOp(node.args[0], "max" if "Max" in type(mod).__name__ else "avg",  # type: ignore[arg-type]
                          out, str(node.target))
    if node.op == "call_function" and node.target in _ADAPTIVE_FUNCS:
        size = _arg(node, 1, "output_size")
        shape = tensor_shape(_arg(node, 0, "input")) or ()
        n = max(len(shape) - 2, 1)
        out = (size,) * n if isinstance(size, int) else tuple(size)
        return AdaptiveOp(_arg(node, 0, "input"), _ADAPTIVE_FUNCS[node.target], out,
                          user_name(node))
    return None


def is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is elementwise on operands all of its output's shape (layout-free)."""
    mod = module_of(gm, node)
    if mod is not None:
        if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
            return False
        ok = isinstance(mod, POINTWISE_MODULES)
    elif node.op == "call_function":
        ok = node.target in _POINTWISE_FUNCTIONS
    elif node.op == "call_method":
        ok = node.target in _POINTWISE_METHODS
    else:
        ok = False
    if not ok:
        return False
    out = tensor_shape(node)
    return out is not None and all(tensor_shape(a) == out for a in tensor_args(node))


def first_input(node: fx.Node) -> Any:
    """The first positional (or ``input``/``self``) argument of a node."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


def flatten_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """If ``node`` flattens ``(N, C, *S)`` to ``(N, C*prod(S))``, its input node."""
    mod = module_of(gm, node)
    src = first_input(node)
    if not isinstance(src, fx.Node):
        return None
    in_shape, out_shape = tensor_shape(src), tensor_shape(node)
    if in_shape is None or out_shape is None or len(in_shape) < 3 or len(out_shape) != 2:
        return None
    if out_shape[0] != in_shape[0]:
        return None
    flat = (isinstance(mod, nn.Flatten)
            or (node.op == "call_function" and node.target in (torch.flatten,
                                                               aten.flatten.using_ints,
                                                               aten.view.default,
                                                               aten.reshape.default,
                                                               torch.reshape))
            or (node.op == "call_method" and node.target in ("flatten", "view", "reshape")))
    return src if flat else None


def _perm(rank: int, to_last: bool) -> list[int]:
    """``(N, C, *S) -> (N, *S, C)`` (``to_last``) or the inverse, as a permutation."""
    return [0, *range(2, rank), 1] if to_last else [0, rank - 1, *range(1, rank - 1)]


def permute_source(node: fx.Node, to_last: bool = True) -> fx.Node | None:
    """If ``node`` moves the channels of ``x`` last (``x.permute(0, 2, 3, 1)``, ``movedim(1,
    -1)``, ``transpose(1, 2)`` of a rank-3 ``x``), or first when ``to_last=False``, return ``x``."""
    src = first_input(node)
    if not isinstance(src, fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    shape = tensor_shape(src)
    if shape is None or len(shape) < 3:
        return None
    rank, want = len(shape), _perm(len(shape), to_last)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args: Any = node.args[1:]
    if name == "permute" or node.target is aten.permute.default:
        nested = len(args) == 1 and isinstance(args[0], (list, tuple))
        dims = list(args[0]) if nested else list(args)
        return src if [int(d) % rank for d in dims] == want else None
    if name == "movedim" and len(args) == 2:
        a, b = int(args[0]) % rank, int(args[1]) % rank
        return src if (a, b) == ((1, rank - 1) if to_last else (rank - 1, 1)) else None
    if (name == "transpose" or node.target is aten.transpose.int) and rank == 3 and len(args) == 2:
        return src if sorted(int(d) % 3 for d in args) == [1, 2] else None
    return None


def channels_last_source(node: fx.Node) -> fx.Node | None:
    """If ``node`` is ``x.permute(0, 2, 3, 1)`` (NCHW -> NHWC) or an equal op, return ``x``."""
    return permute_source(node, to_last=True)


def softmax_dim(gm: fx.GraphModule, node: fx.Node) -> tuple[int, Callable[[int], None]] | None:
    """For a softmax/log-softmax node: its dim and a setter to change it."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.Softmax | nn.LogSoftmax):
        def set_mod(d: int, m: Any = mod) -> None:
            m.dim = d
        return (mod.dim if mod.dim is not None else 1), set_mod
    funcs = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, aten._softmax.default,
             aten._log_softmax.default, aten.softmax.int, aten.log_softmax.int)
    if (node.op == "call_function" and node.target in funcs) or (
            node.op == "call_method" and node.target in ("softmax", "log_softmax")):
        if len(node.args) > 1:
            def set_arg(d: int, n: fx.Node = node) -> None:
                n.args = (n.args[0], d, *n.args[2:])
            dim: Any = node.args[1]
            return int(dim), set_arg
        if "dim" in node.kwargs:
            def set_kw(d: int, n: fx.Node = node) -> None:
                n.kwargs = {**n.kwargs, "dim": d}
            kw: Any = node.kwargs["dim"]
            return int(kw), set_kw
    return None


def main_output(value: Any) -> torch.Tensor:
    """The main tensor of a model's output: the tensor itself, or the first tensor of a
    tuple, dict or ``ModelOutput`` (a Hugging Face classifier's ``logits``: ``loss`` is
    ``None`` without labels), as ``compare`` reads outputs."""
    if isinstance(value, torch.Tensor):
        return value
    items: list[Any] = []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, list | tuple):
        items = list(value)
    elif hasattr(value, "__dataclass_fields__"):
        items = [getattr(value, k) for k in value.__dataclass_fields__]
    for item in items:
        if item is None:
            continue
        try:
            return main_output(item)
        except Fc2ConvError:
            continue
    raise Fc2ConvError(f"the model returned {type(value).__name__}, which holds no tensor")
