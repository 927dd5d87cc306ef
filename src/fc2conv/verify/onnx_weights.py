"""An ONNX model's weights held once, as numpy arrays, beside a graph *skeleton* without them.

``compare`` runs each ONNX model several ways (natively, its float64 twin, its magnitude twin,
with layer outputs captured, with shaken weights). Copying the ModelProto for each (and
serializing it for onnxruntime, which also stops at protobuf's 2 GB) made memory and time grow
with the number of runs. Instead:

- :func:`split` reads every large initializer once into a numpy array and returns a skeleton
  in which those initializers are external-data stubs (name, type, shape, no bytes);
- the deployed onnxruntime session gets the arrays through
  ``SessionOptions.add_external_initializers`` (it copies them into its graph, and packs
  MatMul weights: the model as users deploy it), or, for a file with external data, loads
  that file itself (:func:`fc2conv.verify.onnx_backend._deployed`). The caller's buffers
  cannot stand in for its copy: ``add_initializer`` (no copy) needs a real initializer in the
  graph, and the graph optimizers read that one, not the buffer (a 1x1-Conv model's reordered
  weights came out of the placeholder's bytes: wrong results), and without pre-packing MatMul
  rounds differently (1.2e-6 apart on a 4096-wide MLP, onnxruntime 1.32): not as deployed.
  Other sessions and onnx's evaluator get the arrays as extra inputs, not copied;
- :func:`float64_skeleton` makes the float64 twin (``W -> float64(W)``) and the magnitude twin
  (``W -> |W|``, batch-norm means ``-|mean|``, variances kept) of the graph, and
  :func:`read_through` lets such a twin read the model's own arrays: each stub becomes a node
  ``W = Cast(W::stored)`` (then ``Abs``, ``Neg``) run when the graph runs, so a twin holds no
  weights of its own; only the weights of the node running (and the ones onnxruntime schedules
  beside it) exist in float64 at a time, and are freed after it. The float64 values are the
  same, ``float64(w)`` is exact, and so is ``|w|``. :func:`float64_weights` still makes a
  twin's arrays at once, for callers that need them inline (the noise twin).

Small initializers (shape constants, biases under 64 KiB) stay inline in the skeleton. Data
kept outside the ``.onnx`` file (external data) is memory-mapped, not read: file pages the
kernel can drop, not memory of this process's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from fc2conv.errors import Fc2ConvError

SMALL_BYTES = 1 << 16
STUB_FILE = "fc2conv-in-memory.bin"
# a twin's stub says how its value derives from the model's array: "value" (the same number,
# in the twin's type), "abs" (|w|) or "-abs" (-|w|, batch-norm means in the magnitude twin)
DERIVE = "fc2conv.twin"
STORED = "::stored"  # suffix of the input that feeds a stub's array to :func:`read_through`
# arrays a twin reads through a Cast (numpy and onnxruntime both know them)
CASTABLE = {np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.float32): TensorProto.FLOAT,
            np.dtype(np.float64): TensorProto.DOUBLE}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# 1-Lipschitz with |f(x)| <= |x|: in the magnitude twin the magnitude passes through unchanged
# (tanh(M) would shrink it below the error it must carry)
MAGNITUDE_IDENTITY = {"Tanh", "Softsign", "Elu", "Celu", "LeakyRelu", "PRelu", "HardTanh",
                      "Clip"}


def _stub(name: str, data_type: int, dims: Any, nbytes: int, derive: str | None = None) -> Any:
    t = TensorProto(name=name, data_type=data_type, dims=list(dims),
                    data_location=TensorProto.EXTERNAL)
    entries = [("location", STUB_FILE), ("offset", "0"), ("length", str(nbytes))]
    for key, value in entries + ([(DERIVE, derive)] if derive else []):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _shell(proto: Any) -> Any:
    """A copy of ``proto`` without its initializers (the only part that is large)."""
    model = onnx.ModelProto()
    for src, dst in ((proto, model), (proto.graph, model.graph)):
        for desc, value in src.ListFields():
            if desc.name in ("graph", "initializer"):
                continue
            if hasattr(value, "extend") and not isinstance(value, str | bytes):
                getattr(dst, desc.name).extend(value)
            elif desc.message_type:
                getattr(dst, desc.name).CopyFrom(value)
            else:
                setattr(dst, desc.name, value)
    return model


def split(proto: Any, base_dir: Path | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """``(skeleton, arrays)``: large initializers read once into ``arrays`` and left in the
    skeleton as stubs; small ones copied inline. Tensors whose data is external (in a file
    beside the model in ``base_dir``) are mapped read-only, not read."""
    skel = _shell(proto)
    arrays: dict[str, np.ndarray] = {}
    for init in proto.graph.initializer:
        external = init.data_location == TensorProto.EXTERNAL
        if not external and init.ByteSize() < SMALL_BYTES:
            skel.graph.initializer.add().CopyFrom(init)
            continue
        arr = _mapped(init, base_dir) if external else \
            np.ascontiguousarray(numpy_helper.to_array(init))
        arrays[init.name] = arr
        skel.graph.initializer.append(_stub(init.name, init.data_type, init.dims, arr.nbytes))
    return skel, arrays


def _open_checked() -> Any:
    """onnx's own opener of external data (refuses absolute paths, '..' and symlinks with the
    checker's reason), or None in an onnx without it."""
    from onnx import external_data_helper as edh

    return getattr(edh, "_open_external_data_fd", None)


