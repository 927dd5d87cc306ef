"""Issue 9: the outputs decide the verdict, NaN/Inf are counted, a cause is named only when it
explains the difference. Each test fails on the judge before the fix."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fc2conv import compare

B_ERROR_RATIO = 10.0  # the definition of a bug compare must catch


class Sum3(nn.Module):
    """``(x W1ᵀ) W2ᵀ`` with an extra rounding in the middle: the same function as ``Lin2``."""

    def __init__(self, a: nn.Linear, b: nn.Linear) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32),
                         nn.Tanh(), nn.Linear(32, 6)).eval()


def _f64_errors(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """A's and B's largest error against A's float64 twin, computed independently."""
    with torch.no_grad():
        r = copy.deepcopy(a).double()(x.double())
        ea = float((a(x).double() - r).abs().max())
        eb = float((b(x).double() - r).abs().max())
    return max(ea, 2**-24 * float(r.abs().max())), eb


def test_bitwise_equal_outputs_are_identical_whatever_the_layers_say() -> None:
    """B computes a hidden layer differently (a bug the last layer zeroes out), but its outputs
    are bitwise A's: identical, always; the layer table only localizes."""
    a = _mlp(0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        a[5].weight[:, 7] = 0.0  # the last layer ignores hidden unit 7 ...
        b[5].weight[:, 7] = 0.0
        b[3].weight[7] += torch.randn(32)  # ... which B computes wrongly
    x = torch.randn(8, 24)
    report = compare(a, b, x, layers=True)
    assert report.verdict == "identical", str(report)
    assert any(not row.ok for row in report.layers)  # the layer table still shows it


def test_agreeing_outputs_stay_equivalent_when_a_layer_strays_within_noise() -> None:
    """Clean pairs of real-ish models over many draws: never "different" (the layer table of
    the old judge overturned them on one layer ratio just above 1)."""
    a = _mlp(1)
    b = Sum3(copy.deepcopy(a)[:5], copy.deepcopy(a)[5:])
    for seed in range(6):
        x = torch.randn(16, 24, generator=torch.Generator().manual_seed(seed)) * 3
        assert compare(a, b, x, layers=True).verdict in ("identical", "equivalent")


def test_planted_bug_beyond_ten_times_a_error_is_different() -> None:
    """The miss definition: B's error vs float64 > 10x A's -> "different", with the planted
    layer named as the first divergence."""
    a = _mlp(2)
    x = torch.randn(16, 24)
    for change in (lambda m: m[3].weight.data.__setitem__((3, 4), m[3].weight[3, 4] + 1e-3),
                   lambda m: m[3].weight.data[3].mul_(1.01),
                   lambda m: m[3].weight.data.copy_(m[3].weight.data.t().clone()),
                   lambda m: m[3].bias.data.zero_()):
        b = copy.deepcopy(a)
        change(b)
        ea, eb = _f64_errors(a, b, x)
        assert eb > B_ERROR_RATIO * ea  # the bug is significant by the definition
        report = compare(a, b, x, layers=True)
        assert report.verdict == "different", str(report)
        assert report.first_divergence == "3", str(report)


def test_one_changed_weight_is_not_called_a_scale_factor() -> None:
    a = _mlp(3)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[3].weight[2, 5] += 1e-3
    report = compare(a, b, torch.randn(16, 24), layers=True)
    assert report.verdict == "different"
    assert report.diagnosis is not None
    assert "scale factor" not in report.diagnosis and "times a constant" not in report.diagnosis
    assert "none of the tested causes" in report.diagnosis


class Poison(nn.Module):
    """``lin(x)`` with NaN where ``x[:, 0] > 0`` (or, with ``shift``, where ``x[:, 1] > 0``)."""

    def __init__(self, lin: nn.Linear, col: int = 0) -> None:
        super().__init__()
        self.lin, self.col = lin, col

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return torch.where(x[:, self.col:self.col + 1] > 0, torch.full_like(y, float("nan")), y)


def test_nan_first_appearance_is_located() -> None:
    # Threshold(0, nan): NaN wherever the first layer's output is <= 0, in both models
    a = nn.Sequential(nn.Linear(6, 4), nn.Threshold(0.0, float("nan")), nn.Linear(4, 3))
    b = copy.deepcopy(a)
    report = compare(a, b, torch.randn(10, 6), layers=True)
    assert report.verdict == "identical"
    assert "NaN/Inf first appear in A at layer '1'" in str(report)
    assert "NaN/Inf first appear in B at layer '1'" in str(report)


def test_nan_in_both_models_at_the_same_place_is_said() -> None:
    lin = nn.Linear(6, 4)
    a, b = Poison(lin), Poison(copy.deepcopy(lin))
    x = torch.randn(10, 6)
    x[0, 0], x[1, 0] = 1.0, -1.0
    report = compare(a, b, x, layers=True)
    assert report.verdict == "identical"
    n_nan = int((x[:, 0] > 0).sum()) * 4
    assert report.outputs[0].nan_a == report.outputs[0].nan_b == n_nan
    text = str(report)
    assert f"A {n_nan} NaN" in text and "neither result is a number" in text


def test_nan_where_the_other_model_is_finite_is_different() -> None:
    lin = nn.Linear(6, 4)
    a, b = Poison(lin, 0), Poison(copy.deepcopy(lin), 1)
    x = torch.randn(10, 6)
    x[0, 0], x[0, 1] = 1.0, -1.0
    report = compare(a, b, x, layers=False)
    assert report.verdict == "different"
    assert report.outputs[0].nan_mismatch > 0
    assert "NaN/Inf in one model only" in str(report)


def test_scale_hypothesis_needs_to_explain_the_difference() -> None:
    """One changed element under a loose bound: a least-squares factor ~1.00001 fits within the
    bound but explains none of the difference, so no "scale factor" is named; a true scale is."""
    from fc2conv.verify.diagnose import _scale

    ya = torch.randn(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ya[3, 4] = 3.0
    yb = ya.clone()
    yb[3, 4] += 0.5  # least squares: c = 1 + 0.5 * 3 / |ya|^2 ~ 1.0007
    loose = torch.full_like(ya, 1.0)
    assert _scale(ya, yb, loose, "B's 'x'", "'x'") is None
    assert "times a constant 1.01" in (_scale(ya, ya * 1.01, loose, "B's 'x'", "'x'") or "")
