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

import operator
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fc2conv.core.pointwise_conv import capturing
from fc2conv.core.positionwise import Channel, elementwise, kind_of
from fc2conv.errors import Fc2ConvError
from fc2conv.pytorch.ops import first_input, permute_source, tensor_shape


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
        if not capturing() and x.dim() >= 3 and x.shape[1] > 1:
            # eager: the native kernel on the channels-last view -- the very LayerNorm of the
            # original model. The view is free on channels-innermost memory (the
            # positions-major storage the move in and 1x1 convs give); on other memory
            # layer_norm gathers it once, still cheaper than the strided reduction below
            # (Whisper's NCHW-contiguous stream: 16 us a call against 6 us), and its output
            # is channels-innermost again for the layers after it
            return F.layer_norm(x.movedim(1, -1), (self.channels,), self.weight, self.bias,
                                self.eps).movedim(-1, 1)
        # a captured graph: the reduction over axis 1, no transpose.
        # var_mean: one reduction over the strided channel axis instead of two (mean, then the
        # mean of squared deviations); addcmul: the affine step in one pass
        var, mean = torch.var_mean(x, 1, keepdim=True, correction=0)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None and self.bias is not None:
            return torch.addcmul(self.bias.reshape(shape), y, self.weight.reshape(shape))
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, over axis 1"


def positions_major(t: torch.Tensor) -> bool:
    """A ``(B, C, 1, S)`` tensor whose memory is ``(B, S, C)`` (channels-last strides: what
    the move in, a strided view, and 1x1 convs on it give in eager PyTorch)."""
    return t.dim() == 4 and t.shape[2] == 1 and t.stride(1) == 1 \
        and (t.shape[3] == 1 or t.stride(3) == t.shape[1])


@dataclass
class Move:
    """How a value of a given original shape moves into (``forward``) and out of the layout."""

    forward: Callable[..., torch.Tensor]
    args: tuple[Any, ...]


# A rule for a node that changes layout: returns the module to call on the moved input and the
# name to register it under, or None when this node stays in the original layout.
Rewrite = Callable[[fx.Node, Callable[[fx.Node], bool]], tuple[nn.Module, str, fx.Node] | None]


_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul, torch.div, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
           torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor}


def per_channel_vector(node: fx.Node, is_moved: Callable[[fx.Node], bool], channels_last: bool
                       ) -> tuple[fx.Node, fx.Node] | None:
    """``(moved operand, vector)`` when ``node`` is ``x op v`` (or ``v op x``) with ``x`` moved
    and ``v`` one value per channel broadcast over the positions: shape ``(C,)`` in the Linear
    layout (``channels_last``), ``(C, 1, ..., 1)`` in the conv layout (a layer scale, a bias)."""
    if node.op != "call_function" or node.target not in _BINARY or node.kwargs:
        return None
    args = [a for a in node.args if isinstance(a, fx.Node)]
    out = tensor_shape(node)
    if len(args) != 2 or len(node.args) != 2 or out is None or len(out) < 2:
        return None
    for x, v in (args, args[::-1]):
        vshape = tensor_shape(v)
        if not is_moved(x) or is_moved(v) or tensor_shape(x) != out or vshape is None:
            continue
        want = (out[-1],) if channels_last else (out[1], *([1] * (len(out) - 2)))
        if tuple(vshape) == tuple(want):
            return x, v
    return None