def load_mapped(path: Path) -> Any:
    """``onnx.load(path)`` leaving external data on disk, each location checked by onnx the
    way ``onnx.load`` checks it; with an onnx that cannot check, the data is loaded."""
    import os

    from onnx import external_data_helper as edh

    opener = _open_checked()
    if opener is None:
        return onnx.load(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in edh._get_all_tensors(proto):
        if edh.uses_external_data(tensor):
            info = edh.ExternalDataInfo(tensor)
            os.close(opener(str(path.parent), info.location, tensor.name, True))
    return proto


def _mapped(init: Any, base_dir: Path | None) -> np.ndarray:
    """The external data of ``init``, memory-mapped read-only (no copy in this process)."""
    import os

    from onnx import external_data_helper as edh

    info = edh.ExternalDataInfo(init)
    folder = str(base_dir or Path.cwd())
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    shape = tuple(int(d) for d in init.dims)
    opener = _open_checked()
    try:
        fd = opener(folder, info.location, init.name, True) if opener else \
            os.open(Path(folder) / info.location, os.O_RDONLY)
    except FileNotFoundError:
        raise Fc2ConvError(f"initializer '{init.name}' keeps its data in {info.location}, "
                           f"which does not exist in {folder} (keep the model's external data "
                           "file beside it)") from None
    with os.fdopen(fd, "rb") as f:
        offset = int(info.offset or 0)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if os.fstat(f.fileno()).st_size < offset + nbytes:
            raise Fc2ConvError(f"initializer '{init.name}' needs {nbytes} bytes at offset "
                               f"{offset} of {info.location}, which is shorter")
        if dtype.kind not in "fiub" or nbytes == 0:
            f.seek(offset)
            return np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape).copy()
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)


def _bn_inputs(graph: Any) -> tuple[set[str], set[str]]:
    bn = [n for n in graph.node if n.op_type == "BatchNormalization" and len(n.input) >= 5]
    return {n.input[3] for n in bn}, {n.input[4] for n in bn}


def _derive(name: str, magnitude: bool, means: set[str], variances: set[str]) -> str:
    if magnitude and name in means:
        return "-abs"  # BN: (x - mean) -> x + |mean|
    if magnitude and name not in variances:
        return "abs"
    return "value"


def _twin_value(arr: np.ndarray, name: str, magnitude: bool, means: set[str],
                variances: set[str], np_type: Any = np.float64) -> np.ndarray:
    return _derived(arr, _derive(name, magnitude, means, variances), np_type)


