"""compare's per-draw speed-ups must not change what it computes (issue 9, requirement 7).

Behaviour only, against float64 references computed here independently: the running bound's
products of magnitudes, run in float32 and raised (:func:`fc2conv.verify.running.upper_product`),
still bound the exact float64 products from above and only by a hair; the running bound of a
small CNN and MLP equals the closed form written out here with plain float64 convolutions and
matmuls; onnx's evaluator islands (``Erf``) compute float64 ``erf`` to rounding (``math.erf``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fc2conv.core.rounding import gamma
from fc2conv.verify.bound import rounding_for
from fc2conv.verify.running import track, upper_product


def _ops(rng: np.random.Generator) -> list[tuple[str, object, tuple, tuple, int]]:
    """(name, bilinear op, shape of p, shape of q, terms per output element)."""
    b, c, o, s = (int(v) for v in rng.integers(1, 5, 4))
    return [
        ("mm", torch.mm, (7, 33), (33, 5), 33),
        ("bmm", torch.bmm, (3, 6, 17), (3, 17, 4), 17),
        ("conv1d", lambda p, q: F.conv1d(p, q, padding=1), (b, c, 9 + s), (o, c, 3), c * 3),
        ("conv2d", lambda p, q: F.conv2d(p, q, stride=2), (b, c, 8, 7), (o, c, 3, 2), c * 6),
        ("conv3d", lambda p, q: F.conv3d(p, q, padding=1), (b, c, 5, 6, 4), (o, c, 3, 3, 3),
         c * 27),
    ]


@pytest.mark.parametrize("seed", range(6))
def test_upper_product_bounds_the_exact_product_from_above_by_a_hair(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, op, ps, qs, n in _ops(rng):
        # magnitudes over many decades, some exact zeros (ReLU outputs)
        p = torch.from_numpy(np.abs(rng.standard_normal(ps)) * 10.0 ** rng.uniform(-8, 8, ps))
        q = torch.from_numpy(np.abs(rng.standard_normal(qs)) * 10.0 ** rng.uniform(-3, 3, qs))
        p[p < 0.1 * p.median()] = 0.0
        exact = op(p, q)  # float64: exact up to γ_n(2^-53) relative, terms all >= 0
        got = upper_product(op, p, q, n)
        assert got.dtype == torch.float64 and got.shape == exact.shape, name
        lo = exact * (1 + gamma(n, 2.0**-53))  # the exact sum is at most this
        assert bool((got >= lo).all()), name
        # and no looser than float32's own rounding of the same sum (plus an underflow floor
        # far below the largest element)
        tiny = 2.0**-90 * float(exact.max())
        assert bool((got <= exact * (1 + 4 * gamma(n + 2, 2.0**-24)) + tiny).all()), name


def test_upper_product_outside_float32s_range() -> None:
    """Operands far beyond float32's range (1e-150, 1e150) are scaled into it exactly; an
    infinite one falls back to float64."""
    rng = np.random.default_rng(1)
    for scale in (1e-150, 1e150):
        p = torch.from_numpy(np.abs(rng.standard_normal((4, 9))) * scale)
        q = torch.from_numpy(np.abs(rng.standard_normal((9, 3))) * scale)
        exact = torch.mm(p, q)
        got = upper_product(torch.mm, p, q, 9)
        assert bool((got >= exact * (1 + 1e-15)).all())
        assert bool((got <= exact * (1 + 1e-5)).all())
    p = torch.ones(2, 3, dtype=torch.float64)
    p[0, 0] = math.inf
    q = torch.ones(3, 2, dtype=torch.float64)
    assert torch.equal(upper_product(torch.mm, p, q, 3), torch.mm(p, q))


def _closed_form(x: torch.Tensor, e_x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                 op: object, u: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running rule for ``y = op(x, W) + b`` written out in float64 (module docstring of
    :mod:`fc2conv.verify.running`): weights and bias carry ``u|.|``; returns (y, E_y)."""
    if x.dim() > 2:  # a convolution's bias: one per channel
        b = b.reshape(1, -1, *([1] * (x.dim() - 2)))
    wa, ba = w.abs(), b.abs()
    e_w, e_b = u * wa, u * ba
    xa = x.abs()
    mag = op(xa + e_x, wa + e_w)
    e = mag - op(xa, wa) + e_b + gamma(n + 1, u) * (mag + ba + e_b)
    return op(x, w) + b, e


@pytest.mark.parametrize("seed", range(3))
def test_running_bound_of_a_cnn_is_the_closed_form(seed: int) -> None:
    """conv3d -> ReLU -> conv3d and mm -> ReLU -> mm: the tracked bound (float32 products of
    magnitudes, raised) equals the float64 closed form to a relative 1e-5, and is never below
    it by more than float64 rounding."""
    torch.manual_seed(seed)
    u = 2.0**-24
    r = rounding_for(torch.float32)

    conv = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(4, 3, 2, stride=2)).double().eval()
    mlp = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).double().eval()
    cases = [
        (conv, torch.randn(2, 2, 6, 6, 6, dtype=torch.float64),
         [lambda p, q: F.conv3d(p, q, padding=1), lambda p, q: F.conv3d(p, q, stride=2)],
         lambda m, k: m[k].weight, [2 * 27, 4 * 8]),
        (mlp, torch.randn(3, 20, dtype=torch.float64),
         [lambda p, q: p @ q.T, lambda p, q: p @ q.T], lambda m, k: m[k].weight, [20, 16]),
    ]
    for model, x, ops, weight, ns in cases:
        with torch.no_grad():
            y, tracker = track(lambda m=model, x=x: m(x), r)
            e_got = tracker.error_of(y)
            h, e_h = _closed_form(x, u * x.abs(), weight(model, 0), model[0].bias, ops[0], u,
                                  ns[0])
            h, e_h = h.relu(), e_h  # ReLU passes the error on
            want_y, e_want = _closed_form(h, e_h, weight(model, 2), model[2].bias, ops[1], u,
                                          ns[1])
        assert torch.allclose(y, want_y, rtol=1e-12, atol=1e-12)
        assert bool((e_got >= e_want * (1 - 1e-9)).all())
        assert bool((e_got <= e_want * (1 + 1e-5)).all())


