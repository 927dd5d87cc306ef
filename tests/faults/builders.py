"""Model files for the fault tier: a small MLP in ONNX and .pt2, hostile external data, big ones.

Shared by ``tests/faults`` and ``bench/faults.py`` (which puts ``tests/faults`` on its path).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _external_tensor(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(shape)
    return t


def mlp_onnx(rng: np.random.Generator, features: int = 8, hidden: int = 16,
             classes: int = 4) -> onnx.ModelProto:
    """x (N, features) -> Gemm -> Relu -> MatMul + Add: a model ``convert --to conv`` rewrites."""
    w1 = numpy_helper.from_array(rng.standard_normal((hidden, features)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["y"], name="bias2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        [w1, b1, w2, b2],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def big_onnx(path: Path, megabytes: int = 220, seed: int = 0) -> Path:
    """A ``features -> hidden -> classes`` MLP with ~``megabytes`` of weights in external data
    ``<name>.data`` (written tensor by tensor, never the whole model in memory)."""
    rng = np.random.default_rng(seed)
    layers = 4
    width = int((megabytes * 1_000_000 / 4 / layers) ** 0.5)  # four (width, width) weights
    nodes, inits, prev = [], [], "x"
    data = path.with_name(path.name + ".data")
    offset = 0
    with open(data, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32) * 0.01
            raw = w.tobytes()
            f.write(raw)
            t = _external_tensor(f"w{i}", w.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)),
                         ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
            prev = f"h{i}"
            del w, raw
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", width])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())
    return path


def hostile_onnx(folder: Path, kind: str) -> Path:
    """A model whose external data points outside its folder: ``kind`` is ``dotdot``
    (``../../secret``), ``absolute`` (``/…/secret``) or ``symlink`` (a link to ``../secret``)."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder.parent / "secret.bin"
    w = np.arange(32, dtype=np.float32).reshape(4, 8)
    secret.write_bytes(w.tobytes())
    if kind == "dotdot":
        location = os.path.relpath(secret, folder)
    elif kind == "absolute":
        location = str(secret.resolve())
    elif kind == "symlink":
        link = folder / "weights.bin"
        link.symlink_to(secret)
        location = link.name
    else:
        raise ValueError(kind)
    t = _external_tensor("w", w.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [t],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = folder / f"{kind}.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def small_pt2(path: Path, seed: int = 0) -> Path:
    """A torch.export program of a small classifier on (N, 3, 8, 8) images:
    Conv 3x3 -> ReLU -> Flatten -> Linear -> ReLU -> Linear (convert and convolutionalize it)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                          nn.ReLU(), nn.Linear(8, 5)).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    torch.export.save(ep, str(path))
    return path