def relayout(gm: fx.GraphModule, rewrite: Rewrite, may_follow: Callable[[fx.Node], bool],
             move: Callable[[fx.Node], Move], what: str,
             vector_shape: Callable[[fx.Node, Move], tuple[int, ...]] | None = None,
             *, move_to_conv: bool = True, anchors: Collection[fx.Node] = ()) -> fx.GraphModule:
    """Rebuild ``gm``'s graph with the nodes ``rewrite`` accepts in the new layout.

    ``rewrite(node, is_moved)`` -> ``(module, name, input)``: call ``module`` (registered at
    ``name``) on ``input`` moved into the new layout; ``is_moved(value)`` tells whether an
    operand is already in the new layout (a LayerNorm converts only then).
    ``may_follow(node)``: an elementwise node that stays in the new layout when every tensor
    operand is in it. ``vector_shape(x, move)``: the new-layout shape of a per-channel vector
    combined with a moved ``x`` (see :func:`per_channel_vector`); ``None`` disables that.
    ``move_to_conv``: this pass moves Linear-layout values to the conv layout (``to_conv``);
    ``False`` for the reverse.
    ``anchors``: the nodes ``rewrite`` will convert; per-position nodes all of whose readers
    run in the new layout (an RMSNorm before a converted layer) are computed in it too, so the
    move happens once, before them (:func:`pulled_into_layout`).
    ``move(value)`` says how to move a value of the original layout. Values leave the new
    layout once, where a node that cannot follow (or the output) reads them. The model's own
    permutes that a move would undo are absorbed instead of paired with a move.
    """
    old = gm.graph
    new = fx.Graph()
    new._codegen = old._codegen  # keep the pytree input/output handling of exported modules
    env: dict[fx.Node, fx.Node] = {}
    moved: set[fx.Node] = set()  # old nodes whose value is in the new layout
    into: dict[fx.Node, fx.Node] = {}  # old node -> new node of its value moved in
    out_of: dict[fx.Node, fx.Node] = {}  # old node -> new node of its value moved back

    def user_permute(a: fx.Node, m: Move) -> fx.Node | None:
        """The value ``a`` was permuted from, when the move would just undo that permute."""
        if m.args[:1] != (0,):
            return None
        src = permute_source(a, to_last=m.forward is last_to_channels)
        return src if src is not None and src not in moved else None

    def move_in(a: fx.Node) -> fx.Node:
        if a in moved:
            return env[a]
        if a not in into:
            m = move(a)
            src = env[a]
            undone = user_permute(a, m)
            if undone is not None:  # the model's own permute: read the value before it
                into[a] = env[undone]
            elif is_move(src) and src.target is INVERSE[m.forward] \
                    and tuple(src.args[1:]) == m.args:
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

    def free_to_move(a: fx.Node) -> bool:
        if a in moved:
            return True
        try:
            return user_permute(a, move(a)) is not None
        except Fc2ConvError:
            return False

    channels_last = move_to_conv  # the original layout of a per-channel vector: (C,)
    axis = -1 if move_to_conv else 1  # the channel axis of the original layout
    pulled = pulled_into_layout(old, set(anchors), may_follow, channels_last) \
        if anchors and vector_shape is not None else set()
    for node in old.nodes:
        calls = node.op in ("call_module", "call_function", "call_method")
        plan = rewrite(node, free_to_move) if calls else None
        def in_layout(a: fx.Node, node: fx.Node = node) -> bool:
            return a in moved or (node in pulled and tensor_shape(a) == tensor_shape(node))
        pair = per_channel_vector(node, in_layout, channels_last) \
            if vector_shape is not None and plan is None else None
        if pair is not None:
            x, v = pair
            assert vector_shape is not None
            vec = _reshaped(new, env[v], vector_shape(x, move(x)))
            def swap(a: fx.Node, x: fx.Node = x, v: fx.Node = v, vec: fx.Node = vec) -> fx.Node:
                return move_in(x) if a is x else vec if a is v else env[a]

            env[node] = new.node_copy(node, swap)
            moved.add(node)
            continue
        if plan is None and (channel_reduce(node, moved, axis) or (
                node in pulled and channel_reduce(node, {first_input(node)}, axis))):
            env[node] = new.node_copy(node, move_in)
            reduce_over_channels(env[node], 1 if move_to_conv else -1)
            moved.add(node)
            continue
        if plan is None and node.op not in ("placeholder", "output", "get_attr") \
                and (may_follow(node) or follows_broadcast(node, moved)
                     or (node in pulled and _layout_free(node, may_follow, channels_last))):
            operands = _tensor_operands(node)
            if operands and (node in pulled or any(a in moved for a in operands)):
                # stay in the new layout: a residual's other operand moves in (once, cached)
                def arg_in(a: fx.Node, ops: list[fx.Node] = operands) -> fx.Node:
                    return move_in(a) if a in ops else env[a]

                env[node] = new.node_copy(node, arg_in)
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
        back = _undone_by(node, moved, move)
        env[node] = env[back] if back is not None else new.node_copy(node, move_out)
    cancel_inverse_moves(new)
    gm.graph = new
    return gm


