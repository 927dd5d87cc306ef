"""Moving activations between the Linear layout ``(N, *S, C)`` and the conv layout
``(N, C, *S')``, once per region of per-position ops.

``to_conv`` and ``to_linear`` share one graph pass (:func:`relayout`): some nodes must change
layout (a Linear becoming a 1x1 conv reads and writes the conv layout), elementwise nodes whose
operands are all in the new layout stay in it, and every other use of a moved value reads it
moved back. Each value is moved at most once in each direction, and a move of a value that was
just moved the other way reuses the original, so the graph never holds a back-to-back pair of
inverse permutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fc2conv.errors import Fc2ConvError
from fc2conv.pytorch.ops import tensor_shape


def last_to_channels(x: torch.Tensor, extra: int = 0, seq_last: bool = True) -> torch.Tensor:
    """``(N, *S, C) -> (N, C, *S)``, then ``extra`` singleton axes: ``(B, S, C) -> (B, C, 1, S)``
    with ``seq_last`` (Apple's ANE layout) or ``(B, C, S, 1)`` without."""
    x = x.movedim(-1, 1)
    for _ in range(extra):
        x = x.unsqueeze(2 if seq_last else -1)
    return x


def channels_to_last(x: torch.Tensor, extra: int = 0, seq_last: bool = True) -> torch.Tensor:
    """The inverse of :func:`last_to_channels` with the same ``extra`` and ``seq_last``."""
    for _ in range(extra):
        x = x.squeeze(2 if seq_last else -1)
    return x.movedim(1, -1)


INVERSE: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {
    last_to_channels: channels_to_last,
    channels_to_last: last_to_channels,
}


def is_move(node: fx.Node) -> bool:
    """Whether ``node`` is a layout move inserted by fc2conv."""
    return node.op == "call_function" and node.target in INVERSE  # type: ignore[comparison-overlap]


def inverse_move_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Pairs of nodes where a move directly undoes the move feeding it (should be empty)."""
    pairs = []
    for node in gm.graph.nodes:
        src = node.args[0] if is_move(node) and node.args else None
        undo: Any = INVERSE.get(src.target) if isinstance(src, fx.Node) else None  # type: ignore[arg-type]
        if isinstance(src, fx.Node) and is_move(src) and undo is node.target \
                and tuple(src.args[1:]) == tuple(node.args[1:]):
            pairs.append((src.name, node.name))
    return pairs


class ChannelLayerNorm(nn.Module):
    """``nn.LayerNorm(C)`` applied over axis 1 of an ``(N, C, *S)`` map: at every position,
    ``y = (x - mean_c x) / sqrt(var_c x + eps) * weight + bias`` (biased variance), which is
    the LayerNorm of the channels-last view."""

    def __init__(self, channels: int, eps: float, weight: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        centered = x - mean
        var = centered.pow(2).mean(1, keepdim=True)
        y = centered * torch.rsqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, over axis 1"


@dataclass
class Move:
    """How a value of a given original shape moves into (``forward``) and out of the layout."""

    forward: Callable[..., torch.Tensor]
    args: tuple[Any, ...]


# A rule for a node that changes layout: returns the module to call on the moved input and the
# name to register it under, or None when this node stays in the original layout.
Rewrite = Callable[[fx.Node, Callable[[fx.Node], bool]], tuple[nn.Module, str, fx.Node] | None]


def relayout(gm: fx.GraphModule, rewrite: Rewrite, may_follow: Callable[[fx.Node], bool],
             move: Callable[[fx.Node], Move], what: str) -> fx.GraphModule:
    """Rebuild ``gm``'s graph with the nodes ``rewrite`` accepts in the new layout.

    ``rewrite(node, is_moved)`` -> ``(module, name, input)``: call ``module`` (registered at
    ``name``) on ``input`` moved into the new layout; ``is_moved(value)`` tells whether an
    operand is already in the new layout (a LayerNorm converts only then).
    ``may_follow(node)``: an elementwise node that stays in the new layout when every tensor
    operand is in it. ``move(value)`` says how to move a
    value of the original layout. Values leave the new layout once, where a node that cannot
    follow (or the output) reads them.
    """
    old = gm.graph
    new = fx.Graph()
    new._codegen = old._codegen  # keep the pytree input/output handling of exported modules
    env: dict[fx.Node, fx.Node] = {}
    moved: set[fx.Node] = set()  # old nodes whose value is in the new layout
    into: dict[fx.Node, fx.Node] = {}  # old node -> new node of its value moved in
    out_of: dict[fx.Node, fx.Node] = {}  # old node -> new node of its value moved back

    def move_in(a: fx.Node) -> fx.Node:
        if a in moved:
            return env[a]
        if a not in into:
            m = move(a)
            src = env[a]
            if is_move(src) and src.target is INVERSE[m.forward] and tuple(src.args[1:]) == m.args:
                into[a] = src.args[0]  # type: ignore[assignment]
            else:
                into[a] = new.call_function(m.forward, (src, *m.args))
        return into[a]

    def move_out(a: fx.Node) -> fx.Node:
        if a not in moved:
            return env[a]
        if a not in out_of:
            m = move(a)
            src = env[a]
            back = INVERSE[m.forward]
            if is_move(src) and src.target is m.forward and tuple(src.args[1:]) == m.args:
                out_of[a] = src.args[0]  # type: ignore[assignment]
            else:
                out_of[a] = new.call_function(back, (src, *m.args))
        return out_of[a]

    for node in old.nodes:
        calls = node.op in ("call_module", "call_function", "call_method")
        plan = rewrite(node, moved.__contains__) if calls else None
        if plan is None and node.op not in ("placeholder", "output", "get_attr") \
                and may_follow(node):
            operands = _tensor_operands(node)
            if operands and all(a in moved for a in operands):
                env[node] = new.node_copy(node, lambda a: env[a])
                moved.add(node)
                continue
        if plan is not None:
            module, name, source = plan
            if tensor_shape(source) is None or len(tensor_shape(source) or ()) < 2:
                raise Fc2ConvError(
                    f"cannot convert {what} {name!r}: its input is not a batched tensor "
                    f"(shape {tensor_shape(source)})"
                )
            gm.add_submodule(name, module)
            env[node] = new.call_module(name, (move_in(source),))
            env[node].meta = dict(node.meta)
            moved.add(node)
            continue
        env[node] = new.node_copy(node, move_out)
    cancel_inverse_moves(new)
    gm.graph = new
    return gm


def cancel_inverse_moves(graph: fx.Graph) -> int:
    """Replace ``undo(do(x))`` by ``x`` for fc2conv's layout moves (e.g. a move that the input
    model already had, meeting one this pass inserted); returns how many pairs were removed."""
    removed = 0
    for node in list(graph.nodes):
        src = node.args[0] if is_move(node) and node.args else None
        if not isinstance(src, fx.Node) or not is_move(src):
            continue
        undo: Any = INVERSE.get(src.target)  # type: ignore[arg-type]
        if undo is node.target and tuple(src.args[1:]) == tuple(node.args[1:]):
            node.replace_all_uses_with(src.args[0])  # type: ignore[arg-type]
            graph.erase_node(node)
            if not src.users:
                graph.erase_node(src)
            removed += 1
    return removed


def _tensor_operands(node: fx.Node) -> list[fx.Node]:
    from fc2conv.pytorch.ops import tensor_args

    return tensor_args(node)
