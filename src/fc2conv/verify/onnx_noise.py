"""The rounding noise of an ONNX model, measured op by op (see :mod:`fc2conv.verify.noise`).

Model A's weights and inputs are exact (its float64 twin uses the very same values); what
rounds are its ops. So the float64 copy of the graph is run with every rounding op's result
``y`` replaced by ``y (1 + sqrt(n) u ξ)``, ``ξ ~ N(0, 1)`` per element, where ``n`` is the
number of terms that op sums per output element (its own reduction length, read from the
shapes of its inputs on the draw: ``K`` of a MatMul/Gemm, ``C·kh·kw`` of a Conv, the reduced
extent of a Reduce*/Softmax/LayerNormalization/pooling, 1 for a pointwise op such as ``Add``,
``Exp`` or ``Div``). Ops that compute exactly (layout, selection, comparisons, ReLU, max
pooling) are left alone. The constant weight of a MatMul/Gemm/Conv is also perturbed by
``sqrt(n) u ξ`` per element: a dot product whose terms cancel rounds in proportion to
``‖w ⊙ x‖``, not to ``|y|`` (Higham & Mary 2019, the probabilistic bound ``~sqrt(n) u``).

This covers the ops the weight-and-input perturbation misses (attention scores, softmax,
LayerNorm and RMSNorm statistics, residual adds), with each op's own ``n`` rather than the
model's longest reduction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fc2conv.verify.spread import accumulate

_EXACT = {
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant", "Shape",
    "Gather", "GatherElements", "GatherND", "Concat", "Slice", "ConstantOfShape", "Expand",
    "Range", "Size", "Split", "Tile", "Pad", "Relu", "MaxPool", "GlobalMaxPool", "Max", "Min",
    "ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "Where", "Neg", "Abs", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Sign", "Clip",
    "Floor", "Ceil", "Round", "Dropout", "ScatterND", "ScatterElements", "Trilu", "NonZero",
    "TopK", "Resize", "DepthToSpace", "SpaceToDepth", "CumSum", "OneHot", "If", "Loop", "Scan",
    "IsNaN", "IsInf", "Mod", "BitShift", "Cast", "CastLike",
}
_WEIGHTED = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


def _length(node: Any, shapes: dict[str, tuple[int, ...]]) -> int:
    """Terms summed per output element by ``node`` (1 for a pointwise op)."""
    op = node.op_type
    ins = [shapes.get(name, ()) for name in node.input]
    out = shapes.get(node.output[0], ()) if node.output else ()
    attrs = {a.name: a for a in node.attribute}
    first = ins[0] if ins else ()
    if op == "MatMul" and first:
        return int(first[-1])
    if op == "Gemm" and len(first) == 2:
        trans = "transA" in attrs and attrs["transA"].i
        return int(first[0] if trans else first[1]) + (len(node.input) > 2)
    if op in ("Conv", "ConvTranspose") and len(ins) > 1 and len(ins[1]) >= 2:
        return int(math.prod(ins[1][1:])) + (len(node.input) > 2)
    if op in ("Softmax", "LogSoftmax") and first:
        axis = attrs["axis"].i if "axis" in attrs else -1
        return int(first[axis])
    if op == "LayerNormalization" and first:
        axis = attrs["axis"].i if "axis" in attrs else -1
        return int(math.prod(first[axis:]))
    if first and out and 0 < math.prod(out) < math.prod(first):
        return int(math.prod(first) // math.prod(out))  # reductions, pooling, normalizations
    if op == "Einsum" and first:
        return int(max(first))
    return 1


def _rounding_nodes(graph: Any) -> list[int]:
    return [k for k, n in enumerate(graph.node)
            if n.op_type not in _EXACT and n.output and n.output[0] and not n.domain]


def _shapes(model64: Any, feeds: dict[str, np.ndarray]) -> tuple[dict[str, tuple[int, ...]],
                                                                  set[str]]:
    """The shape of every value the rounding nodes read or write, on these inputs, and the
    names of those that hold integers (shape arithmetic: exact)."""
    from onnx import helper

    from fc2conv.verify.onnx_float64 import Float64Runner

    g = model64.graph
    names = {o.name for o in g.output}
    wanted: list[str] = []
    for k in _rounding_nodes(g):
        for name in [*g.node[k].input, g.node[k].output[0]]:
            if name and name not in wanted:
                wanted.append(name)
    inits = {i.name: tuple(i.dims) for i in g.initializer}
    probe = type(model64)()
    probe.CopyFrom(model64)
    for name in wanted:
        if name not in names and name not in inits and name not in feeds:
            probe.graph.output.append(helper.ValueInfoProto(name=name))
    out_names = [o.name for o in probe.graph.output]
    values = Float64Runner(probe, out_names).run(feeds)
    shapes = {n: tuple(np.shape(v)) for n, v in zip(out_names, values, strict=True)}
    ints = {n for n, v in zip(out_names, values, strict=True) if np.asarray(v).dtype.kind != "f"}
    shapes.update(inits)
    shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
    return shapes, ints


def shaken_graph(model64: Any, shapes: dict[str, tuple[int, ...]], ints: set[str], u: float,
                 rng: np.random.Generator) -> Any:
    """A copy of the float64 graph ``model64`` whose rounding ops' results are multiplied by
    ``1 + sqrt(n) u ξ`` and whose MatMul/Gemm/Conv weights by ``1 + sqrt(n) u ξ'``."""
    from onnx import TensorProto, helper, numpy_helper

    shaken = type(model64)()
    shaken.CopyFrom(model64)
    g = shaken.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes: list[Any] = []
    done_weights: set[str] = set()
    rounding = set(_rounding_nodes(g))
    for k, node in enumerate(g.node):
        new_nodes.append(node)
        if k not in rounding or node.output[0] in ints:
            continue
        n = max(_length(node, shapes), 1)
        scale = math.sqrt(n) * u
        if node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] in inits \
                and node.input[1] not in done_weights:
            init = inits[node.input[1]]
            if init.data_type == TensorProto.DOUBLE:
                w = numpy_helper.to_array(init)
                w = w * (1 + scale * rng.standard_normal(w.shape))
                init.CopyFrom(numpy_helper.from_array(w, init.name))
                done_weights.add(init.name)
        y = node.output[0]
        raw, noise, delta = f"{y}__raw", f"{y}__xi", f"{y}__delta"
        node.output[0] = raw
        seed = float(rng.integers(1, 2**31 - 1))
        new_nodes += [
            helper.make_node("RandomNormalLike", [raw], [noise], mean=0.0, scale=scale,
                             seed=seed),
            helper.make_node("Mul", [raw, noise], [delta]),
            helper.make_node("Add", [raw, delta], [y]),
        ]
    del g.node[:]
    g.node.extend(new_nodes)
    return shaken