def _derived(arr: np.ndarray, derive: str, np_type: Any) -> np.ndarray:
    arr = arr.astype(np_type)  # a fresh array: made |.| in place, no second copy
    if derive == "-abs":
        return np.negative(np.abs(arr, out=arr), out=arr)
    if derive == "abs":
        return np.abs(arr, out=arr)
    return arr


def float64_skeleton(skel: Any, magnitude: bool, *, single: bool = False) -> Any:
    """The float64 (or magnitude) twin of a skeleton: float stubs typed double, small float
    initializers and Constant tensors cast (``|.|`` for magnitude), value types and
    ``Cast``-to-float targets double; for magnitude, 1-Lipschitz activations become Identity.
    ``single``: the same twin in float32 instead (for :func:`single_precision_ok` graphs)."""
    target, np_type = (TensorProto.FLOAT, np.float32) if single else \
        (TensorProto.DOUBLE, np.float64)
    model = onnx.ModelProto()
    model.CopyFrom(skel)  # cheap: the skeleton holds no large tensor
    g = model.graph
    means, variances = _bn_inputs(g)
    for init in g.initializer:
        if init.data_type not in FLOAT_TYPES:
            continue
        if init.data_location == TensorProto.EXTERNAL:
            count = int(np.prod(init.dims)) if init.dims else 1
            size = np.dtype(np_type).itemsize
            init.CopyFrom(_stub(init.name, target, init.dims, size * count,
                                _derive(init.name, magnitude, means, variances)))
        else:
            arr = _twin_value(numpy_helper.to_array(init), init.name, magnitude, means,
                              variances)
            init.CopyFrom(numpy_helper.from_array(arr.astype(np_type), init.name))
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type in FLOAT_TYPES:
            vi.type.tensor_type.elem_type = target
    for node in g.node:
        if magnitude and node.op_type in MAGNITUDE_IDENTITY:
            node.op_type = "Identity"
            del node.attribute[:]
            del node.input[1:]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in FLOAT_TYPES:
                attr.i = target
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in FLOAT_TYPES:
                arr = numpy_helper.to_array(attr.t).astype(np.float64)
                arr = (np.abs(arr) if magnitude else arr).astype(np_type)
                attr.t.CopyFrom(numpy_helper.from_array(arr))
    return model


def float64_weights(skel: Any, arrays: dict[str, np.ndarray],
                    magnitude: bool, *, single: bool = False) -> dict[str, np.ndarray]:
    """The stubbed arrays of the float64 (or magnitude) twin (``single``: in float32), made
    at once (``2 W`` for float32 weights ``W``; :func:`read_through` makes none); integer
    arrays are shared."""
    means, variances = _bn_inputs(skel.graph)
    np_type = np.float32 if single else np.float64
    return {name: _twin_value(arr, name, magnitude, means, variances, np_type)
            if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16" else arr
            for name, arr in arrays.items()}


