"""Splitting a dense net into stages at layer boundaries, and its profile for the planner.

A **cut** is a node of the net's ``torch.fx`` graph after which one tensor carries
everything: no value computed before it (other than constants: weights and what is computed
from weights alone) is used after it. The net is then ``rest(head(x))`` with ``head`` the
nodes up to the cut and ``rest`` the nodes after it, reading the cut's tensor
(:func:`split`); both are GraphModules over the same submodules and weights (nothing is
copied). The candidates offered to the planner (:mod:`fc2conv.dense.stages`) are the first
cut at each new total stride (right after a layer that downsamples): cutting later at the same
stride only widens the earlier stage's field.

:func:`profile` measures, with shape-only (fake tensor) runs, what the planner needs: every
candidate's receptive field over the image (:func:`fc2conv.receptive_field` of the net up to
it), channels and size on the full image, and per segment between candidates the work
(convolution / matmul FLOPs, plus :data:`ELEMENT` per element each op reads and writes) and the
largest activation per output cell, as slopes between two probe sizes (the border effects of
one size cancel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from fc2conv.dense.stages import Boundary, Profile, Segment
from fc2conv.errors import Fc2ConvError

ELEMENT = 40.0
"""Work (FLOP equivalents) per element an op reads or writes, a pool's window counted per
output element. Measured on one CPU core (torch 2.13, AlexNet-, VGG- and ResNet-style nets at
768^2): ReLUs and max pools at full resolution ran at ~2 ns per element touched and the
convolutions of few channels were bound by their memory traffic, not their FLOPs; with 40 the
segments' predicted work per millisecond agreed within 2-3x (FLOPs alone: 70x apart)."""


