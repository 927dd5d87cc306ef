"""Generate the zoo's ONNX graphs from exporters other than torch (run ONCE; not run by tests).

The files it writes next to itself are committed; the tests only read them. Each model gets

* ``<name>.onnx`` — the exported graph (random but fixed weights, each file well under 1 MB);
* ``<name>.npz`` — a few fixed input draws and the generating framework's OWN outputs on them
  (float32), keys ``in{k}__{input name}`` and ``out{k}__{output name}`` for draw ``k``
  (``tests/zoo/zoo_models.py: foreign_draws`` reads them back).

How to run (in a throw-away venv; tensorflow is far too heavy for the project's test extra)::

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx scikit-learn skl2onnx onnx onnxruntime
    /tmp/tfenv/bin/python tests/zoo/foreign/make_foreign.py

Versions the committed files were made with (Python 3.11.7): tensorflow-cpu 2.21.0,
keras 3.15.1, tf2onnx 1.17.0, scikit-learn 1.9.1, skl2onnx 1.20.0, onnx 1.23.2, numpy 2.4.6,
protobuf 7.36.2. Re-running reproduces every ``.npz`` and every weight bit for bit; tf2onnx may
name a few shape constants differently (``const_axes__28`` vs ``...__27``), nothing else.

Keras 3 notes: ``tf2onnx.convert.from_keras`` does not work on Keras 3 models (it expects the
tf.keras 2 model API), so every Keras model is wrapped in a ``tf.function`` with an explicit
``input_signature`` and exported with ``tf2onnx.convert.from_function`` — as the issue says.
Keras tensors are NHWC (channels last); tf2onnx keeps the NHWC graph input and inserts
Transposes around the NCHW ONNX Conv/MaxPool.

The hand-built graphs (``hand_*``) are written with ``onnx.helper`` to mimic layouts other
exporters emit (MatMul on a Transpose of a stored (out, in) weight; Gemm with transB=0 and
alpha/beta != 1; Gemm with transA=1). They are NOT the output of any exporter; their "framework
outputs" are plain numpy in float64, rounded to float32.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OPSET = 17
DRAW_BATCHES = (1, 3, 4)


def _save(name: str, model: onnx.ModelProto, draws: list[tuple[dict[str, np.ndarray],
                                                              dict[str, np.ndarray]]]) -> None:
    """Check, write ``name.onnx`` and ``name.npz`` (inputs and the framework's outputs)."""
    onnx.checker.check_model(model, full_check=True)
    path = HERE / f"{name}.onnx"
    onnx.save(model, path)
    arrays: dict[str, np.ndarray] = {}
    for k, (ins, outs) in enumerate(draws):
        for key, val in ins.items():
            arrays[f"in{k}__{key}"] = val
        for key, val in outs.items():
            arrays[f"out{k}__{key}"] = val
    np.savez(HERE / f"{name}.npz", **arrays)  # type: ignore[arg-type]
    size = path.stat().st_size
    assert size < 1_000_000, f"{name}.onnx is {size} bytes"
    print(f"{name}: {size} bytes, inputs {[i.name for i in model.graph.input]}, "
          f"outputs {[o.name for o in model.graph.output]}, "
          f"opsets {[(o.domain, o.version) for o in model.opset_import]}")


# --------------------------------------------------------------------------------- tf2onnx
def _keras_models() -> dict[str, tuple[Callable[[], object], tuple[int | None, ...]]]:
    import keras
    from keras import layers

    def mlp() -> object:
        return keras.Sequential([
            keras.Input((20,)),
            layers.Dense(32, activation="relu"),
            layers.Dense(16, activation="tanh"),
            layers.Dense(5),
        ])

    def cnn_flatten() -> object:
        return keras.Sequential([
            keras.Input((12, 12, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(6, 3, padding="same", activation="relu"),
            layers.Flatten(),  # (B, 5, 5, 6) NHWC -> 150 features, in H, W, C order
            layers.Dense(16, activation="relu"),
            layers.Dense(4),
        ])

    def cnn_gap() -> object:
        return keras.Sequential([
            keras.Input((16, 16, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.Conv2D(12, 3, strides=2, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4),
        ])

    def seq_dense() -> object:
        return keras.Sequential([
            keras.Input((6, 10)),
            # Dense on (B, S, C) acts on the last axis. Exact gelu lowers to tf Erfc, which
            # tf2onnx 1.17 cannot convert ("Tensorflow op Erfc is not supported"): use tanh gelu.
            layers.Dense(16, activation=lambda t: keras.activations.gelu(t, approximate=True)),
            layers.Dense(8),
        ])

    return {
        "tf_mlp": (mlp, (20,)),
        "tf_cnn_flatten": (cnn_flatten, (12, 12, 3)),
        "tf_cnn_gap": (cnn_gap, (16, 16, 3)),
        "tf_seq_dense": (seq_dense, (6, 10)),
    }


def make_tf2onnx(rng: np.random.Generator) -> None:
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    for name, (build, shape) in _keras_models().items():
        model = build()
        # give the biases random values too (Keras initializes them to zero)
        for layer in model.layers:  # type: ignore[attr-defined]
            ws = layer.get_weights()
            if ws:
                layer.set_weights([ws[0], *(0.1 * rng.standard_normal(w.shape).astype(np.float32)
                                            for w in ws[1:])])
        spec = tf.TensorSpec((None, *shape), tf.float32, name="x")

        @tf.function(input_signature=[spec])
        def fn(x: tf.Tensor, model: object = model) -> tf.Tensor:
            return model(x, training=False)  # type: ignore[operator]

        proto, _ = tf2onnx.convert.from_function(fn, input_signature=[spec], opset=OPSET)
        out_name = proto.graph.output[0].name
        in_name = proto.graph.input[0].name
        draws = []
        for batch in DRAW_BATCHES:
            x = rng.standard_normal((batch, *shape)).astype(np.float32)
            y = np.asarray(model(x, training=False), dtype=np.float32)  # type: ignore[operator]
            draws.append(({in_name: x}, {out_name: y}))
        _save(name, proto, draws)


# --------------------------------------------------------------------------------- skl2onnx
def make_skl2onnx(rng: np.random.Generator) -> None:
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    n_feat = 10
    x_fit = rng.standard_normal((200, n_feat)).astype(np.float32)
    # One target: skl2onnx 1.20 declares MLPRegressor's output (N, 1) and Reshapes to (-1, 1),
    # so a two-target regressor comes out (2N, 1) instead of (N, 2) (same numbers, row-major).
    y_reg = x_fit[:, :3].sum(1) + np.tanh(x_fit[:, 3] * x_fit[:, 4])
    reg = MLPRegressor(hidden_layer_sizes=(16, 8), activation="relu", max_iter=300, random_state=0)
    reg.fit(x_fit, y_reg)
    y_cls = (x_fit[:, 0] > 0).astype(int) + (x_fit[:, 1] > 0.5).astype(int)  # 3 classes
    cls = MLPClassifier(hidden_layer_sizes=(12,), activation="tanh", max_iter=300, random_state=0)
    cls.fit(x_fit, y_cls)

    proto = to_onnx(reg, x_fit[:1], target_opset={"": OPSET, "ai.onnx.ml": 3})
    in_name = proto.graph.input[0].name
    draws = []
    for batch in DRAW_BATCHES:
        x = rng.standard_normal((batch, n_feat)).astype(np.float32)
        y = reg.predict(x).astype(np.float32).reshape(batch, -1)
        draws.append(({in_name: x}, {proto.graph.output[0].name: y}))
    _save("skl_mlp_regressor", proto, draws)

    proto = to_onnx(cls, x_fit[:1], target_opset={"": OPSET, "ai.onnx.ml": 3},
                    options={id(cls): {"zipmap": False}})
    in_name = proto.graph.input[0].name
    label_name, proba_name = (o.name for o in proto.graph.output)
    draws = []
    for batch in DRAW_BATCHES:
        x = rng.standard_normal((batch, n_feat)).astype(np.float32)
        draws.append(({in_name: x}, {label_name: cls.predict(x).astype(np.int64),
                                     proba_name: cls.predict_proba(x).astype(np.float32)}))
    _save("skl_mlp_classifier", proto, draws)


# --------------------------------------------------------------------------------- hand-built
def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto],
           producer: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, producer, inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name=f"fc2conv hand-built ({producer})")
    m.ir_version = 8
    return m


def make_hand_built(rng: np.random.Generator) -> None:
    f32 = np.float32

    def arr(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(f32)

    # 1. MatMul on Transpose(W) with W stored (out, in) — as some exporters keep torch's
    #    layout and add a Transpose node instead of transposing the initializer.
    w1, b1, w2, b2 = arr(24, 12, scale=0.3), arr(24, scale=0.1), arr(6, 24, scale=0.2), arr(6)
    nodes = [
        helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W1t"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "W2t"], ["y0"]),
        helper.make_node("Add", ["B2", "y0"], ["y"]),  # bias first: commuted Add
    ]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
               [numpy_helper.from_array(a, n) for a, n in
                ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))], "matmul_transposed_weight")

    def mm_t(x: np.ndarray) -> np.ndarray:
        d = np.float64
        h = np.maximum(x.astype(d) @ w1.T.astype(d) + b1, 0)
        return h @ w2.T.astype(d) + b2

    _save("hand_matmul_transposed_weight", m, _draws(rng, {"x": (12,)}, "y", mm_t))

    # 2. Gemm with transB=0 (W stored (in, out)) and alpha/beta != 1, a (1, out) bias, then
    #    Gemm transB=1 with a scalar-ish broadcast bias (out,) and alpha != 1, beta != 1.
    w1, c1 = arr(10, 20, scale=0.3), arr(1, 20, scale=0.1)
    w2, c2 = arr(7, 20, scale=0.2), arr(7, scale=0.1)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "C1"], ["h0"], alpha=0.5, beta=2.0, transB=0),
        helper.make_node("Tanh", ["h0"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "C2"], ["y"], alpha=1.5, beta=0.25, transB=1),
    ]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])],
               [numpy_helper.from_array(a, n) for a, n in
                ((w1, "W1"), (c1, "C1"), (w2, "W2"), (c2, "C2"))], "gemm_alpha_beta")

    def gemm_ab(x: np.ndarray) -> np.ndarray:
        d = np.float64
        h = np.tanh(0.5 * (x.astype(d) @ w1.astype(d)) + 2.0 * c1.astype(d))
        return 1.5 * (h @ w2.T.astype(d)) + 0.25 * c2.astype(d)

    _save("hand_gemm_alpha_beta", m, _draws(rng, {"x": (10,)}, "y", gemm_ab))

    # 3. Gemm with transA=1: the input arrives (features, N) and Gemm transposes it.
    w, c = arr(9, 5, scale=0.3), arr(5, scale=0.1)
    nodes = [helper.make_node("Gemm", ["xt", "W", "C"], ["y"], transA=1, transB=0)]
    m = _model(nodes, [helper.make_tensor_value_info("xt", TensorProto.FLOAT, [9, "N"])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
               [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "C")], "gemm_transA")

    def gemm_ta(xt: np.ndarray) -> np.ndarray:
        d = np.float64
        return xt.astype(d).T @ w.astype(d) + c.astype(d)

    draws = []
    for batch in DRAW_BATCHES:
        xt = rng.standard_normal((9, batch)).astype(f32)
        draws.append(({"xt": xt}, {"y": gemm_ta(xt).astype(f32)}))
    _save("hand_gemm_transA", m, draws)

    # 4. A batched MatMul on a rank-4 NCHW map after a channels-last Transpose (a 1x1-conv
    #    written as MatMul, as TF-style exporters emit for pointwise Dense on images).
    w, b = arr(6, 10, scale=0.3), arr(10, scale=0.1)
    nodes = [
        helper.make_node("Transpose", ["x"], ["xl"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["xl", "W"], ["y0"]),
        helper.make_node("Add", ["y0", "B"], ["y1"]),
        helper.make_node("Transpose", ["y1"], ["y"], perm=[0, 3, 1, 2]),
    ]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 5, 7])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 5, 7])],
               [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
               "pointwise_matmul_nchw")

    def pointwise(x: np.ndarray) -> np.ndarray:
        d = np.float64
        return np.einsum("nchw,co->nohw", x.astype(d), w.astype(d)) + b.astype(d)[:, None, None]

    _save("hand_pointwise_matmul_nchw", m, _draws(rng, {"x": (6, 5, 7)}, "y", pointwise))


def _draws(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], out: str,
           fn: Callable[..., np.ndarray]) -> list[tuple[dict[str, np.ndarray],
                                                         dict[str, np.ndarray]]]:
    draws = []
    for batch in DRAW_BATCHES:
        ins = {k: rng.standard_normal((batch, *s)).astype(np.float32) for k, s in shapes.items()}
        draws.append((ins, {out: fn(*ins.values()).astype(np.float32)}))
    return draws


def main(argv: list[str]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    which = set(argv) or {"tf", "skl", "hand"}
    if "hand" in which:
        make_hand_built(np.random.default_rng(20260903))
    if "skl" in which:
        make_skl2onnx(np.random.default_rng(20260902))
    if "tf" in which:
        make_tf2onnx(np.random.default_rng(20260901))


if __name__ == "__main__":
    main(sys.argv[1:])