def read_through(model: Any, arrays: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
    """``(model', feeds)``: the twin ``model`` (from :func:`float64_skeleton`, its stubs marked
    with how they derive from the model's arrays) reading ``arrays`` (the model's own, as
    :func:`split` holds them) through nodes at the top of its graph::

        W = Cast(W::stored, to=twin's type)        "value"
        W = Abs(Cast(W::stored))                   "abs"  (|w|)
        W = Neg(Abs(Cast(W::stored)))              "-abs" (batch-norm means)

    (no Cast when the types agree; no node at all for a "value" stub of the array's type: fed
    as it is). ``feeds`` holds the arrays under their ``::stored`` names: the same arrays, no
    copy. The values are those :func:`float64_weights` makes (a cast up and ``|.|`` are exact),
    computed when the graph runs: onnxruntime frees each after its last use, and schedules a
    node with no inputs of the graph's own (these) just before the node that needs it when it
    comes first in the node list (measured: ``bench/verdicts_scale.py``). Arrays of another
    float type (bfloat16) are cast here, once, as before. Unmarked stubs and other arrays are
    fed as they are."""
    out = onnx.ModelProto()
    out.CopyFrom(model)  # cheap: a skeleton
    g = out.graph
    feeds = dict(arrays)
    top: list[Any] = []
    for init in g.initializer:
        marks = {e.key: e.value for e in init.external_data}
        arr = arrays.get(init.name)
        if init.data_location != TensorProto.EXTERNAL or DERIVE not in marks or arr is None:
            continue
        derive, name = marks[DERIVE], init.name
        if arr.dtype not in CASTABLE:  # bfloat16 and the like: made once, in the twin's type
            if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
                np_type = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                feeds[name] = _derived(arr, derive, np_type)
            continue
        stored = CASTABLE[arr.dtype]
        if stored == init.data_type and derive == "value":
            continue
        value, target = name + STORED, int(init.data_type)
        del feeds[name]
        feeds[value] = arr
        init.CopyFrom(_stub(value, stored, init.dims, arr.nbytes))
        steps = ["Cast"] if target != stored else []
        steps += ["Abs"] if derive in ("abs", "-abs") else []
        steps += ["Neg"] if derive == "-abs" else []
        for k, op in enumerate(steps):
            result = name if k == len(steps) - 1 else f"{name}::{op.lower()}"
            node = onnx.helper.make_node(op, [value], [result])
            if op == "Cast":
                node.attribute.append(onnx.helper.make_attribute("to", target))
            top.append(node)
            value = result
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(top + nodes)
    return out, feeds


# ops that, on non-negative inputs and weights (as in the magnitude twin), sum or scale
# non-negative terms and are non-decreasing in every float input (Div only by a constant)
MONOTONE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Sum", "Mul", "Relu",
                "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceSum",
                "ReduceMean", "ReduceMax", "BatchNormalization", "Pad", "Div", "Max"}


def single_precision_ok(skel: Any, exact_ops: set[str]) -> bool:
    """Whether the magnitude twin of ``skel`` may run in float32: every float in the graph
    fits float32 exactly (float32, float16, bfloat16: no double initializer, value, input or
    Cast), so ``|W|`` and ``|x|`` are exact there, and every op other than ``exact_ops``
    (layout) is in :data:`MONOTONE_OPS` once the 1-Lipschitz activations are Identity: then
    each op's float32 result is within a relative ``γ`` below its float64 one, whatever its
    inputs' (smaller) values, so the float64 magnitude is bounded from the float32 one."""
    g = skel.graph
    consts = {i.name for i in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    if any(i.data_type == TensorProto.DOUBLE for i in g.initializer):
        return False
    if any(vi.type.tensor_type.elem_type == TensorProto.DOUBLE
           for vi in [*g.input, *g.output, *g.value_info]):
        return False
    for node in g.node:
        op = "Identity" if node.op_type in MAGNITUDE_IDENTITY else node.op_type
        if node.domain not in ("", "ai.onnx") or (
                op not in exact_ops and op not in MONOTONE_OPS and op != "Identity"):
            return False
        if op == "Div" and (len(node.input) < 2 or node.input[1] not in consts):
            return False
        if op == "Pad" and any(a.name == "mode" and a.s not in (b"", b"constant")
                               for a in node.attribute):
            return False
        for attr in node.attribute:
            if op == "Gemm" and attr.name in ("alpha", "beta") and attr.f < 0:
                return False
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.DOUBLE:
                return False
            if attr.type == onnx.AttributeProto.TENSOR and \
                    attr.t.data_type == TensorProto.DOUBLE:
                return False
    return True


def as_inputs(model: Any) -> Any:
    """``model`` with its stubs turned into graph inputs (for onnx's evaluator, which takes the
    arrays as feeds)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    stubs = [t for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
    keep = [t for t in g.initializer if t.data_location != TensorProto.EXTERNAL]
    del g.initializer[:]
    g.initializer.extend(keep)
    for t in stubs:
        g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out
