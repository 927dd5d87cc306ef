"""The computations behind ``fc2conv demo``, as plain functions returning numbers.

Each function builds small models from a seed, runs them, and returns a dataclass of tensors and
floats; ``fc2conv.cli.demo`` only prints them and the tests check them against their own float64
references. Every weight transformation goes through the core (``linear_to_conv``,
``conv_to_linear``, ``flatten_linear_to_conv``, ``as_matrix``); rounding bounds come from
``fc2conv.core.rounding``.

1. :func:`run_seed_example` — a 1x1 conv from 2 channels of 2x2 to 1 channel, computed three ways:
   the conv; four Linear 2->1 layers (one per position) sharing the weight ``w``; and one Linear
   8->4 whose weight is ``as_matrix(conv, (2, 2, 2))`` (``w ⊗ I_4`` in chw order, block diagonal
   ``I_4 ⊗ w`` in hwc order).
2. :func:`run_classic_experiment` — an MLP 256->64->128->256->4 (ReLU between) on input
   ``(16, 5, 256)`` against the same MLP as 1x1 convs over ``(16, 256, 1, 5)``, both measured
   against a float64 copy, with Higham's forward-error bound propagated layer by layer.
3. :func:`run_flatten_limits` and :func:`run_samples_limits` — where the equivalence stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fc2conv.core import as_matrix, conv_to_linear, flatten_linear_to_conv, linear_to_conv
from fc2conv.core.rounding import affine_bound, ulp_distance, unit_roundoff

MLP_SIZES = (256, 64, 128, 256, 4)
BATCH, SAMPLES = 16, 5


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator (nn init uses it) without changing the caller's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# 1. the seed example
# --------------------------------------------------------------------------------------------


@dataclass
class SeedExample:
    """A 1x1 conv 2->1 on one 2x2 map, computed three ways (float32, inputs ``x`` of (2, 2, 2))."""

    conv: nn.Conv2d
    x: torch.Tensor  # (C=2, H=2, W=2)
    weight: torch.Tensor  # (1, 2): the one weight vector shared by every position
    bias: torch.Tensor  # (1,)
    matrix_chw: torch.Tensor  # (4, 8) = as_matrix(conv, (2, 2, 2)), columns (c, h, w)
    matrix_hwc: torch.Tensor  # (4, 8) = as_matrix(..., order="hwc"), columns (h, w, c)
    y_conv: torch.Tensor  # (4,) conv output flattened (h, w)
    y_per_position: torch.Tensor  # (4,) Linear 2->1 applied at each position
    y_matrix: torch.Tensor  # (4,) matrix_chw @ x.flatten() + b
    y_matrix_hwc: torch.Tensor  # (4,) matrix_hwc @ x (channels-last) + b

    @property
    def max_difference(self) -> float:
        ys = (self.y_conv, self.y_per_position, self.y_matrix, self.y_matrix_hwc)
        return max(float((a - b).abs().max()) for a in ys for b in ys)


def _two_decimals(t: torch.Tensor) -> torch.Tensor:
    """Values rounded to 2 decimals, so the printed matrices show the numbers actually used."""
    return torch.round(t * 100) / 100


def run_seed_example(seed: int = 0) -> SeedExample:
    """Random weights and input (2 decimals), the conv evaluated as conv, per-position FCs and
    one block-structured FC."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(2, 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(_two_decimals(torch.randn(1, 2, 1, 1, generator=gen)))
        conv.bias.copy_(_two_decimals(torch.randn(1, generator=gen)))  # type: ignore[union-attr]
    x = _two_decimals(torch.rand(2, 2, 2, generator=gen) * 2 - 1)
    fc = conv_to_linear(conv)  # Linear 2->1 with the conv's weight vector
    m_chw = as_matrix(conv, (2, 2, 2))
    m_hwc = as_matrix(conv, (2, 2, 2), order="hwc")
    bias = fc.bias.detach()  # type: ignore[union-attr]
    with torch.no_grad():
        y_conv = conv(x.unsqueeze(0)).reshape(-1)
        y_pos = torch.stack([fc(x[:, i, j]) for i in range(2) for j in range(2)]).reshape(-1)
        y_mat = m_chw @ x.reshape(-1) + bias
        y_hwc = m_hwc @ x.permute(1, 2, 0).reshape(-1) + bias
    return SeedExample(conv, x, fc.weight.detach().clone(), bias.clone(), m_chw, m_hwc,
                       y_conv, y_pos, y_mat, y_hwc)


# --------------------------------------------------------------------------------------------
# 2. the classic experiment
# --------------------------------------------------------------------------------------------


def make_mlp(weights: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    """MLP 256->64->128->256->4 with ReLU between; ``weights="ones"`` sets every weight and bias
    to 1, ``"random"`` keeps PyTorch's default init (drawn from ``seed``)."""
    layers: list[nn.Module] = []
    with _seeded(seed):
        for i, (a, b) in enumerate(zip(MLP_SIZES, MLP_SIZES[1:], strict=False)):
            layers.append(nn.Linear(a, b, dtype=dtype))
            if i < len(MLP_SIZES) - 2:
                layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    if weights == "ones":
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0)
    return model