def _float64_twin(model: Any) -> Any:
    """The float64 twin of the ONNX model A with every weight inline (the perturbation below
    reads weights as initializers): the skeleton and float64 weights its reference runs already
    built (``model.cache``, see :func:`fc2conv.verify.onnx_backend.run`), joined; built here
    only when no reference run has cached them."""
    from onnx import TensorProto, numpy_helper

    from fc2conv.verify import onnx_weights as ow

    cache = model.cache
    if ("twin", "reference") in cache:
        skeleton, weights = cache[("twin", "reference")]
    else:
        if "split" not in cache:
            cache["split"] = ow.split(model.onnx_model, cache.get("base_dir"))
        skel, arrays = cache["split"]
        skeleton = ow.float64_skeleton(skel, magnitude=False)
        weights = ow.float64_weights(skel, arrays, magnitude=False)
    twin = type(skeleton)()
    twin.CopyFrom(skeleton)  # cheap: the skeleton holds no large tensor
    for init in twin.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL and init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return twin


def onnx_noise(model: Any, draws: list[tuple[torch.Tensor, ...]], u: float, trials: int, *,
               exact: list[list[torch.Tensor]] | None = None,
               only: set[int] | None = None) -> list[list[Any]]:
    """Per draw, per output: the elementwise max over ``trials`` of ``|ỹ - y|`` (float64
    tensors; ``0.0`` for integer outputs), ``ỹ`` the op-by-op perturbed float64 run of the
    ONNX model A (a :class:`~fc2conv.verify.models.Model`) and ``y`` its float64 reference
    (``exact``, per draw, when the caller has it). ``only``: the draws to measure (the others
    get ``0.0``).

    The ``trials`` perturbed graphs are built once per input shape and each runs every draw
    of that shape (its onnxruntime session reused): each draw still meets ``trials``
    independent perturbations."""
    from fc2conv.verify import onnx_backend
    from fc2conv.verify.onnx_float64 import Float64Runner

    proto = model.onnx_model
    wanted = [k for k in range(len(draws)) if only is None or k in only]
    exact_runs: dict[int, list[torch.Tensor]] = {
        k: list(exact[k]) if exact is not None else model.run(draws[k], "reference").outputs
        for k in wanted}
    n_out = len(proto.graph.output)
    noise: list[list[Any]] = [[0.0] * n_out for _ in draws]
    if not wanted:
        return noise
    model64 = _float64_twin(model)  # after the reference runs, which cache its weights
    out_names = [o.name for o in proto.graph.output]
    rng = np.random.default_rng(0)
    shaken: dict[tuple[tuple[int, ...], ...], list[Any]] = {}
    for k in wanted:
        feeds = onnx_backend._feeds(proto, draws[k], "reference")
        key = tuple(tuple(v.shape) for v in feeds.values())
        if key not in shaken:
            shapes, ints = _shapes(model64, feeds)
            shaken[key] = [Float64Runner(shaken_graph(model64, shapes, ints, u, rng), out_names)
                           for _ in range(trials)]
        for runner in shaken[key]:
            got = [torch.from_numpy(np.asarray(v)) for v in runner.run(feeds)]
            accumulate(noise[k], got, exact_runs[k])
    return noise