@pytest.mark.parametrize("case", range(8))
def test_conv3d_by_depth_is_torch_float64_conv3d(case: int) -> None:
    """The float64 3-D convolution of the running bound's reference (a sum of 2-D ones over the
    kernel's depth) equals torch's own, to float64 rounding, for strides, padding, dilation,
    groups and bias."""
    from fc2conv.verify.running import conv3d_by_depth

    rng = np.random.default_rng(case)
    groups = (1, 2)[case % 2]
    c, o = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    k = [int(v) for v in rng.integers(1, 4, 3)]
    stride = [int(v) for v in rng.integers(1, 3, 3)]
    pad = [int(v) for v in rng.integers(0, 3, 3)]
    dil = [int(v) for v in rng.integers(1, 3, 3)]
    x = torch.from_numpy(rng.standard_normal((2, c, 9, 8, 7)))
    w = torch.from_numpy(rng.standard_normal((o, c // groups, *k)))
    b = torch.from_numpy(rng.standard_normal(o)) if case % 3 else None
    got = conv3d_by_depth(x, w, b, stride, pad, dil, False, [0, 0, 0], groups)
    want = F.conv3d(x, w, b, stride, pad, dil, groups)
    mag = F.conv3d(x.abs(), w.abs(), None if b is None else b.abs(), stride, pad, dil, groups)
    assert got.shape == want.shape
    n = c // groups * math.prod(k) + 1
    assert bool(((got - want).abs() <= 2 * gamma(n, 2.0**-53) * mag + 1e-300).all())


def test_tracked_3d_net_runs_the_float64_forward() -> None:
    """A 3-D net large enough for the depth-split convolution: the tracked float64 run equals
    the plain float64 forward to float64 rounding, and its bound still covers the float32
    model's error."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 5, padding=2), nn.ReLU(),
                        nn.Conv3d(4, 2, 3, padding=1)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    net64 = __import__("copy").deepcopy(net).double()
    with torch.no_grad():
        y, tracker = track(lambda: net64(x.double()), rounding_for(torch.float32))
        want = net64(x.double())
        y32 = net(x).double()
    assert torch.allclose(y, want, rtol=0, atol=1e-12)
    assert bool(((y32 - y).abs() <= tracker.error_of(y)).all())


def _ln_mlp(rng: np.random.Generator) -> object:
    """x (4, 16) -> MatMul -> LayerNormalization -> MatMul -> Softmax, float32."""
    from onnx import TensorProto, helper, numpy_helper

    def f32(name: str, *shape: int) -> object:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "W2"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    graph = helper.make_graph(
        nodes, "ln_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [f32("W1", 16, 32), f32("g", 32), f32("b", 32), f32("W2", 32, 8)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ln_mlp_float64(proto: object, x: np.ndarray) -> np.ndarray:
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    h = np.einsum("ij,jk->ik", x.astype(np.float64), w["W1"])
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    n = (h - mu) / np.sqrt(var + 1e-5) * w["g"] + w["b"]
    z = np.einsum("ij,jk->ik", n, w["W2"])
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_onnx_noise_only_for_asked_draws_at_the_scale_of_real_rounding(monkeypatch) -> None:
    """The op-by-op noise is measured only for the draws asked for (the others read 0.0), on
    perturbed graphs built once and reused across draws (the sessions of 4 draws are those of
    1), and it stays the size of A's real float32 error against an independent float64
    computation: above it, and within 1000x."""
    import onnxruntime

    from fc2conv.verify.models import load
    from fc2conv.verify.onnx_noise import onnx_noise

    rng = np.random.default_rng(11)
    proto = _ln_mlp(rng)
    draws = [(torch.from_numpy(rng.standard_normal((4, 16)).astype(np.float32)),)
             for _ in range(4)]
    built = {"n": 0}
    real_session = onnxruntime.InferenceSession

    def session(*args, **kwargs):  # type: ignore[no-untyped-def]
        built["n"] += 1
        return real_session(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    counts = []
    for only in ({2}, {0, 1, 2, 3}):
        model = load(proto, "A")
        model.run(draws[0], "reference")
        built["n"] = 0
        noise = onnx_noise(model, draws, 2.0**-24, 3, only=only)
        counts.append(built["n"])
        for k in range(4):
            assert isinstance(noise[k][0], torch.Tensor) == (k in only)
    assert counts[0] == counts[1], counts
    for k, (x,) in enumerate(draws):
        a = model.run((x,)).outputs[0].double().numpy()
        real = float(np.abs(a - _ln_mlp_float64(proto, x.numpy())).max())
        level = float(noise[k][0].max())
        assert real <= 4 * level and level <= 1e3 * max(real, 2.0**-24 * 1e-3), (k, real, level)