class ConvMLP(nn.Module):
    """The MLP as 1x1 convs over the samples axis: ``(B, S, D) -> (B, D, 1, S) -> convs -> back``.

    Takes and returns the same layout as the Linear MLP, so the two are drop-in comparable.
    """

    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *[linear_to_conv(m, dims=2) if isinstance(m, nn.Linear) else m for m in mlp]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(-1, 1).unsqueeze(2)  # (B, S, D) -> (B, D, 1, S)
        return self.body(h).squeeze(2).movedim(1, -1)


@dataclass
class ClassicResult:
    """One run of the classic experiment; errors are float64 maxima over all 16x5x4 outputs."""

    weights: str  # "ones" or "random"
    linear: nn.Sequential
    conv: ConvMLP
    x: torch.Tensor  # (16, 5, 256) float32, torch.rand
    y_linear: torch.Tensor  # (16, 5, 4) float32
    y_conv: torch.Tensor
    y_ref: torch.Tensor  # float64 MLP on the same (float32-valued) input
    bound: torch.Tensor  # elementwise Higham bound on |y - y_ref| for either model (float64)
    layer_bounds: list[float]  # max bound after each Linear layer

    @property
    def output_scale(self) -> float:
        return float(self.y_ref.abs().max())

    @property
    def err_linear(self) -> float:
        return float((self.y_linear.double() - self.y_ref).abs().max())

    @property
    def err_conv(self) -> float:
        return float((self.y_conv.double() - self.y_ref).abs().max())

    @property
    def diff(self) -> float:
        return float((self.y_linear.double() - self.y_conv.double()).abs().max())

    @property
    def max_bound(self) -> float:
        return float(self.bound.max())

    def _ulps(self, a: torch.Tensor, b: torch.Tensor) -> float:
        floor = unit_roundoff(torch.float32) * self.output_scale  # near-zero outputs: no tiny ULPs
        return float(ulp_distance(a.double(), b.double(), torch.float32, floor=floor).max())

    @property
    def ulps_linear(self) -> float:
        return self._ulps(self.y_linear, self.y_ref)

    @property
    def ulps_conv(self) -> float:
        return self._ulps(self.y_conv, self.y_ref)

    @property
    def ulps_diff(self) -> float:
        return self._ulps(self.y_linear, self.y_conv)

    @property
    def within_bound(self) -> tuple[bool, bool]:
        """(linear, conv): is every output within the bound of the float64 reference?"""
        lin = bool(((self.y_linear.double() - self.y_ref).abs() <= self.bound).all())
        conv = bool(((self.y_conv.double() - self.y_ref).abs() <= self.bound).all())
        return lin, conv

    @property
    def identical_fraction(self) -> float:
        return float((self.y_linear == self.y_conv).double().mean())