def drop_full_slices(graph: fx.Graph) -> int:
    """Replace ``aten.slice(x, dim, 0, end)`` with step 1 and ``end`` past any length (the
    ``x[:, 0:]`` of an exported ``hidden[:, -0:]``, Llama's ``logits_to_keep=0``) by ``x``:
    it is ``x`` itself for every input shape, and as a slice it would hold the value in the
    Linear layout. Returns how many."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor:
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        x, _, start, end, step = args[:5]
        if isinstance(x, fx.Node) and start in (0, None) and step in (1, None) and (
                end is None or (isinstance(end, int) and end >= 2 ** 62)):
            node.replace_all_uses_with(x)
            graph.erase_node(node)
            removed += 1
    return removed


def _layout_free(node: fx.Node, may_follow: Callable[[fx.Node], bool], channels_last: bool
                 ) -> bool:
    """Whether ``node`` could run in the new layout once its operands are moved: an
    elementwise op of the table (operands of the output's rank or 0-d, or one per-channel
    vector), or a mean over the channels (the last axis when ``channels_last``, else axis 1)."""
    if node.op not in ("call_function", "call_method"):
        return False
    out = tensor_shape(node)
    if out is None or len(out) < 3:
        return False
    if may_follow(node) or channel_reduce(node, {first_input(node)}, -1 if channels_last else 1):
        return True
    if not elementwise(op_name(node)):
        return False
    ranks = [len(tensor_shape(a) or ()) for a in _tensor_operands(node)]
    if all(r in (0, len(out)) for r in ranks):
        return True
    return per_channel_vector(node, lambda a: tensor_shape(a) == out, channels_last) is not None


def pulled_into_layout(graph: fx.Graph, anchors: set[fx.Node],
                       may_follow: Callable[[fx.Node], bool], channels_last: bool
                       ) -> set[fx.Node]:
    """Layout-free nodes (:func:`_layout_free`) not fed by the new layout whose every reader
    will run in it (an anchor, a node fed by an anchor's output, or another such node), found
    from the output backwards: computing them in the new layout moves their inputs instead
    of their output, and a residual's input moved anyway makes that free."""
    fed = set(anchors)
    for node in graph.nodes:  # forward: what the anchors' outputs reach through free nodes
        if node not in fed and _layout_free(node, may_follow, channels_last) \
                and any(a in fed for a in _tensor_operands(node)):
            fed.add(node)
    pulled: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node in fed or not node.users or not _layout_free(node, may_follow, channels_last):
            continue
        if all(u in fed or u in pulled for u in node.users):
            pulled.add(node)
    return pulled


def op_name(node: fx.Node) -> str:
    """The name the core table knows an fx node's op by (``aten.add.Tensor``, ``add``)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        target: Any = node.target
        return str(target) if isinstance(target, torch._ops.OpOverload) \
            else getattr(target, "__name__", "")
    return ""


def follows_broadcast(node: fx.Node, moved: set[fx.Node]) -> bool:
    """An elementwise op (:data:`fc2conv.core.positionwise.OPS`) with at least one moved
    operand whose every tensor operand has the output's rank (moving them all commutes with
    broadcasting: ``(B, S, 1) -> (B, 1, 1, S)`` against ``(B, S, C) -> (B, C, 1, S)``) or is
    a 0-d scalar."""
    if node.op not in ("call_function", "call_method") or not elementwise(op_name(node)):
        return False
    out = tensor_shape(node)
    operands = _tensor_operands(node)
    if out is None or len(out) < 3 or not any(a in moved for a in operands):
        return False
    return all(len(tensor_shape(a) or ()) in (0, len(out)) for a in operands) \
        and all(len(tensor_shape(a) or ()) == len(out) for a in operands if a in moved)


def _reshaped(graph: fx.Graph, v: fx.Node, shape: tuple[int, ...]) -> fx.Node:
    """``v.reshape(shape)``; when ``v`` is itself a reshape of a 1-D vector and ``shape`` is
    ``(-1,)`` (the way back to the Linear layout), that vector (no reshape of a reshape)."""
    src = v.args[0] if v.op == "call_method" and v.target in ("reshape", "view") \
        and v.args else None
    if shape == (-1,) and isinstance(src, fx.Node) and src.op == "get_attr" \
            and len(tensor_shape(src) or _attr_shape(src)) == 1:
        return src
    return graph.call_method("reshape", (v, shape))


def _attr_shape(node: fx.Node) -> tuple[int, ...]:
    gm = node.graph.owning_module
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def channel_reduce(node: fx.Node, moved: set[fx.Node], axis: int = -1) -> bool:
    """``mean(x, -1, keepdim=True)`` of a moved ``x`` (an RMSNorm's ``x.pow(2).mean(-1)``):
    the same mean over axis 1 in the conv layout (a ``CHANNEL_REDUCE`` row of the table).
    ``axis=1``: the way back, ``mean(x, 1, keepdim=True)`` of a conv-layout ``x``."""
    row = kind_of(op_name(node))
    if row is None or row.action is not Channel.CHANNEL_REDUCE:
        return False
    x = node.args[0] if node.args else None
    shape = tensor_shape(x)
    if not isinstance(x, fx.Node) or x not in moved or shape is None:
        return False
    dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, list | tuple) \
        else None
    return dims is not None and len(dims) == 1 and int(dims[0]) % len(shape) == axis % len(shape) \
        and keep is True and len(node.args) <= 3


def reduce_over_channels(node: fx.Node, axis: int = 1) -> None:
    """Point a copied :func:`channel_reduce` node at ``axis`` (``keepdim`` stays true)."""
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dim", "keepdim")}
    node.args = (node.args[0], [axis])
    node.kwargs = {**kwargs, "keepdim": True}


def _undone_by(node: fx.Node, moved: set[fx.Node], move: Callable[[fx.Node], Move]
               ) -> fx.Node | None:
    """If ``node`` is the model's own permute taking a moved value back to where the move
    would put it (``permute(0, 3, 1, 2)`` after Linears that now run as convs), that value."""
    for to_last in (False, True):
        src = permute_source(node, to_last=to_last)
        if src is not None and src in moved:
            m = move(src)
            if m.args[:1] == (0,) and (m.forward is last_to_channels) != to_last:
                return src
    return None


def cancel_inverse_moves(graph: fx.Graph) -> int:
    """Replace ``undo(do(x))`` by ``x`` for fc2conv's layout moves (e.g. a move that the input
    model already had, meeting one this pass inserted); returns how many pairs were removed."""
    removed = 0
    for node in list(graph.nodes):
        src = node.args[0] if is_move(node) and node.args else None
        chain: list[fx.Node] = []  # unary elementwise ops between the two moves (a dropout)
        while isinstance(src, fx.Node) and not is_move(src) and len(src.users) == 1 \
                and _unary_elementwise(graph, src):
            chain.append(src)
            src = _tensor_operands(src)[0]
        if not isinstance(src, fx.Node) or not is_move(src) or (chain and len(src.users) != 1):
            continue
        undo: Any = INVERSE.get(src.target)  # type: ignore[arg-type]
        if undo is node.target and tuple(src.args[1:]) == tuple(node.args[1:]):
            if chain:  # f(undo(do(x))) ... = f(x): elementwise ops commute with a move
                chain[-1].replace_input_with(src, src.args[0])  # type: ignore[arg-type]
                node.replace_all_uses_with(chain[0])
            else:
                node.replace_all_uses_with(src.args[0])  # type: ignore[arg-type]
            graph.erase_node(node)
            if not src.users:
                graph.erase_node(src)
            removed += 1
    return removed


def _unary_elementwise(graph: fx.Graph, node: fx.Node) -> bool:
    """One tensor operand, and the table calls the op elementwise (a module by its class)."""
    if len(_tensor_operands(node)) != 1:
        return False
    if node.op == "call_module":
        gm = graph.owning_module
        mod = gm.get_submodule(str(node.target)) if gm is not None else None
        name = type(mod).__name__.lower()
    else:
        name = str(node.target) if node.op == "call_method" else \
            getattr(node.target, "__name__", str(node.target))
    return elementwise(name)


def _tensor_operands(node: fx.Node) -> list[fx.Node]:
    from fc2conv.pytorch.ops import tensor_args

    return tensor_args(node)


@dataclass(frozen=True)
class LayoutChange:
    """One layout move in a converted graph: ``direction`` is ``"in"`` (to the conv layout),
    ``"out"``, ``"permute"`` (the model's own permute/transpose) or ``"table"`` (a position
    table such as rotary ``cos``/``sin``, ``(B', S, D) -> (B', 1, D, S)``, moved once for all
    layers; not an activation); ``value`` is the moved node, ``readers`` the ops that read the
    moved value."""

    direction: str
    value: str
    readers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.direction:3} {self.value} -> {', '.join(self.readers)}"


def layout_changes(gm: fx.GraphModule) -> list[LayoutChange]:
    """Every layout move (fc2conv's moves and the model's own ``permute``/``transpose`` of
    activations) left in ``gm``, with where it sits: an ANE-ready graph has one per model input
    and one per output (and, for rotary models, one ``"table"`` per position table)."""
    found = []
    for node in gm.graph.nodes:
        readers = tuple(u.name if u.op != "call_module" else str(u.target) for u in node.users)
        if is_move(node):
            direction = "in" if node.target is last_to_channels else "out"
        elif node.op == "call_function" and getattr(node.target, "fc2conv_layout_table", False):
            direction = "table"
        elif node.op in ("call_function", "call_method") and _is_transpose(node):
            direction = "permute"
        else:
            continue
        src = node.args[0]
        found.append(LayoutChange(direction, str(getattr(src, "name", src)), readers))
    return found


def _is_transpose(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target._opname
    return name in ("permute", "transpose", "movedim", "t")