def as_graph(net: nn.Module) -> fx.GraphModule:
    """``net`` as a GraphModule (traced when it is not one; :class:`Fc2ConvError` when fx
    cannot trace it)."""
    if isinstance(net, fx.GraphModule):
        return net
    from fc2conv.dense.fuse import _trace

    try:
        return _trace(net)
    except Exception as err:  # noqa: BLE001 - any untraceable net runs in one stage
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise Fc2ConvError(f"the net cannot be split into stages: torch.fx cannot trace it "
                           f"({first})") from None


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that do not depend on the input: weights and what is computed from them."""
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op in ("call_function", "call_method", "call_module")
                                     and all(a in const for a in node.all_input_nodes)):
            const.add(node)
    return const


def cuts(gm: fx.GraphModule) -> list[str]:
    """The names of the nodes after which one tensor carries everything (see the module), in
    graph order; the last computing node (the output itself) is not a cut."""
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return []
    const = _constants(gm)
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    out = []
    live: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node not in const:
            live.add(node)
        live = {n for n in live if last_use[n] > i}
        if live == {node} and node.op != "placeholder" and not (
                len(node.users) == 1 and next(iter(node.users)).op == "output"):
            out.append(node.name)
    return out


def _result(output: fx.Node) -> Any:
    """What an output node returns: its one tensor when it is a one-element tuple (as the
    module of an exported program writes it), else its argument."""
    value = output.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], fx.Node):
        return value[0]
    return value


def split(gm: fx.GraphModule, at: Sequence[str]) -> list[fx.GraphModule]:
    """The stages of ``gm`` cut after the nodes named ``at`` (cuts, in graph order): stage
    ``k`` takes the tensor of cut ``k - 1`` (the input for the first) and returns cut ``k``'s
    (the net's output for the last). They share ``gm``'s submodules and weights."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    const = _constants(gm)
    ends = [by_name[name] for name in at] + [None]
    stages: list[fx.GraphModule] = []
    begin: fx.Node | None = next(n for n in nodes if n.op == "placeholder")
    position = 0
    for end in ends:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        assert begin is not None
        env[begin] = graph.placeholder("x")

        def get(n: fx.Node, env: dict[fx.Node, fx.Node] = env, graph: fx.Graph = graph
                ) -> fx.Node:
            if n not in env:  # a constant computed in another stage: copied here too
                if n not in const:
                    raise Fc2ConvError(f"node {n.name} crosses a stage boundary")
                for a in n.all_input_nodes:
                    get(a)
                env[n] = graph.node_copy(n, lambda a: get(a))
            return env[n]

        result = None
        while position < len(nodes):
            node = nodes[position]
            position += 1
            if node.op == "placeholder" or (node in const and node.op == "get_attr"):
                continue
            if node.op == "output":
                result = fx.map_arg(_result(node), get)
                break
            if node not in env:
                env[node] = graph.node_copy(node, lambda a: get(a))
            if node is end:
                result = env[node]
                break
        graph.output(result)
        # no dead-code elimination: an in-place op whose result is unused still runs
        stage = fx.GraphModule(gm, graph, f"{type(gm).__name__}Stage{len(stages)}")
        stage.graph.lint()
        stages.append(stage)
        begin = end
    return stages


def out_of_place(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph (same modules and weights) whose in-place torch functions
    (``torch.relu_``, as :mod:`~fc2conv.dense.fuse` writes them) are their out-of-place
    twins and whose box filters (:class:`~fc2conv.dense.pools.BoxMean`) are the stride-1
    average pools they replaced: the same values, in the form :func:`fc2conv.receptive_field`
    reads (``gm`` itself is unchanged)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        copied = graph.node_copy(node, lambda a: env[a])
        name = getattr(node.target, "__name__", "")
        if (node.op == "call_function" and name.endswith("_") and not name.endswith("__")
                and getattr(torch, name, None) is node.target
                and callable(getattr(torch, name[:-1], None))):
            copied.target = getattr(torch, name[:-1])
        env[node] = copied
    out = fx.GraphModule(gm, graph, type(gm).__name__)
    from fc2conv.dense.pools import BoxMean

    pools = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    for node in graph.nodes:  # a box filter is the stride-1 average pool it replaced
        box = out.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(box, BoxMean):
            kernel: Any = box.kernel
            out.add_submodule(str(node.target), pools[len(kernel) - 1](kernel, 1))
    return out


class _Recorder(fx.Interpreter):
    """Per node on fake tensors: its output's shape, elements and FLOPs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shape: dict[str, tuple[int, ...]] = {}
        self.work: dict[str, float] = {}
        self.numel: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shape[n.name] = tuple(out.shape)
            self.numel[n.name] = out.numel()
            if n.op not in ("placeholder", "get_attr"):
                read = sum(self.numel.get(a.name, 0) for a in n.all_input_nodes
                           if a.op != "get_attr")
                window = 1
                if n.op == "call_module":  # a pool reads its window per output element
                    kernel = getattr(self.module.get_submodule(str(n.target)), "kernel_size",
                                     None)
                    if kernel is not None and not counter.get_total_flops():
                        window = math.prod(kernel) if isinstance(kernel, tuple) else int(
                            kernel) ** (len(out.shape) - 2)
                self.work[n.name] = float(counter.get_total_flops()) + ELEMENT * (
                    read + window * out.numel())
        return out


def _record(gm: fx.GraphModule, shape: Sequence[int]) -> _Recorder:
    from torch._subclasses.fake_tensor import FakeTensorMode

    rec = _Recorder(gm)
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        rec.run(torch.empty(1, *shape, dtype=dtype))
    return rec


def profile(gm: fx.GraphModule, trace_shape: Sequence[int], image_shape: Sequence[int],
            field: Any) -> tuple[Profile, list[str]]:
    """``(the planner's Profile, the candidate cuts' node names)`` of a dense net on the CPU
    (see the module); ``field`` is the whole net's receptive field (its last boundary)."""
    from fc2conv.pytorch import receptive_field

    dims = len(image_shape) - 1
    names = cuts(gm)
    # a multiple of the total stride, which every node's stride divides
    probe = tuple(-(-(max(n, s) + 2 * j) // j) * j for n, s, j in zip(
        trace_shape[1:], field.size, field.stride, strict=True))
    small = _record(gm, (image_shape[0], *probe))
    large = _record(gm, (image_shape[0], *(2 * p for p in probe)))
    full = _record(gm, image_shape)

    def stride(name: str) -> tuple[int, ...] | None:
        a, b = small.shape.get(name), large.shape.get(name)
        if a is None or b is None or len(a) != dims + 2:
            return None
        diffs = [y - x for x, y in zip(a[2:], b[2:], strict=True)]
        if min(diffs) < 1 or any(p % d for p, d in zip(probe, diffs, strict=True)):
            return None
        return tuple(p // d for p, d in zip(probe, diffs, strict=True))

    candidates: list[str] = []
    seen: tuple[int, ...] = (1,) * dims
    for name in names:
        j = stride(name)
        if j is not None and j != seen and all(x >= y for x, y in zip(j, seen, strict=True)):
            candidates.append(name)
            seen = j
    order = [n.name for n in gm.graph.nodes]
    result = _result(next(n for n in gm.graph.nodes if n.op == "output"))
    if not isinstance(result, fx.Node):
        raise Fc2ConvError("the net cannot be split into stages: it returns no single tensor")
    out_name = result.name
    boundaries = [Boundary((1,) * dims, (1,) * dims, (0,) * dims, int(image_shape[0]),
                           tuple(int(n) for n in image_shape[1:]))]
    kept: list[str] = []
    for name in candidates:
        head = split(gm, [name])[0]
        try:
            rf = receptive_field(out_of_place(head), tuple(trace_shape))
        except Fc2ConvError:
            continue
        shape = full.shape[name]
        boundaries.append(Boundary(tuple(rf.size), tuple(rf.stride),
                                   tuple(-p for p in rf.padding), int(shape[1]),
                                   tuple(shape[2:])))
        kept.append(name)
    shape = full.shape[out_name]
    boundaries.append(Boundary(tuple(field.size), tuple(field.stride),
                               tuple(-p for p in field.padding), int(shape[1]),
                               tuple(shape[2:])))
    ends = [*kept, out_name]
    segments = []
    begin = 0
    for end in ends:
        stop = order.index(end) + 1
        inside = order[begin:stop]
        cells = [math.prod(rec.shape[end][2:]) for rec in (small, large)]
        slope = max(cells[1] - cells[0], 1)
        work = sum(large.work.get(n, 0.0) for n in inside) - sum(
            small.work.get(n, 0.0) for n in inside)
        peak = max(large.numel.get(n, 0) for n in inside) - max(
            small.numel.get(n, 0) for n in inside)
        segments.append(Segment(max(work, 0.0) / slope, 4.0 * max(peak, 0) / slope))
        begin = stop
    return Profile(tuple(boundaries), tuple(segments)), kept