def propagate_bound(model: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Higham's bound through the MLP: ``e' = |W| e + γ_{n+1}(|W||x̂| + |b|)`` per Linear, ReLU
    (1-Lipschitz, exact) passes ``e`` on. Returns the final elementwise bound and the max after
    each Linear."""
    u = unit_roundoff(x.dtype)
    err = torch.zeros_like(x, dtype=torch.float64)
    per_layer: list[float] = []
    h = x
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                err = affine_bound(m.weight, h, m.bias, err, u)
                per_layer.append(float(err.max()))
            h = m(h)
    return err, per_layer


def run_classic_experiment(weights: str = "ones", seed: int = 0) -> ClassicResult:
    """MLP 256->64->128->256->4 vs its 1x1-conv twin on ``torch.rand(16, 5, 256)``."""
    if weights not in ("ones", "random"):
        raise ValueError(f"weights must be 'ones' or 'random', got {weights!r}")
    model = make_mlp(weights, seed=seed)
    conv = ConvMLP(model)
    x = torch.rand(BATCH, SAMPLES, MLP_SIZES[0], generator=torch.Generator().manual_seed(seed))
    ref = make_mlp(weights, torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        y_lin, y_conv, y_ref = model(x), conv(x), ref(x.double())
    bound, per_layer = propagate_bound(model, x)
    return ClassicResult(weights, model, conv, x, y_lin, y_conv, y_ref, bound, per_layer)


# --------------------------------------------------------------------------------------------
# 3. where the equivalence stops
# --------------------------------------------------------------------------------------------


@dataclass
class FlattenLimits:
    """A Linear over a flattened (C, H, W) map vs the conv forms that do and do not match it."""

    in_shape: tuple[int, int, int]
    out_features: int
    linear: nn.Linear
    conv: nn.Conv2d  # flatten_linear_to_conv(linear, in_shape): kernel (H, W)
    err_conv: float  # max |conv(x) - linear(x.flatten())|
    rounding_bound: float  # 2 γ_{n+1} max(|W||x| + |b|): both sides' Higham bounds added
    err_wrong_order: float  # the same with order="hwc" applied to an NCHW map
    output_scale: float  # max |linear(x.flatten())|
    params_linear: int
    params_conv: int
    params_1x1: int  # the largest 1x1 conv on the map: C -> out_features
    outputs_1x1: int  # how many numbers that 1x1 conv produces (out * H * W)
    fc_changed: int  # outputs of the Linear that move when one input position is perturbed
    conv1x1_changed: int  # outputs of the 1x1 conv that move (only those at that position)
    conv_changed: int  # outputs of the map-sized conv that move (all, like the Linear)


def run_flatten_limits(seed: int = 0, in_shape: tuple[int, int, int] = (4, 3, 3),
                       out_features: int = 5) -> FlattenLimits:
    c, h, w = in_shape
    with _seeded(seed):
        linear = nn.Linear(c * h * w, out_features)
        conv1x1 = nn.Conv2d(c, out_features, 1)
        x = torch.randn(8, c, h, w)
    conv = flatten_linear_to_conv(linear, in_shape)
    wrong = flatten_linear_to_conv(linear, in_shape, order="hwc")
    with torch.no_grad():
        y = linear(x.flatten(1))
        err = float((conv(x).flatten(1) - y).abs().max())
        bound = 2 * float(affine_bound(linear.weight, x.flatten(1), linear.bias).max())
        err_wrong = float((wrong(x).flatten(1) - y).abs().max())
        x2 = x.clone()
        x2[:, :, 0, 0] += 1.0  # perturb every channel at one spatial position
        fc_changed = int(((linear(x2.flatten(1)) - y)[0] != 0).sum())
        conv1x1_changed = int(((conv1x1(x2) - conv1x1(x))[0] != 0).sum())
        conv_changed = int(((conv(x2) - conv(x))[0] != 0).sum())
    assert isinstance(conv, nn.Conv2d)
    return FlattenLimits(in_shape, out_features, linear, conv, err, bound, err_wrong,
                         float(y.abs().max()), _params(linear), _params(conv), _params(conv1x1),
                         out_features * h * w, fc_changed, conv1x1_changed, conv_changed)


@dataclass
class SamplesLimits:
    """A kernel shared across a samples axis (a 1x1 conv over S samples of D features) vs a
    Linear over all S*D features at once."""

    samples: int
    features: int
    out_features: int
    params_conv: int
    params_fc: int
    block_zeros: int  # entries of the conv's (S*O) x (S*D) matrix forced to zero
    block_diagonal: bool  # as_matrix(conv, order="hwc") is I_S ⊗ W
    err_conv_as_fc: float  # max |conv(x) - Linear(as_matrix)(x)|: the conv IS that FC
    conv_leak: float  # max change of sample-1 outputs when only sample 0 changes, conv
    fc_leak: float  # the same for a general Linear over all samples
    conv_out_scale: float
    fc_out_scale: float


def run_samples_limits(seed: int = 0, samples: int = SAMPLES, features: int = 8,
                       out_features: int = 3) -> SamplesLimits:
    with _seeded(seed):
        per_sample = nn.Linear(features, out_features)
        fc = nn.Linear(samples * features, samples * out_features)
        x = torch.randn(4, samples, features)
        x2 = x.clone()
        x2[:, 0] += torch.randn(4, features)  # change sample 0 only
    conv = linear_to_conv(per_sample, dims=1)  # Conv1d kernel 1 over (B, D, S)
    matrix = as_matrix(conv, (features, samples), order="hwc")  # (S*O, S*D), sample-major
    blocks = torch.block_diag(*[per_sample.weight.detach()] * samples)
    bias_all = per_sample.bias.detach().repeat(samples)  # type: ignore[union-attr]

    def run_conv(t: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, S, O)
        return conv(t.transpose(1, 2)).transpose(1, 2)

    def run_fc(t: torch.Tensor) -> torch.Tensor:
        return fc(t.flatten(1)).reshape(t.shape[0], samples, out_features)

    with torch.no_grad():
        y_conv = run_conv(x)
        y_as_fc = (x.flatten(1) @ matrix.T + bias_all).reshape_as(y_conv)
        conv_leak = float((run_conv(x2)[:, 1] - y_conv[:, 1]).abs().max())
        y_fc = run_fc(x)
        fc_leak = float((run_fc(x2)[:, 1] - y_fc[:, 1]).abs().max())
    return SamplesLimits(
        samples, features, out_features, _params(conv), _params(fc),
        int((matrix == 0).sum()), bool(torch.equal(matrix, blocks)),
        float((y_as_fc - y_conv).abs().max()), conv_leak, fc_leak,
        float(y_conv.abs().max()), float(y_fc.abs().max()),
    )

